"""Execution of tile jobs: what a job does (jobs, models), which jobs are needed (planner), where they run (runners)."""
