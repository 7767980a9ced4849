"""``report.html``: one self-contained page (plots inlined as PNG data URIs, no script, no network).

Gallery pictures are the only files the page links to, relatively (``gallery/*.png``), so the
report folder can be moved or archived whole. All text from the data is escaped.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Callable
from html import escape
from pathlib import Path
from typing import Any

from anomalib_tiled.report.data import Gallery, ReportData, load_report_data
from anomalib_tiled.report.plots import (
    f1_threshold_plot,
    image_pr_plot,
    image_roc_plot,
    pixel_roc_plot,
    pro_plot,
    score_histogram_plot,
    tile_grid_plot,
)
from anomalib_tiled.run.directory import atomic_write_text

__all__ = ["REPORT_HTML", "load_report_data", "render_report"]

REPORT_HTML = "report.html"

_STYLE = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 0 auto; max-width: 1400px;
       padding: 1.5rem 2rem; color: #1f2328; background: #fff; line-height: 1.45; }
h1 { margin-bottom: 0.2rem; } h2 { border-bottom: 1px solid #d0d7de; padding-bottom: 0.3rem; margin-top: 2rem; }
.summary { color: #57606a; margin-top: 0; }
.note { background: #fff8c5; border: 1px solid #d4a72c; border-radius: 6px; padding: 0.7rem 1rem; }
table { border-collapse: collapse; margin: 0.5rem 0; font-size: 0.95rem; }
th, td { border: 1px solid #d0d7de; padding: 0.3rem 0.7rem; text-align: left; vertical-align: top; }
th { background: #f6f8fa; } td.value { text-align: right; font-variant-numeric: tabular-nums; }
.tables { display: flex; flex-wrap: wrap; gap: 2rem; align-items: flex-start; }
.plots { display: grid; grid-template-columns: repeat(auto-fill, minmax(460px, 1fr)); gap: 1rem; }
.plots figure, .gallery figure { margin: 0; border: 1px solid #d0d7de; border-radius: 6px; padding: 0.5rem; }
.plots h3 { margin: 0 0 0.3rem; font-size: 1rem; }
img.plot { width: 100%; height: auto; display: block; }
.gallery figure { margin-bottom: 1rem; }
/* Full width: real pictures (up to three 1024-px panels) shrink, small ones grow to readable. */
.gallery img { width: 100%; height: auto; display: block; }
figcaption { font-size: 0.9rem; color: #57606a; margin-top: 0.3rem; word-break: break-all; }
.panels { color: #57606a; font-size: 0.9rem; }
"""

# (key, heading, how to draw it from the data), in page order.
_PLOTS: list[tuple[str, str, Callable[[ReportData], bytes]]] = [
    ("image_roc", "Image ROC", lambda d: image_roc_plot(d.image_roc)),
    ("image_pr", "Image precision-recall", lambda d: image_pr_plot(d.image_pr)),
    ("f1", "Image F1 vs threshold", lambda d: f1_threshold_plot(d.f1, d.image_threshold)),
    ("histogram", "Image-score histogram", lambda d: score_histogram_plot(d.histogram, d.image_threshold)),
    ("pixel_roc", "Pixel ROC", lambda d: pixel_roc_plot(d.pixel_roc)),
    ("pro", "Per-region overlap (PRO)", lambda d: pro_plot(d.pro)),
    ("tile_grid", "Tile positions", lambda d: tile_grid_plot(d.tile_grid)),
]


