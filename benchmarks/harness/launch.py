"""How the benchmarks start their child processes and tell in one line why one failed."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

from benchmarks.harness.procmon import ProcessRun, run_monitored

CHILDREN = Path(__file__).resolve().parents[1] / "children"
"""The child scripts, run by path (:mod:`benchmarks.children`)."""


@dataclass(frozen=True)
class Launcher:
    """How sides start their processes.

    Attributes:
        env: Environment of every child process.
        interval: Seconds between memory samples.
        timeout: Seconds after which a process is killed.
        pss_interval: Seconds between PSS samples (None: not sampled).
        python: Interpreter of the child processes.
    """

    env: dict[str, str]
    interval: float
    timeout: float | None
    pss_interval: float | None = None
    python: str = sys.executable

    def run(self, command: list[str], log_prefix: Path, cwd: Path) -> ProcessRun:
        """Run a monitored child process in ``cwd``; its output goes to ``<log_prefix>.out|.err``."""
        cwd.mkdir(parents=True, exist_ok=True)
        return run_monitored(
            command,
            log_prefix,
            cwd=cwd,
            env=self.env,
            interval=self.interval,
            timeout=self.timeout,
            pss_interval=self.pss_interval,
        )

    def child(self, script: str, *arguments: str) -> list[str]:
        """Command line of a child script of :data:`CHILDREN` (``upstream_tiled.py``...)."""
        return [self.python, str(CHILDREN / script), *arguments]


def process_error(run: ProcessRun, what: str) -> str | None:
    """One line describing a failed process, or None if it exited 0."""
    if run.timed_out:
        return f"{what}: killed after running past the timeout ({run.wall_s:.0f} s); see {run.stderr_path}"
    if run.returncode == 0:
        return None
    text = run.stderr()
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error:")] + exception_lines(text)
    detail = (errors or lines or ["no output"])[-1]
    return f"{what}: exit status {run.returncode}: {detail} (see {run.stderr_path})"


def exception_lines(text: str) -> list[str]:
    """The ``Type: message`` line closing each Python traceback in ``text``, in order."""
    found = []
    in_traceback = False
    for line in text.splitlines():
        if line.startswith("Traceback (most recent call last)"):
            in_traceback = True
        elif in_traceback and line and not line[0].isspace():
            found.append(line.strip())
            in_traceback = False
    return found


def first_exception(log: Path) -> str:
    """``': <first exception line>'`` of a log file (the root cause), or '' if it has none."""
    if not log.is_file():
        return ""
    found = exception_lines(log.read_text(encoding="utf-8", errors="replace"))
    return f": {found[0]}" if found else ""
