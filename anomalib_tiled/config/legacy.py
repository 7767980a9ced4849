"""Config files in the tiled-ensemble guide's format and the current upstream format, made canonical.

Two config formats are accepted and turned into one representation:

* the **guide format** (anomalib's tiled-ensemble guide): ``tiling: {tile_size, stride}`` with the
  image size in ``data.init_args.image_size``, ``thresholding: {method, stage}``,
  ``TrainModels: {model, metrics, trainer}``, anomalib 1.x data class names and keys;
* the **current upstream format**: ``tiling.image_size`` and ``thresholding_stage``.

Precedence when both appear: ``tiling.image_size`` wins over ``data.init_args.image_size`` and
``thresholding.stage`` wins over ``thresholding_stage`` (a warning names the dropped value).
"""

from __future__ import annotations

import copy
import logging
from typing import Any

import yaml
from jsonargparse import set_loader

from anomalib_tiled.config.components import DATA_MODULE

logger = logging.getLogger(__name__)

PARSER_MODE = "anomalib_tiled"
"""jsonargparse loader mode of the command line's parsers: YAML, then :func:`translate_legacy`."""

# anomalib 1.x names of data modules that were renamed in 2.x.
LEGACY_DATA_CLASSES = {"MVTec": "MVTecAD"}
# anomalib 1.x data-module keys with no 2.x counterpart of the same name.
LEGACY_DATA_KEYS_DROPPED = ("task",)
LEGACY_DATA_TRANSFORMS = {
    "transform": ("augmentations",),
    "train_transform": ("train_augmentations",),
    "eval_transform": ("val_augmentations", "test_augmentations"),
}


def translate_legacy(config: dict[str, Any]) -> dict[str, Any]:
    """Turn a guide-format (anomalib 1.x) or upstream-format config into the canonical format.

    The canonical format is the guide's, with ``tiling.image_size`` holding the image size and
    data-module arguments valid for anomalib 2.x.

    Args:
        config: Config as loaded from YAML; it is not modified.

    Returns:
        The translated config.
    """
    config = copy.deepcopy(config)
    data = config.get("data")
    if isinstance(data, dict):
        init_args = data.get("init_args")
        class_path = data.get("class_path")
        if isinstance(class_path, str):
            module, _, name = class_path.rpartition(".")
            if name in LEGACY_DATA_CLASSES and module in {"", DATA_MODULE}:
                data["class_path"] = f"{DATA_MODULE}.{LEGACY_DATA_CLASSES[name]}"
        if isinstance(init_args, dict):
            _translate_legacy_data_args(config, init_args)
    _rename_merge_keys(config)
    thresholding_stage = config.pop("thresholding_stage", None)
    if thresholding_stage is not None:
        thresholding = config.setdefault("thresholding", {})
        if not isinstance(thresholding, dict):
            return config
        if "stage" in thresholding and thresholding["stage"] != thresholding_stage:
            logger.warning(
                "Both thresholding.stage (%s) and thresholding_stage (%s) are set; using thresholding.stage.",
                thresholding["stage"],
                thresholding_stage,
            )
        thresholding.setdefault("stage", thresholding_stage)
    return config


RENAMED_MERGE_KEYS = {"calibration": "tile_scaling"}
"""``merge`` keys of configs and runs written before they were renamed: old name -> new name."""


def _rename_merge_keys(config: dict[str, Any]) -> None:
    merge = config.get("merge")
    if not isinstance(merge, dict):
        return
    for old, new in RENAMED_MERGE_KEYS.items():
        if old in merge:
            merge.setdefault(new, merge.pop(old))


def _translate_legacy_data_args(config: dict[str, Any], init_args: dict[str, Any]) -> None:
    image_size = init_args.pop("image_size", None)
    if image_size is not None:
        tiling = config.setdefault("tiling", {})
        if isinstance(tiling, dict):
            if tiling.get("image_size") is not None and _as_pair_list(tiling["image_size"]) != _as_pair_list(
                image_size
            ):
                logger.warning(
                    "Both tiling.image_size (%s) and data.init_args.image_size (%s) are set; using tiling.image_size.",
                    tiling["image_size"],
                    image_size,
                )
            tiling.setdefault("image_size", image_size)
    for key in LEGACY_DATA_KEYS_DROPPED:
        init_args.pop(key, None)
    for old, new_keys in LEGACY_DATA_TRANSFORMS.items():
        value = init_args.pop(old, None)
        if value is not None:
            for new in new_keys:
                init_args.setdefault(new, value)


def _as_pair_list(value: Any) -> Any:
    return [value, value] if isinstance(value, int) else list(value) if isinstance(value, list | tuple) else value


def _load_yaml(text: str) -> Any:
    value = yaml.safe_load(text)
    if isinstance(value, dict) and ({"TrainModels", "tiling", "data"} & set(value)):
        return translate_legacy(value)
    return value


def register_loader() -> None:
    """Make ``--config`` files of :data:`PARSER_MODE` parsers go through :func:`translate_legacy`."""
    set_loader(PARSER_MODE, _load_yaml, exceptions=(yaml.YAMLError,))
