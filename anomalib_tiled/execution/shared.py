"""Tile models that share one feature extractor, run as one: its batched call, then each tile's own head.

Padim and PatchCore tile models start with a frozen pretrained extractor (anomalib's
``TimmFeatureExtractor``) and differ only in what follows it: Padim's feature subset (``idx``, drawn per
tile) and Gaussian, PatchCore's memory bank. When the extractors of several tile models are
identical *by content* (:func:`extractor_digest`: their parameters, buffers and configuration),
:class:`SharedExtractorTiles` runs that extractor once, with every tile of the batch on the batch
axis, then each tile model's own head, and holds one copy of it (an exported graph stores it once).

Sharing is never assumed: tile models trained with ``pre_trained: false`` have random per-tile
extractors, whose digests differ, and keep running one model at a time, like every other model class.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from anomalib.data import InferenceBatch
from anomalib.models import AnomalibModule, Padim, Patchcore
from anomalib.models.image.padim.torch_model import PadimModel
from anomalib.models.image.patchcore.torch_model import PatchcoreModel
from anomalib.pre_processing import PreProcessor
from torch import nn

from anomalib_tiled.config.model_spec import ModelSpec

Features = dict[str | int, torch.Tensor]

# What of an extractor's configuration changes its forward pass (besides its modules and tensors).
_EXTRACTOR_SETTINGS = (
    "backbone",
    "layers",
    "idx",
    "requires_grad",
    "output_fmt",
    "return_class_token",
    "norm",
    "_uses_intermediates",
)


@dataclass(frozen=True)
class Head:
    """What a torch model does around its feature extractor, as two steps.

    Attributes:
        prepare: ``(model, pre-processed input) -> extractor input`` (what ``forward`` does before
            the extractor).
        finish: ``(model, features, input size) -> InferenceBatch`` (what ``forward`` does after it, in
            eval mode).
    """

    prepare: Callable[[nn.Module, torch.Tensor], torch.Tensor]
    finish: Callable[[nn.Module, Features, torch.Size], InferenceBatch]


def _padim_head(model: PadimModel, features: Features, size: torch.Size) -> InferenceBatch:
    """``PadimModel.forward`` after its extractor: the tile's feature subset, Gaussian and map."""
    embeddings = model.generate_embedding(features)
    anomaly_map = model.anomaly_map_generator(
        embedding=embeddings,
        mean=model.gaussian.mean,
        inv_covariance=model.gaussian.inv_covariance,
        image_size=size,
    )
    return InferenceBatch(pred_score=torch.amax(anomaly_map, dim=(-2, -1)), anomaly_map=anomaly_map)


def _padim_input(model: PadimModel, inputs: torch.Tensor) -> torch.Tensor:
    del model
    return inputs


def _patchcore_input(model: PatchcoreModel, inputs: torch.Tensor) -> torch.Tensor:
    return inputs.type(model.memory_bank.dtype)


def _patchcore_head(model: PatchcoreModel, features: Features, size: torch.Size) -> InferenceBatch:
    """``PatchcoreModel.forward`` after its extractor: pooling, embedding, the tile's memory bank, map."""
    pooled = {layer: model.feature_pooler(feature) for layer, feature in features.items()}
    embedding = model.generate_embedding(pooled)
    batch_size, _, width, height = embedding.shape
    embedding = model.reshape_embedding(embedding)
    if model.memory_bank.size(0) == 0:
        msg = "Memory bank is empty. Cannot provide anomaly scores"
        raise ValueError(msg)
    patch_scores, locations = model.nearest_neighbors(embedding=embedding, n_neighbors=1)
    patch_scores = patch_scores.reshape((batch_size, -1))
    locations = locations.reshape((batch_size, -1))
    pred_score = model.compute_anomaly_score(patch_scores, locations, embedding)
    patch_scores = patch_scores.reshape((batch_size, 1, width, height))
    anomaly_map = model.anomaly_map_generator(patch_scores, size)
    return InferenceBatch(pred_score=pred_score, anomaly_map=anomaly_map)


