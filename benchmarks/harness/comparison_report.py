"""The report of ``compare_upstream``: per-scenario tables and the targets, as Markdown, with the JSON results."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from benchmarks.harness.comparison import Scenario, evaluate_targets, missing_reason
from benchmarks.harness.markdown import format_gib, format_metric, format_seconds, write_results
from benchmarks.harness.results import REPORTED_METRICS


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

    row("End-to-end wall time", lambda r: r.wall_s, format_seconds)
    row("Train stage", lambda r: r.stages.get("train"), format_seconds)
    row("Eval stage", lambda r: r.stages.get("eval"), format_seconds)
    if any(r is not None and "start-up" in r.stages for r in (ours, theirs)):
        row("Start-up, imports, exit", lambda r: r.stages.get("start-up"), format_seconds)
    row("Peak RSS, process tree", lambda r: r.peak_tree_rss, format_gib)
    row("Peak RSS, main process", lambda r: r.peak_main_rss, format_gib)
    if any(r is not None and r.peak_tree_pss is not None for r in (ours, theirs)):
        row("Peak PSS, process tree (1 s samples)", lambda r: r.peak_tree_pss, format_gib)
    for metric in REPORTED_METRICS:
        row(metric, lambda r, m=metric: r.metrics.get(m), format_metric)
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
        ours_rss = format_gib(ours.peak_tree_rss) if ours else _side_cell(scenario, "ours")
        ours_wall = format_seconds(ours.wall_s) if ours else "-"
        their_rss = format_gib(theirs.peak_tree_rss) if theirs else _side_cell(scenario, "upstream")
        their_wall = format_seconds(theirs.wall_s) if theirs else "-"
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
        cells = [format_metric(result.metrics.get(metric)) if result else "-" for _, result in columns]
        lines.append(f"| {metric} | " + " | ".join(cells) + " |")
    single = reference.ok("reference")
    lines.append("| Wall time | " + " | ".join(format_seconds(r.wall_s) if r else "-" for _, r in columns) + " |")
    lines.append(
        "| Peak RSS, process tree | " + " | ".join(format_gib(r.peak_tree_rss) if r else "-" for _, r in columns) + " |"
    )
    if single is None:
        lines.append("")
        lines.append(f"Single model: {missing_reason(reference)}.")
    return lines


def _header(machine: dict[str, Any], settings: dict[str, Any]) -> list[str]:
    """Title and the conditions of the run, as Markdown lines."""
    versions = ", ".join(f"{name} {version}" for name, version in machine["versions"].items())
    cores = f"{machine['logical_cores']} logical / {machine['physical_cores']} physical cores"
    if settings["ours_mode"] == "split":
        ours = "`train --evaluate false`, then `eval --root` (two processes, each with start-up and imports)"
    else:
        ours = (
            "one `train` process that also evaluates (train and eval stages as the run's `manifest.json` records "
            "them; start-up, imports and exit apart)"
        )
    upstream = "`TrainTiledEnsemble` then `EvalTiledEnsemble` in one process (its train stage includes its imports)"
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
    payload = {
        "machine": machine,
        "settings": settings,
        "scenarios": [scenario.to_dict() for scenario in scenarios],
        "targets": targets,
    }
    return (*write_results(directory, markdown, payload), markdown)
