"""The machine a benchmark ran on: CPU, cores, RAM, software versions, load and the repository's commit."""

from __future__ import annotations

import os
import platform
import subprocess
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

import psutil

from benchmarks.harness.cli import REPO
from benchmarks.harness.markdown import GIB

PACKAGES = ("torch", "lightning", "anomalib", "anomalib-tiled")


def machine_info(repo: Path = REPO) -> dict[str, Any]:
    """CPU, cores, RAM, OS, package versions, date, load and the repository's commit."""
    versions = {package: _version(package) for package in PACKAGES}
    return {
        "cpu": _cpu_model(),
        "logical_cores": os.cpu_count(),
        "physical_cores": psutil.cpu_count(logical=False),
        "ram_gib": round(psutil.virtual_memory().total / GIB, 1),
        "os": platform.platform(),
        "python": platform.python_version(),
        "versions": versions,
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "load_average_at_start": [round(value, 2) for value in os.getloadavg()],
        "commit": _git_commit(repo),
    }


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "not installed"


def _cpu_model() -> str:
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text(encoding="utf-8", errors="replace").splitlines():
            if line.startswith("model name"):
                return line.partition(":")[2].strip()
    return platform.processor() or platform.machine()


def _git_commit(repo: Path) -> str | None:
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=repo, capture_output=True, text=True, check=True
        )
        status = subprocess.run(["git", "status", "--porcelain"], cwd=repo, capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return None
    return commit.stdout.strip() + (" (uncommitted changes)" if status.stdout.strip() else "")


def machine_line(machine: dict[str, Any]) -> str:
    """:func:`machine_info` in one line: CPU, cores, RAM, load at the start, commit and date."""
    return (
        f"{machine['cpu']}, {machine['logical_cores']} logical cores, {machine['ram_gib']} GiB; load at start "
        f"{machine['load_average_at_start']}; commit {machine['commit']}; {machine['date']}"
    )
