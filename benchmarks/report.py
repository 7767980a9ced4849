"""Benchmark report: machine facts, per-scenario tables, targets, as Markdown and JSON."""

from __future__ import annotations

import json
import os
import platform
import subprocess
from dataclasses import dataclass, field
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

import psutil

from benchmarks.sides import REPORTED_METRICS, SideResult

WALL_RATIO_TARGET = 0.25
"""End-to-end wall time of ours at most this fraction of upstream's (scenarios 1 and 2)."""
RSS_RATIO_TARGET = 0.40
"""Peak process-tree RSS of ours at most this fraction of upstream's."""
FLAT_TOLERANCE = 0.10
"""Peak RSS of ours may differ from the x1 run by at most this fraction across test-split copies."""
AUROC_TOLERANCE = 0.005
"""Image and pixel AUROC of ours at least upstream's minus this."""

GIB = 1024**3
PACKAGES = ("torch", "lightning", "anomalib", "anomalib-tiled")


@dataclass
class Scenario:
    """One measured configuration and what each side gave.

    Attributes:
        id: ``1``, ``2``, ``3-x<copies>`` or ``4``.
        title: Heading of its table.
        details: Data and geometry, one line.
        results: Side name to its measurements.
        skipped: Side name to the reason it was not run.
        copies: Test-split copies (memory scaling only).
        n_test: Test images of the data it ran on.
    """

    id: str
    title: str
    details: str
    results: dict[str, SideResult] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)
    copies: int | None = None
    n_test: int | None = None

    def ok(self, side: str) -> SideResult | None:
        """A side's result if it ran successfully."""
        result = self.results.get(side)
        return result if result is not None and result.ok else None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready copy."""
        return {
            "id": self.id,
            "title": self.title,
            "details": self.details,
            "copies": self.copies,
            "n_test": self.n_test,
            "results": {side: result.to_dict() for side, result in self.results.items()},
            "skipped": self.skipped,
        }


def machine_info(repo: Path) -> dict[str, Any]:
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


# --------------------------------------------------------------------------------------------------
# targets


def evaluate_targets(scenarios: list[Scenario]) -> list[dict[str, str]]:
    """Check the issue's targets against the measurements.

    Returns:
        One row per target and scenario: ``target``, ``scenario``, ``measured`` and ``status``
        (``met``, ``not met`` or ``not measured`` with the reason).
    """
    rows: list[dict[str, str]] = []
    by_id = {scenario.id: scenario for scenario in scenarios}
    for key in ("1", "2"):
        scenario = by_id.get(key)
        rows.append(
            _ratio_target(scenario, key, "end-to-end wall time ours <= 1/4 of upstream", "wall_s", WALL_RATIO_TARGET)
        )
    rows.extend(
        _ratio_target(scenario, scenario.id, "peak RSS ours <= 40 % of upstream", "peak_tree_rss", RSS_RATIO_TARGET)
        for scenario in scenarios
        if scenario.id in {"1", "2"} or scenario.ok("upstream")
    )
    rows.append(_flatness_target([s for s in scenarios if s.copies is not None]))
    for key in ("1", "2"):
        rows.extend(_auroc_targets(by_id.get(key), key))
    return rows


def _ratio_target(scenario: Scenario | None, key: str, target: str, attribute: str, limit: float) -> dict[str, str]:
    row = {"target": target, "scenario": key}
    ours, theirs = (scenario.ok("ours"), scenario.ok("upstream")) if scenario else (None, None)
    if ours is None or theirs is None:
        return {**row, "measured": "-", "status": f"not measured ({_missing_reason(scenario)})"}
    ratio = getattr(ours, attribute) / getattr(theirs, attribute)
    unit = _format_seconds if attribute == "wall_s" else _format_gib
    measured = (
        f"{unit(getattr(ours, attribute))} vs {unit(getattr(theirs, attribute))} = {ratio:.2f}x (limit {limit:.2f}x)"
    )
    return {**row, "measured": measured, "status": "met" if ratio <= limit else "not met"}


def _flatness_target(scaling: list[Scenario]) -> dict[str, str]:
    row = {"target": f"peak RSS ours flat (+-{FLAT_TOLERANCE:.0%}) across test-split copies", "scenario": "3"}
    measured = sorted((s.copies, s.ok("ours")) for s in scaling if s.ok("ours") is not None and s.copies is not None)
    base = next((result for copies, result in measured if copies == 1), None)
    if base is None or len(measured) < 2:
        return {**row, "measured": "-", "status": "not measured (needs x1 and at least one more copy count to succeed)"}
    changes = [(copies, result.peak_tree_rss / base.peak_tree_rss - 1) for copies, result in measured]
    text = ", ".join(f"x{copies} {_format_gib(result.peak_tree_rss)}" for copies, result in measured)
    worst = max(abs(change) for _, change in changes)
    return {
        **row,
        "measured": f"{text}; largest change vs x1 {worst:+.1%}",
        "status": "met" if worst <= FLAT_TOLERANCE else "not met",
    }


def _auroc_targets(scenario: Scenario | None, key: str) -> list[dict[str, str]]:
    rows = []
    for metric in ("image_AUROC", "pixel_AUROC"):
        row = {"target": f"{metric} ours >= upstream - {AUROC_TOLERANCE}", "scenario": key}
        ours, theirs = (scenario.ok("ours"), scenario.ok("upstream")) if scenario else (None, None)
        if ours is None or theirs is None:
            rows.append({**row, "measured": "-", "status": f"not measured ({_missing_reason(scenario)})"})
            continue
        difference = ours.metrics[metric] - theirs.metrics[metric]
        measured = f"{ours.metrics[metric]:.4f} vs {theirs.metrics[metric]:.4f} ({difference:+.4f})"
        # The epsilon keeps a difference of exactly the tolerance (in decimal) on the "met" side.
        met = difference >= -AUROC_TOLERANCE - 1e-9
        rows.append({**row, "measured": measured, "status": "met" if met else "not met"})
    return rows


def _missing_reason(scenario: Scenario | None) -> str:
    if scenario is None:
        return "scenario not run"
    reasons = [f"{side} skipped: {reason}" for side, reason in scenario.skipped.items()]
    reasons += [f"{side} failed" for side, result in scenario.results.items() if not result.ok]
    return "; ".join(reasons) or "no result"


# --------------------------------------------------------------------------------------------------
# Markdown


def _format_seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f} s"


def _format_gib(value: float | None) -> str:
    return "-" if value is None else f"{value / GIB:.2f} GiB"


def _format_metric(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def _ratio(ours: float | None, theirs: float | None) -> str:
    return "-" if ours is None or theirs is None or theirs == 0 else f"{ours / theirs:.2f}"


def _side_cell(scenario: Scenario, side: str) -> str | None:
    """Text for a side that has no numbers (skipped or failed), or None if it has numbers."""
    if side in scenario.skipped:
        return "skipped"
    result = scenario.results.get(side)
    if result is None:
        return "not run"
    return None if result.ok else "FAILED"


def comparison_table(scenario: Scenario) -> list[str]:
    """Markdown rows comparing ours and upstream on one scenario, with ratios ours/upstream."""
    lines = ["| Measure | ours | upstream | ours / upstream |", "| --- | ---: | ---: | ---: |"]
    ours, theirs = scenario.results.get("ours"), scenario.results.get("upstream")

    def row(label: str, get: Any, fmt: Any) -> None:
        values = [get(r) if r is not None and r.ok else None for r in (ours, theirs)]
        cells = [
            _side_cell(scenario, side) or fmt(value) for side, value in zip(("ours", "upstream"), values, strict=True)
        ]
        lines.append(f"| {label} | {cells[0]} | {cells[1]} | {_ratio(*values)} |")

    row("End-to-end wall time", lambda r: r.wall_s, _format_seconds)
    row("Train stage", lambda r: r.stages.get("train"), _format_seconds)
    row("Eval stage", lambda r: r.stages.get("eval"), _format_seconds)
    row("Peak RSS, process tree", lambda r: r.peak_tree_rss, _format_gib)
    row("Peak RSS, main process", lambda r: r.peak_main_rss, _format_gib)
    if any(r is not None and r.peak_tree_pss is not None for r in (ours, theirs)):
        row("Peak PSS, process tree (1 s samples)", lambda r: r.peak_tree_pss, _format_gib)
    for metric in REPORTED_METRICS:
        row(metric, lambda r, m=metric: r.metrics.get(m), _format_metric)
    return lines


def scaling_table(scaling: list[Scenario]) -> list[str]:
    """Markdown rows of peak RSS and wall time per test-split copy count."""
    lines = [
        (
            "| Test copies | Test images | ours peak RSS (tree) | ours vs x1 | ours wall time "
            "| upstream peak RSS (tree) | upstream wall time |"
        ),
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    base = next((s.ok("ours") for s in scaling if s.copies == 1), None)
    for scenario in sorted(scaling, key=lambda s: s.copies or 0):
        ours, theirs = scenario.ok("ours"), scenario.ok("upstream")
        change = f"{ours.peak_tree_rss / base.peak_tree_rss - 1:+.1%}" if ours and base else "-"
        ours_rss = _format_gib(ours.peak_tree_rss) if ours else _side_cell(scenario, "ours")
        ours_wall = _format_seconds(ours.wall_s) if ours else "-"
        their_rss = _format_gib(theirs.peak_tree_rss) if theirs else _side_cell(scenario, "upstream")
        their_wall = _format_seconds(theirs.wall_s) if theirs else "-"
        cells = [f"x{scenario.copies}", str(scenario.n_test), ours_rss, change, ours_wall, their_rss, their_wall]
        lines.append("| " + " | ".join(str(cell) for cell in cells) + " |")
    return lines


def reference_table(reference: Scenario, tiled: list[Scenario]) -> list[str]:
    """Markdown rows of the single-model metrics beside the tiled runs' metrics."""
    columns = [("single model", reference.ok("reference"))]
    for scenario in tiled:
        columns += [
            (f"ours, scenario {scenario.id}", scenario.ok("ours")),
            (f"upstream, scenario {scenario.id}", scenario.ok("upstream")),
        ]
    lines = ["| Metric | " + " | ".join(name for name, _ in columns) + " |", "| --- |" + " ---: |" * len(columns)]
    for metric in REPORTED_METRICS:
        cells = [_format_metric(result.metrics.get(metric)) if result else "-" for _, result in columns]
        lines.append(f"| {metric} | " + " | ".join(cells) + " |")
    single = reference.ok("reference")
    lines.append("| Wall time | " + " | ".join(_format_seconds(r.wall_s) if r else "-" for _, r in columns) + " |")
    lines.append(
        "| Peak RSS, process tree | "
        + " | ".join(_format_gib(r.peak_tree_rss) if r else "-" for _, r in columns)
        + " |"
    )
    if single is None:
        lines.append("")
        lines.append(f"Single model: {_missing_reason(reference)}.")
    return lines


