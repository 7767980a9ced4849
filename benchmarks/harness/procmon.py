"""Run a command in a subprocess while sampling the resident memory of its whole process tree.

The peak is taken over samples of *the sum of RSS of the child and all its descendants* (data
loader workers included), because that is what the machine has to hold; the child's own RSS is
kept too, since forked workers share pages with their parent and the sum counts those twice.
Optionally the proportional set size (PSS, shared pages divided among their sharers) of the tree
is sampled as well: it does not double-count, but the kernel needs ~70 ms per GB-sized process to
compute it, so it is sampled rarely and only on request.
"""

from __future__ import annotations

import contextlib
import math
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path

import psutil

DEFAULT_INTERVAL = 0.1
"""Seconds between memory samples."""


@dataclass
class ProcessRun:
    """Outcome of one monitored subprocess.

    Attributes:
        command: The command line.
        returncode: Exit status (negative: killed by that signal).
        started: Wall-clock time (``time.time()``) just before the process was spawned.
        wall_s: Seconds from spawn to exit.
        peak_tree_rss: Largest sum of RSS over the process and its descendants, in bytes.
        peak_main_rss: Largest RSS of the process itself, in bytes.
        samples: Number of memory samples taken.
        peak_tree_pss: Largest sum of PSS over the tree in bytes, or None when PSS was not sampled.
        stdout_path: File holding the process's standard output.
        stderr_path: File holding the process's standard error.
        timed_out: Whether the process was killed for running past its timeout.
    """

    command: list[str]
    returncode: int
    started: float
    wall_s: float
    peak_tree_rss: int
    peak_main_rss: int
    samples: int
    stdout_path: Path
    stderr_path: Path
    timed_out: bool
    peak_tree_pss: int | None = None

    def stdout(self) -> str:
        """The captured standard output."""
        return self.stdout_path.read_text(encoding="utf-8", errors="replace")

    def stderr(self) -> str:
        """The captured standard error."""
        return self.stderr_path.read_text(encoding="utf-8", errors="replace")


def tree_rss(process: psutil.Process) -> tuple[int, int]:
    """RSS of ``process`` and the sum over it and all its descendants, in bytes.

    Processes that exit while being sampled are skipped; a process that has already gone counts 0.
    """
    sizes = {member.pid: _resident(member, pss=False) for member in _tree(process)}
    return sizes.get(process.pid, 0), sum(sizes.values())


def tree_pss(process: psutil.Process) -> int:
    """Sum of the proportional set size over ``process`` and its descendants, in bytes (Linux only)."""
    return sum(_resident(member, pss=True) for member in _tree(process))


def _tree(process: psutil.Process) -> list[psutil.Process]:
    """``process`` and its descendants; empty once it has exited."""
    try:
        return [process, *process.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def _resident(member: psutil.Process, *, pss: bool) -> int:
    """RSS (or PSS) of one process in bytes; 0 for a process that exited while being sampled."""
    try:
        return member.memory_full_info().pss if pss else member.memory_info().rss
    except (psutil.NoSuchProcess, psutil.ZombieProcess, psutil.AccessDenied):
        return 0


def run_monitored(
    command: list[str],
    log_prefix: Path,
    *,
    cwd: Path | None = None,
    env: dict[str, str] | None = None,
    interval: float = DEFAULT_INTERVAL,
    timeout: float | None = None,
    pss_interval: float | None = None,
) -> ProcessRun:
    """Run ``command`` to completion, sampling its process tree's memory every ``interval`` seconds.

    Args:
        command: Program and arguments.
        log_prefix: Standard output and error go to ``<log_prefix>.out`` and ``<log_prefix>.err``.
        cwd: Working directory of the process.
        env: Environment of the process (default: this process's).
        interval: Seconds between memory samples.
        timeout: Seconds after which the process tree is killed (None: no limit).
        pss_interval: Seconds between PSS samples of the tree (None: PSS is not sampled).

    Returns:
        The exit status, wall time and memory peaks.
    """
    log_prefix.parent.mkdir(parents=True, exist_ok=True)
    stdout_path = log_prefix.with_name(log_prefix.name + ".out")
    stderr_path = log_prefix.with_name(log_prefix.name + ".err")
    peaks = _Peaks()
    with stdout_path.open("wb") as stdout, stderr_path.open("wb") as stderr:
        started = time.time()
        start = time.perf_counter()
        # A new session, so that a timeout can end the child's whole tree and nothing else.
        process = psutil.Popen(command, cwd=cwd, env=env, stdout=stdout, stderr=stderr, start_new_session=True)
        try:
            while True:
                peaks.sample(process, pss_interval)
                try:
                    process.wait(timeout=interval)
                    break
                except psutil.TimeoutExpired:
                    if timeout is not None and time.perf_counter() - start > timeout:
                        peaks.timed_out = True
                        _kill_session(process)
        except BaseException:
            # Ctrl-C reaches only the harness (the child has its own session): take the child down too.
            _kill_session(process)
            raise
        wall = time.perf_counter() - start
    return ProcessRun(
        command=command,
        returncode=process.returncode,
        started=started,
        wall_s=wall,
        peak_tree_rss=peaks.tree,
        peak_main_rss=peaks.main,
        samples=peaks.samples,
        stdout_path=stdout_path,
        stderr_path=stderr_path,
        timed_out=peaks.timed_out,
        peak_tree_pss=peaks.pss,
    )


@dataclass
class _Peaks:
    """Memory peaks of a process tree over its samples so far."""

    main: int = 0
    tree: int = 0
    samples: int = 0
    pss: int | None = None
    last_pss: float = -math.inf
    timed_out: bool = False

    def sample(self, process: psutil.Process, pss_interval: float | None) -> None:
        """Sample the tree's RSS, and its PSS when ``pss_interval`` seconds have passed since the last PSS."""
        main, total = tree_rss(process)
        self.main, self.tree, self.samples = max(self.main, main), max(self.tree, total), self.samples + 1
        if pss_interval is not None and time.perf_counter() - self.last_pss >= pss_interval:
            self.last_pss = time.perf_counter()
            self.pss = max(self.pss or 0, tree_pss(process))


def _kill_session(process: psutil.Popen) -> None:
    """Kill the process group the child leads (it was started in its own session)."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
