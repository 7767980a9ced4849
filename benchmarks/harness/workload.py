"""What a benchmark trains and evaluates (data, geometry, model, seed), as the config of each side."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Workload:
    """What both sides of a scenario train and evaluate: data, geometry, model and seed.

    Attributes:
        data_root: Dataset root in MVTec AD layout.
        category: Category folder below the root.
        image_size: Side images are resized to before tiling, or ``(height, width)``.
        tile_size: Tile side.
        stride: Step between tiles (smaller than ``tile_size``: overlapping tiles).
        model: ``{class_path, init_args}`` of the model.
        seed: Seed of data splits and models.
        batch_size: Train and eval batch size.
        num_workers: Data loader workers.
        accelerator: Lightning accelerator.
        seam_smoothing: Smooth tile seams.
        execution: ``execution`` keys of ours (runner, workers...); None keeps the serial default.
        pixel_aupro: Also compute pixel AUPRO (anomalib's exact metric) on every side.
        ours_overrides: ``(dotted.key, value)`` pairs set in ours' config (e.g. ``TrainModels.calibration_share``).
    """

    data_root: Path
    category: str
    image_size: int | tuple[int, int]
    tile_size: int
    stride: int
    model: dict[str, Any]
    seed: int = 42
    batch_size: int = 32
    num_workers: int = 2
    accelerator: str = "cpu"
    seam_smoothing: bool = False
    execution: dict[str, Any] | None = None
    pixel_aupro: bool = False
    ours_overrides: tuple[tuple[str, Any], ...] = ()

    @property
    def size_hw(self) -> list[int]:
        """``[height, width]`` of the images before tiling."""
        if isinstance(self.image_size, int):
            return [self.image_size, self.image_size]
        return [int(side) for side in self.image_size]

    def data_spec(self) -> dict[str, Any]:
        """``{class_path, init_args}`` of the data module, with the split modes upstream requires spelled out."""
        return {
            "class_path": "anomalib.data.MVTecAD",
            "init_args": {
                "root": str(self.data_root),
                "category": self.category,
                "train_batch_size": self.batch_size,
                "eval_batch_size": self.batch_size,
                "num_workers": self.num_workers,
                "test_split_mode": "from_dir",
                "val_split_mode": "same_as_test",
            },
        }

    def common_config(self, default_root_dir: Path) -> dict[str, Any]:
        """Keys both config formats share."""
        return {
            "seed": self.seed,
            "accelerator": self.accelerator,
            "default_root_dir": str(default_root_dir),
            "tiling": {
                "image_size": self.size_hw,
                "tile_size": [self.tile_size, self.tile_size],
                "stride": self.stride,
            },
            "normalization_stage": "image",
            "data": self.data_spec(),
            "SeamSmoothing": {"apply": self.seam_smoothing, "sigma": 2, "width": 0.1},
        }

    def ours_config(self, default_root_dir: Path) -> dict[str, Any]:
        """Config of ``anomalib_tiled train``."""
        config = self.common_config(default_root_dir)
        config["thresholding"] = {"method": "F1AdaptiveThreshold", "stage": "image"}
        config["TrainModels"] = {
            "model": self.model,
            "metrics": {"image": ["AUROC", "F1Score"], "pixel": ["AUROC", "F1Score", *(["AUPRO"] * self.pixel_aupro)]},
        }
        config["visualization"] = {"save": True}
        if self.execution is not None:
            config["execution"] = self.execution
        for key, value in self.ours_overrides:
            *parents, name = key.split(".")
            node = config
            for parent in parents:
                node = node.setdefault(parent, {})
            node[name] = value
        return config

    def upstream_config(self, default_root_dir: Path) -> dict[str, Any]:
        """Config of upstream's pipelines (its metrics are the model's default evaluator: the same four)."""
        config = self.common_config(default_root_dir)
        config["thresholding_stage"] = "image"
        config["TrainModels"] = {"model": self.model}
        return config
