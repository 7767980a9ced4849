"""The models the benchmarks train, as ``{class_path, init_args}`` specs (the same in every config format)."""

from __future__ import annotations

from typing import Any

PADIM: dict[str, Any] = {"class_path": "Padim", "init_args": {"backbone": "resnet18.tv_in1k", "n_features": 100}}
"""Padim on the pretrained resnet18, loaded offline from the shared Hugging Face cache."""
RANDOM_PADIM: dict[str, Any] = {
    "class_path": "Padim",
    "init_args": {"backbone": "resnet18", "pre_trained": False, "n_features": 50},
}
"""Padim on a randomly initialised resnet18: nothing to download (smoke tests, the GPU check)."""
PATCHCORE: dict[str, Any] = {
    "class_path": "Patchcore",
    "init_args": {"backbone": "resnet18.tv_in1k", "layers": ["layer2", "layer3"], "coreset_sampling_ratio": 0.1},
}
"""PatchCore on the pretrained resnet18's layers 2 and 3, anomalib's default coreset of 10 %."""
