"""Child process of the accuracy benchmark: evaluate one trained run of ours with several variants.

Run by path (``python ours_variants.py --root RUN --variants VARIANTS.json --result OUT.json``).
``VARIANTS.json`` maps a variant name to its ``anomalib tiled eval`` options; each variant is one
call of the CLI's own ``main(["eval", "--root", RUN, *options])`` in this one process, so the
~10 s of imports are paid once per run instead of once per variant. ``OUT.json`` maps every name to
``{"exit": status, "metrics_file": path of the eval/vN/metrics.json it wrote, or null}``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def main() -> None:
    """Evaluate the run once per variant; write each variant's exit status and metrics file."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, required=True, help="run directory of 'anomalib tiled train'")
    parser.add_argument("--variants", type=Path, required=True, help="JSON: variant name -> eval options")
    parser.add_argument("--result", type=Path, required=True, help="JSON file for each variant's outcome")
    args = parser.parse_args()
    variants: dict[str, list[str]] = json.loads(args.variants.read_text(encoding="utf-8"))

    from anomalib_tiled.cli import main as cli  # noqa: PLC0415 - imported after parsing (~10 s)

    outcome = {}
    for name, options in variants.items():
        before = set((args.root / "eval").glob("v*"))
        status = cli(["eval", "--root", str(args.root), *options])
        written = sorted(set((args.root / "eval").glob("v*")) - before)
        metrics = written[0] / "metrics.json" if len(written) == 1 else None
        outcome[name] = {"exit": status, "metrics_file": str(metrics) if metrics and metrics.is_file() else None}
    args.result.write_text(json.dumps(outcome, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