def render_report(data: ReportData, directory: Path) -> Path:
    """Write ``report.html`` for ``data`` into ``directory`` (its gallery pictures already there).

    Args:
        data: Report content, from :meth:`ReportCollector.finish` or :func:`load_report_data`.
        directory: Report folder.

    Returns:
        Path of the written page.
    """
    body = [
        f"<h1>{escape(data.title)}</h1>",
        f'<p class="summary">{escape(_summary(data))}</p>',
    ]
    if data.note:
        body.append(f'<div class="note" id="note">{escape(data.note)}</div>')
    body += ["<h2>Metrics</h2>", _metrics_table(data.metrics)]
    body += [
        "<h2>Run</h2>",
        '<div class="tables">',
        _key_value_table("settings", "Setting", _flatten(data.settings)),
        _key_value_table("timings", "Stage", {name: f"{seconds:.1f} s" for name, seconds in data.timings.items()}),
        "</div>",
        "<h2>Plots</h2>",
        _plots_section(data),
    ]
    if data.galleries:
        body.append("<h2>Galleries</h2>")
        body.append(
            '<p class="panels">Each picture: original | ground truth (green) | anomaly map with the '
            "predicted mask (red) and the tile grid.</p>"
        )
        body += [_gallery_section(gallery) for gallery in data.galleries]
    page = _page(data.title, "\n".join(body))
    path = Path(directory) / REPORT_HTML
    atomic_write_text(path, page)
    return path


def _page(title: str, body: str) -> str:
    return (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        f"<title>{escape(title)}</title>\n<style>{_STYLE}</style>\n</head>\n<body>\n{body}\n</body>\n</html>\n"
    )


def _summary(data: ReportData) -> str:
    """One line: how many images of which kind, and the threshold."""
    counts = data.counts
    parts = [f"{counts.get('images', 0)} images"]
    parts += [f"{counts[key]} {key}" for key in ("normal", "anomalous", "unlabeled") if counts.get(key)]
    threshold = "not set" if data.image_threshold is None else f"{data.image_threshold:.4g}"
    return ", ".join(parts) + f" · image threshold {threshold}"


def _metrics_table(metrics: dict[str, float]) -> str:
    rows = [f'<tr><td>{escape(name)}</td><td class="value">{value:.4f}</td></tr>' for name, value in metrics.items()]
    if not rows:
        rows = ['<tr><td colspan="2">No metric could be computed (see the note above).</td></tr>']
    return '<table id="metrics">\n<tr><th>Metric</th><th>Value</th></tr>\n' + "\n".join(rows) + "\n</table>"


def _key_value_table(table_id: str, heading: str, values: dict[str, str]) -> str:
    rows = [f"<tr><td>{escape(key)}</td><td>{escape(value)}</td></tr>" for key, value in values.items()]
    if not rows:
        rows = ['<tr><td colspan="2">none recorded</td></tr>']
    header = f"<tr><th>{escape(heading)}</th><th>Value</th></tr>"
    return f'<table id="{table_id}">\n{header}\n' + "\n".join(rows) + "\n</table>"


def _flatten(settings: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested settings as ``a.b.c -> text`` rows."""
    rows: dict[str, str] = {}
    for key, value in settings.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            rows.update(_flatten(value, f"{name}."))
        else:
            rows[name] = json.dumps(value, default=str) if isinstance(value, (list, tuple, dict)) else str(value)
    return rows


def _plots_section(data: ReportData) -> str:
    figures = []
    for key, heading, draw in _PLOTS:
        uri = "data:image/png;base64," + base64.b64encode(draw(data)).decode("ascii")
        figures.append(
            f'<figure id="plot-{key}"><h3>{escape(heading)}</h3>'
            f'<img class="plot" alt="{escape(heading)}" src="{uri}"></figure>'
        )
    return '<div class="plots">\n' + "\n".join(figures) + "\n</div>"


def _gallery_section(gallery: Gallery) -> str:
    parts = [f'<section class="gallery" id="gallery-{escape(gallery.key)}">', f"<h3>{escape(gallery.title)}</h3>"]
    if not gallery.items:
        parts.append("<p>No image in this gallery.</p>")
    for item in gallery.items:
        label = {None: "", True: " · predicted anomalous", False: " · predicted normal"}[item.pred_label]
        truth = {None: "", True: " · truth anomalous", False: " · truth normal"}[item.gt_label]
        caption = f"{item.image_path} · score {item.score:.4f}{label}{truth}"
        parts.append(
            f'<figure><img src="{escape(item.file)}" alt="{escape(Path(item.image_path).name)}" loading="lazy">'
            f"<figcaption>{escape(caption)}</figcaption></figure>"
        )
    parts.append("</section>")
    return "\n".join(parts)
