"""Contenders of the inference benchmarks: exported artifacts, and monitored children that time them.

Each child (:mod:`benchmarks.children.inference_child`) measures one contender in its own process, so
that its peak memory is its own.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from benchmarks.harness.launch import Launcher, process_error
from benchmarks.harness.ours import ours_command


def run_child(launcher: Launcher, kind: str, target: Path, images: Path, work: Path, **extra: Any) -> dict[str, Any]:
    """One monitored child of :mod:`benchmarks.children.inference_child`; its numbers and peak RSS."""
    result = work / f"{kind}.json"
    command = launcher.child("inference_child.py", "--kind", kind, "--target", str(target))
    command += ["--images", str(images), "--result", str(result)]
    command += [item for key, value in extra.items() for item in (f"--{key}", str(value))]
    process = launcher.run(command, work / "logs" / kind, work)
    if (error := process_error(process, kind)) is not None:
        raise RuntimeError(error)
    return {**json.loads(result.read_text(encoding="utf-8")), "peak_rss": process.peak_tree_rss}


def export_artifact(launcher: Launcher, run: Path, export_format: str, work: Path) -> int:
    """Export ``run`` with ``python -m anomalib_tiled export``; the artifact's size in bytes (metadata aside)."""
    artifact = work / "artifacts" / export_format
    command = ours_command(launcher, "export", "--root", str(run), "--format", export_format, "--output", str(artifact))
    process = launcher.run(command, work / "logs" / export_format, work)
    if (error := process_error(process, f"export {export_format}")) is not None:
        raise RuntimeError(error)
    return sum(f.stat().st_size for f in artifact.iterdir() if f.name != "metadata.json")


def folder_size(path: Path) -> int:
    """Bytes of every file below ``path`` (links not followed)."""
    return sum(item.stat().st_size for item in path.rglob("*") if item.is_file() and not item.is_symlink())