def _header(machine: dict[str, Any], settings: dict[str, Any]) -> list[str]:
    """Title and the conditions of the run, as Markdown lines."""
    versions = ", ".join(f"{name} {version}" for name, version in machine["versions"].items())
    cores = f"{machine['logical_cores']} logical / {machine['physical_cores']} physical cores"
    if settings["ours_mode"] == "split":
        ours = "`train --evaluate false`, then `eval --root` (two processes, each with start-up and imports)"
    else:
        ours = "one `train` process that also evaluates (stage times from the run's `run.log`)"
    upstream = "`TrainTiledEnsemble` then `EvalTiledEnsemble` in one process"
    if settings["pass_init_args"]:
        upstream += ", model `init_args` passed as keyword arguments (workaround, see docs/benchmarks.md)"
    memory = (
        "maximum over 0.1 s samples of the summed RSS of the process and all its descendants (data-loader workers "
        "share pages with their parent, so the sum over-counts; the main-process peak is shown too)"
    )
    if settings.get("pss"):
        memory += "; PSS (shared pages split among their sharers) sampled once a second"
    return [
        "# anomalib-tiled vs anomalib's built-in tiled ensemble",
        "",
        f"- Date: {machine['date']}; mode: {settings['mode']}; commit: {machine['commit'] or 'unknown'}",
        (
            f"- Machine: {machine['cpu']}, {cores}, {machine['ram_gib']} GiB RAM, {machine['os']}; "
            f"load average at start {machine['load_average_at_start']}"
        ),
        f"- Software: Python {machine['python']}, {versions}",
        f"- Data: {settings['data']}",
        (
            f"- Model: {settings['model']}; seed {settings['seed']}; batch size {settings['batch_size']}; "
            f"{settings['num_workers']} data workers; accelerator {settings['accelerator']}"
        ),
        f"- Ours: {ours}.",
        f"- Upstream: {upstream}.",
        f"- Peak RSS: {memory}.",
    ]