HEADS: dict[type[nn.Module], Head] = {
    PadimModel: Head(_padim_input, _padim_head),
    PatchcoreModel: Head(_patchcore_input, _patchcore_head),
}
"""Torch model class (exactly: a subclass may change ``forward``) -> its steps around the extractor."""

SHARING_MODELS = (Padim, Patchcore)
"""The anomalib model classes whose tile models are grouped (their torch models are in :data:`HEADS`)."""


def may_share_extractor(spec: ModelSpec) -> bool:
    """Whether the tile models of a run are worth grouping (loading them together to compare digests).

    Only the models with a head, and only when their extractor is pretrained: ``pre_trained: false``
    draws a random extractor per tile (seeded by its position), which no other tile has.
    """
    return issubclass(spec.model_class, SHARING_MODELS) and spec.init_args.get("pre_trained", True) is not False


def _extractor(model: nn.Module) -> nn.Module | None:
    """The feature extractor of a tile model that can run as a head after a shared one, else None."""
    inner = getattr(model, "model", None)
    if type(inner) not in HEADS or getattr(inner, "tiler", None) is not None:
        return None
    # A tile model's own post-processing would follow its forward: the ensemble's tile models have none.
    if getattr(model, "post_processor", None) is not None:
        return None
    # Pre-processing is replayed as anomalib's PreProcessor does it (its transform); another one runs alone.
    if type(getattr(model, "pre_processor", None)) not in {PreProcessor, type(None)}:
        return None
    extractor = getattr(inner, "feature_extractor", None)
    return extractor if isinstance(extractor, nn.Module) else None


