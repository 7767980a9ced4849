"""Runners: where tile jobs run (in this process, in local worker processes, as Ray tasks)."""