def render_markdown(
    machine: dict[str, Any], settings: dict[str, Any], scenarios: list[Scenario], targets: list[dict[str, str]]
) -> str:
    """The whole report as Markdown."""
    lines = [*_header(machine, settings), ""]
    tiled = [s for s in scenarios if s.id in {"1", "2"}]
    for scenario in tiled:
        lines += [
            f"## Scenario {scenario.id}: {scenario.title}",
            "",
            scenario.details,
            "",
            *comparison_table(scenario),
            "",
        ]
    scaling = [s for s in scenarios if s.copies is not None]
    if scaling:
        lines += [
            "## Scenario 3: memory scaling with the test split",
            "",
            scaling[0].details,
            "",
            *scaling_table(scaling),
            "",
        ]
        skipped = {reason for s in scaling for side, reason in s.skipped.items() if side == "upstream"}
        lines += [f"Upstream skipped: {reason}" for reason in sorted(skipped)] + ([""] if skipped else [])
    reference = next((s for s in scenarios if s.id == "4"), None)
    if reference is not None:
        lines += [
            f"## Scenario 4: {reference.title}",
            "",
            reference.details,
            "",
            *reference_table(reference, tiled),
            "",
        ]
    lines += ["## Targets", "", "| Target | Scenario | Measured | Status |", "| --- | --- | --- | --- |"]
    lines += [f"| {t['target']} | {t['scenario']} | {t['measured']} | {t['status']} |" for t in targets]
    failures = [(s.id, r) for s in scenarios for r in s.results.values() if not r.ok]
    if failures:
        lines += ["", "## Failures", ""]
        lines += [f"- Scenario {key}, {result.side}: {result.error}" for key, result in failures]
    return "\n".join(lines) + "\n"


def write_report(
    directory: Path,
    machine: dict[str, Any],
    settings: dict[str, Any],
    scenarios: list[Scenario],
) -> tuple[Path, Path, str]:
    """Write ``results.md`` and ``results.json`` into ``directory``.

    Returns:
        The Markdown path, the JSON path and the Markdown text.
    """
    targets = evaluate_targets(scenarios)
    markdown = render_markdown(machine, settings, scenarios, targets)
    directory.mkdir(parents=True, exist_ok=True)
    markdown_path = directory / "results.md"
    json_path = directory / "results.json"
    markdown_path.write_text(markdown, encoding="utf-8")
    payload = {
        "machine": machine,
        "settings": settings,
        "scenarios": [scenario.to_dict() for scenario in scenarios],
        "targets": targets,
    }
    json_path.write_text(json.dumps(payload, indent=2, default=str) + "\n", encoding="utf-8")
    return markdown_path, json_path, markdown