def module_digest(module: nn.Module) -> str:
    """sha256 of a module's architecture, forward settings, parameters and buffers."""
    digest = hashlib.sha256()
    digest.update(f"{type(module).__module__}.{type(module).__qualname__}\n{module!r}\n".encode())
    for name in _EXTRACTOR_SETTINGS:
        digest.update(f"{name}={getattr(module, name, None)!r}\n".encode())
    for name, tensor in sorted(module.state_dict(keep_vars=True).items()):
        value = tensor.detach().to("cpu").contiguous()
        digest.update(f"{name}:{value.dtype}:{tuple(value.shape)}\n".encode())
        digest.update(value.reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


def extractor_digest(model: nn.Module) -> str | None:
    """Digest of a tile model's feature extractor (:func:`module_digest`), None if it cannot be shared."""
    extractor = _extractor(model)
    return None if extractor is None else module_digest(extractor)


@dataclass(frozen=True)
class ExtractorGroup:
    """Tile models (by index) whose feature extractors are identical, or one model that runs alone.

    Attributes:
        indices: Indices of the models, ascending.
        digest: Their extractor's digest; None for a model that cannot share one.
    """

    indices: tuple[int, ...]
    digest: str | None

    @property
    def shared(self) -> bool:
        """Whether the group runs one batched extractor call (two or more identical extractors)."""
        return self.digest is not None and len(self.indices) > 1


def group_by_extractor(models: Sequence[nn.Module]) -> list[ExtractorGroup]:
    """Group tile models by the digest of their feature extractor (a pure function of the models).

    Args:
        models: Loaded tile models (any anomalib model).

    Returns:
        The groups, ordered by their first model; a model that cannot share, or whose extractor no
        other model has, is a group of its own.
    """
    known: dict[int, str | None] = {}  # an extractor instance several models hold is hashed once
    members: dict[str | int, list[int]] = {}
    for index, model in enumerate(models):
        extractor = _extractor(model)
        if extractor is not None and id(extractor) not in known:
            known[id(extractor)] = module_digest(extractor)
        digest = None if extractor is None else known[id(extractor)]
        members.setdefault(digest if digest is not None else -1 - index, []).append(index)
    return [
        ExtractorGroup(tuple(indices), key if isinstance(key, str) else None)
        for key, indices in sorted(members.items(), key=lambda item: item[1][0])
    ]


def share_extractor(model: nn.Module, extractors: dict[str, nn.Module]) -> None:
    """Give ``model`` the identical extractor already in ``extractors`` (by digest), dropping its own copy.

    Loading tile models one at a time through this keeps one copy of a shared extractor in memory.
    """
    extractor = _extractor(model)
    if extractor is None:
        return
    digest = module_digest(extractor)
    if digest in extractors:
        model.model.feature_extractor = extractors[digest]
    else:
        extractors[digest] = extractor


class SharedExtractorTiles(nn.Module):
    """Tile models of one :class:`ExtractorGroup` run as one.

    Each tile's input goes through its model's own pre-processing and input step, the tiles are
    stacked on the batch axis, the extractor runs once, and each tile model's head gets its share of
    the features. The module holds the extractor once: the tile models' own copies are removed.

    Args:
        models: The tile models of a shared :class:`ExtractorGroup` (they are changed: their
            extractors are dropped).

    Raises:
        ValueError: If a model has no extractor that can be shared.
    """

    def __init__(self, models: Sequence[AnomalibModule]) -> None:
        super().__init__()
        extractors = [_extractor(model) for model in models]
        if not extractors or any(extractor is None for extractor in extractors):
            msg = f"SharedExtractorTiles takes tile models of {[c.__name__ for c in SHARING_MODELS]}"
            raise ValueError(msg)
        self.extractor = extractors[0]
        for model in models:
            del model.model.feature_extractor
        self.tiles = nn.ModuleList(models)

    def forward(self, tiles: Sequence[torch.Tensor]) -> list[InferenceBatch]:
        """Predict ``tiles[j]`` (a ``(B, 3, h, w)`` batch) with tile model ``j``, as its ``forward`` would.

        Pre-processing is each model's ``PreProcessor.forward`` (its exportable transform), as in
        ``AnomalibModule.forward``.
        """
        models = zip(self.tiles, tiles, strict=True)
        return self.predict([model.pre_processor(x) if model.pre_processor else x for model, x in models])

    def predict(self, inputs: Sequence[torch.Tensor]) -> list[InferenceBatch]:
        """Predict pre-processed tile batches: one extractor call for all of them, then each tile's head.

        Args:
            inputs: ``inputs[j]``: tile model ``j``'s pre-processed ``(B, 3, h, w)`` batch (every
                ``B``, ``h`` and ``w`` alike: the tiles of one grid).
        """
        heads = [HEADS[type(model.model)] for model in self.tiles]
        prepared = [head.prepare(model.model, x) for head, model, x in zip(heads, self.tiles, inputs, strict=True)]
        # Tile-major on the batch axis, so that unflattening gives each tile its own rows back.
        features = self.extractor(torch.stack(prepared).flatten(0, 1))
        per_tile = {layer: value.unflatten(0, (len(prepared), -1)) for layer, value in features.items()}
        return [
            head.finish(model.model, {layer: value[j] for layer, value in per_tile.items()}, prepared[j].shape[-2:])
            for j, (head, model) in enumerate(zip(heads, self.tiles, strict=True))
        ]


class SeparateTiles(nn.Module):
    """Tile models that run one at a time (their ``forward``): what does not share an extractor.

    Args:
        models: The tile models.
    """

    def __init__(self, models: Sequence[AnomalibModule]) -> None:
        super().__init__()
        self.tiles = nn.ModuleList(models)

    def forward(self, tiles: Sequence[torch.Tensor]) -> list[InferenceBatch]:
        """Predict ``tiles[j]`` with tile model ``j``."""
        return [model(x) for model, x in zip(self.tiles, tiles, strict=True)]


def tile_units(models: Sequence[AnomalibModule]) -> list[tuple[tuple[int, ...], nn.Module]]:
    """The tile models as units that run together: one per shared group, one per other model.

    Returns:
        ``(model indices, unit)`` pairs; a unit maps the tiles of its indices to their predictions.
    """
    units: list[tuple[tuple[int, ...], nn.Module]] = []
    for group in group_by_extractor(models):
        members = [models[index] for index in group.indices]
        units.append((group.indices, SharedExtractorTiles(members) if group.shared else SeparateTiles(members)))
    return units
