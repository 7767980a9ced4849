"""What pixel AUPRO costs: anomalib's exact ``AUPRO`` against the streaming one of anomalib_tiled.

Run as ``python -m benchmarks.aupro_memory``. Random anomaly maps (higher on the defects) with
blob-shaped masks (one image in four defect-free) are generated batch by batch with fixed seeds, so
both variants see the same data, and fed to the metric as merged batches. Each variant runs in a
fresh subprocess that reports its peak RSS (``resource.getrusage``), its RSS just before the first
batch (interpreter, torch and the metric), the seconds spent in ``update`` + ``compute`` (data
generation not counted) and the AUPRO value.

The exact metric keeps every map and mask and sorts all pixels at ``compute``: it is run on
``--exact-images`` counts only, and its cost at ``--images`` is extrapolated linearly from the two
largest (said so in the output). The streaming metric is run on the same counts, for the values,
and on ``--images``.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from typing import Any

import psutil
import torch

VARIANTS = ("exact", "streaming")


def make_batch(index: int, batch_size: int, side: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Maps and masks of batch ``index``: 1 to 4 discs per image, image ``4k`` defect-free."""
    generator = torch.Generator().manual_seed(index)
    rows, cols = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
    masks = torch.zeros(batch_size, side, side, dtype=torch.bool)
    for offset in range(1, batch_size):
        for _ in range(int(torch.randint(1, 5, (1,), generator=generator))):
            row, col = torch.randint(0, side, (2,), generator=generator).tolist()
            radius = int(torch.randint(side // 100 + 1, side // 16 + 2, (1,), generator=generator))
            masks[offset] |= (rows - row) ** 2 + (cols - col) ** 2 <= radius**2
    maps = 0.7 * torch.rand(batch_size, side, side, generator=generator) + 0.3 * masks
    return maps, masks


def _rss_mb() -> float:
    """Current resident set size of this process in MB."""
    return psutil.Process().memory_info().rss / 2**20


def measure(variant: str, images: int, batch_size: int, side: int) -> dict[str, Any]:
    """Stream ``images`` generated images through one AUPRO variant, in this process.

    Returns:
        ``value``, ``seconds`` (update + compute), ``baseline_mb`` (RSS before the first batch) and
        ``peak_mb`` (peak RSS of the process so far).
    """
    from anomalib.metrics import AUPRO  # noqa: PLC0415 - imported in the child only

    from anomalib_tiled.merge.merging import MergedBatch  # noqa: PLC0415
    from anomalib_tiled.sinks.metrics import build_metric  # noqa: PLC0415

    fields = ["anomaly_map", "gt_mask"]
    metric = AUPRO(fields=fields) if variant == "exact" else build_metric("AUPRO", "pixel", "bench", (0.0, 1.0))
    baseline = _rss_mb()
    seconds = 0.0
    for index in range(0, images, batch_size):
        maps, masks = make_batch(index // batch_size, min(batch_size, images - index), side)
        batch = MergedBatch(
            image_path=[str(i) for i in range(len(maps))],
            anomaly_map=maps,
            pred_score=maps.amax(dim=(1, 2)),
            gt_mask=masks,
        )
        start = time.perf_counter()
        metric.update(batch)
        seconds += time.perf_counter() - start
        del maps, masks, batch
    start = time.perf_counter()
    value = float(metric.compute())
    seconds += time.perf_counter() - start
    # kB on Linux; the kernel updates the high-water mark lazily, so it can trail the current RSS.
    peak = max(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, _rss_mb())
    return {"value": value, "seconds": seconds, "baseline_mb": baseline, "peak_mb": peak}


def run_child(variant: str, images: int, batch_size: int, side: int) -> dict[str, Any]:
    """:func:`measure` in a fresh interpreter, so that its peak RSS is its own."""
    command = [sys.executable, "-m", "benchmarks.aupro_memory", "--child", variant, "--images", str(images)]
    command += ["--batch-size", str(batch_size), "--side", str(side)]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        msg = f"{variant} AUPRO on {images} images failed (exit {done.returncode}): {done.stderr.strip()[-500:]}"
        raise RuntimeError(msg)
    return {"variant": variant, "images": images, **json.loads(done.stdout.strip().splitlines()[-1])}


def extrapolate(rows: list[dict[str, Any]], images: int) -> dict[str, float]:
    """Peak RSS growth over baseline and seconds at ``images``, on the line through the two largest runs."""
    small, large = sorted(rows, key=lambda row: row["images"])[-2:]
    reach = (images - large["images"]) / (large["images"] - small["images"])

    def growth(row: dict[str, Any]) -> float:
        return row["peak_mb"] - row["baseline_mb"]

    return {
        "growth_mb": growth(large) + (growth(large) - growth(small)) * reach,
        "seconds": large["seconds"] + (large["seconds"] - small["seconds"]) * reach,
    }


def print_table(rows: list[dict[str, Any]]) -> None:
    """One line per run: variant, images, AUPRO, seconds, baseline, peak and growth of RSS."""
    print(f"{'variant':<10} {'images':>6} {'AUPRO':>9} {'seconds':>8} {'base MB':>8} {'peak MB':>8} {'growth MB':>9}")
    for row in rows:
        growth = row["peak_mb"] - row["baseline_mb"]
        print(
            f"{row['variant']:<10} {row['images']:>6} {row['value']:>9.6f} {row['seconds']:>8.1f} "
            f"{row['baseline_mb']:>8.0f} {row['peak_mb']:>8.0f} {growth:>9.0f}"
        )


def main(argv: list[str] | None = None) -> int:
    """Run every variant in its own subprocess and print the comparison."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=332, help="images of the split (83 x 4 by default)")
    parser.add_argument("--exact-images", type=int, nargs="+", default=[24, 48], help="image counts for the exact")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--side", type=int, default=1024, help="side of the square maps in pixels")
    parser.add_argument("--child", choices=VARIANTS, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(measure(args.child, args.images, args.batch_size, args.side)))
        return 0
    rows = []
    for images in sorted(set(args.exact_images)):
        rows += [run_child(variant, images, args.batch_size, args.side) for variant in VARIANTS]
    rows.append(run_child("streaming", args.images, args.batch_size, args.side))
    print_table(rows)
    exact = [row for row in rows if row["variant"] == "exact"]
    if len(exact) >= 2 and args.images > max(row["images"] for row in exact):
        guess = extrapolate(exact, args.images)
        print(
            f"exact at {args.images} images (extrapolated linearly from {exact[-2]['images']} and "
            f"{exact[-1]['images']}, not measured): ~{guess['growth_mb'] / 1024:.1f} GB growth, "
            f"~{guess['seconds']:.0f} s"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
