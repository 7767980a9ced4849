"""Offline backbones at their real sizes: a local Hugging Face cache entry holding seeded random weights.

Nothing can be downloaded here, and the only real ImageNet weights at hand are resnet18's (``../shared``).
To measure sizes and times of the users' backbone (wide_resnet50_2, 95 MiB up to layer 3), a cache
entry is written where timm looks for its default pretrained tag, with weights drawn from a fixed
seed: the same tensors in every tile, shapes and FLOPs of the real network, features of no value.
"""

from __future__ import annotations

from pathlib import Path

SNAPSHOT = "0" * 40
"""Revision name of the written snapshots (any name works offline once ``refs/main`` points at it)."""


def write_seeded_backbone(hf_home: Path, backbone: str, seed: int = 0) -> str:
    """Write ``backbone``'s default pretrained cache entry under ``hf_home`` with seeded random weights.

    Args:
        hf_home: Folder used as ``HF_HOME`` (the entry goes to ``hub/models--timm--<name>``).
        backbone: A timm model name (``wide_resnet50_2``).
        seed: Seed of the weights.

    Returns:
        The Hugging Face id the entry stands for (``timm/wide_resnet50_2.racm_in1k``).
    """
    import timm  # noqa: PLC0415 - heavy; only when a cache is written
    import torch  # noqa: PLC0415
    from safetensors.torch import save_file  # noqa: PLC0415
    from timm.models import get_pretrained_cfg  # noqa: PLC0415

    hub_id = get_pretrained_cfg(backbone).hf_hub_id
    entry = hf_home / "hub" / f"models--{hub_id.replace('/', '--')}"
    weights = entry / "snapshots" / SNAPSHOT / "model.safetensors"
    if not weights.is_file():
        torch.manual_seed(seed)
        state = {key: value.contiguous() for key, value in timm.create_model(backbone).state_dict().items()}
        weights.parent.mkdir(parents=True, exist_ok=True)
        save_file(state, str(weights))
        (entry / "refs").mkdir(exist_ok=True)
        (entry / "refs" / "main").write_text(SNAPSHOT, encoding="utf-8")
    return hub_id


def link_shared_backbones(hf_home: Path, shared_cache: Path) -> None:
    """Make the entries of a read-only cache (``../shared/hf-cache``) visible in ``hf_home`` too."""
    hub = hf_home / "hub"
    hub.mkdir(parents=True, exist_ok=True)
    for entry in sorted((shared_cache / "hub").glob("models--*")):
        link = hub / entry.name
        if not link.exists():
            link.symlink_to(entry.resolve(), target_is_directory=True)
