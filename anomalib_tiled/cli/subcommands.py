"""Names and one-line descriptions of the ``tiled`` subcommands (imports nothing: help must be fast)."""

SUBCOMMANDS = {
    "train": "Train one model per tile position, then evaluate on the test split.",
    "eval": "Evaluate a trained run on its test split (or on another data module: --data.*).",
    "predict": "Predict unlabeled images with a trained run (--root) or an exported one (--model).",
    "export": "Export a trained run as one torch, ONNX or OpenVINO artifact for deployment.",
    "report": "Rebuild the HTML report of a run's latest evaluation.",
}
