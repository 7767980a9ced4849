"""Shared weights: large tensors stored once per run, by content, and referenced by tile checkpoints.

Tile models often hold identical tensors: a frozen pretrained backbone or teacher (PatchCore, Padim,
FastFlow, STFPM, EfficientAD, ReverseDistillation...) is the same in every tile, next to a few MB
of the tile's own weights. When a tile checkpoint is saved, every ``state_dict`` tensor of at least
:data:`SHARE_MIN_BYTES` goes to ``weights/shared/<sha256>.safetensors`` and the checkpoint keeps a
reference (name → sha256) under :data:`REFERENCES_KEY` instead.

A shared file holds one tensor in the safetensors layout (8-byte header length, JSON header with
dtype, shape and offsets, raw little-endian bytes), written by this module so that its bytes depend
on the tensor's dtype, shape and content only. Its name is the sha256 of those bytes: identical
tensors get the same file whatever their names or the model's settings, and tensors that differ
(random-init backbones, seeded per tile) get their own; nothing is assumed, everything is compared.
A file is written to a temporary name and renamed, so workers writing the same tensor at once
leave one complete file. Loading reads the raw bytes (no pickle involved).
"""

from __future__ import annotations

import copy
import hashlib
import json
import struct
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from anomalib_tiled.errors import RunDirectoryError
from anomalib_tiled.run.directory import atomic_path, file_digest, shared_file, shared_file_error

SHARE_MIN_BYTES = 64 * 1024
"""Tensors this large or larger are stored once in the run; smaller ones (biases, norms) stay in the checkpoint."""

REFERENCES_KEY = "anomalib_tiled_shared_weights"
"""Checkpoint key of the references: ``{"format", "names" (state_dict order), "tensors" (name → sha256)}``."""

REFERENCES_FORMAT = 1

_DTYPES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}
_TORCH_DTYPES = {name: dtype for dtype, name in _DTYPES.items()}


def shareable(tensor: Any) -> bool:
    """Whether ``tensor`` goes to the shared store: a plain dense tensor of a known dtype, large enough."""
    return (
        type(tensor) in {torch.Tensor, torch.nn.Parameter}
        and tensor.layout == torch.strided
        and tensor.dtype in _DTYPES
        and tensor.device.type != "meta"
        and tensor.numel() * tensor.element_size() >= SHARE_MIN_BYTES
    )


def encode(tensor: torch.Tensor) -> tuple[bytes, memoryview]:
    """The shared file's bytes for ``tensor``: its header and its raw data (a view, not a copy)."""
    flat = tensor.detach().to("cpu").contiguous().reshape(-1)
    data = memoryview(flat.view(torch.uint8).numpy())
    info = {"dtype": _DTYPES[tensor.dtype], "shape": list(tensor.shape), "data_offsets": [0, data.nbytes]}
    header = json.dumps({"tensor": info}, separators=(",", ":")).encode()
    header += b" " * (-len(header) % 8)  # safetensors aligns the data to 8 bytes
    return struct.pack("<Q", len(header)) + header, data


def tensor_digest(tensor: torch.Tensor) -> str:
    """sha256 of the tensor's shared file: a digest of its dtype, shape and bytes."""
    header, data = encode(tensor)
    digest = hashlib.sha256(header)
    digest.update(data)
    return digest.hexdigest()


class SharedWeights:
    """The content-addressed tensor store of one run (``weights/shared/``).

    Args:
        directory: The run's ``weights`` folder (the tile checkpoints' folder; the run is its parent).
    """

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)

    def path(self, digest: str) -> Path:
        """File of the tensor whose digest is ``digest``."""
        return shared_file(self.directory, digest)

    def put(self, tensor: torch.Tensor) -> dict[str, Any]:
        """Store ``tensor`` unless an intact file of it is there already; its size and sha256."""
        header, data = encode(tensor)
        hasher = hashlib.sha256(header)
        hasher.update(data)
        entry = {"size": len(header) + data.nbytes, "sha256": hasher.hexdigest()}
        path = self.path(entry["sha256"])
        if path.is_file() and path.stat().st_size == entry["size"] and file_digest(path) == entry:
            return entry
        # Same content, same name: concurrent writers each rename a complete file onto it.
        with atomic_path(path) as temporary, temporary.open("wb") as handle:
            handle.write(header)
            handle.write(data)
        return entry

    def get(self, digest: str) -> torch.Tensor:
        """The tensor stored under ``digest``.

        Raises:
            RunDirectoryError: If its file is missing or not a shared weights file.
        """
        path = self.path(digest)
        if not path.is_file():
            raise shared_file_error(path, "missing", self.directory.parent)
        buffer = bytearray(path.stat().st_size)
        with path.open("rb") as handle:
            handle.readinto(buffer)
        try:
            (length,) = struct.unpack_from("<Q", buffer)
            info = json.loads(bytes(buffer[8 : 8 + length]))["tensor"]
            dtype, shape, (start, end) = _TORCH_DTYPES[info["dtype"]], info["shape"], info["data_offsets"]
            count = (end - start) // torch.empty((), dtype=dtype).element_size()
            return torch.frombuffer(buffer, dtype=dtype, count=count, offset=8 + length + start).reshape(shape)
        except (struct.error, ValueError, KeyError, TypeError, RuntimeError):
            raise shared_file_error(path, "not a shared weights file", self.directory.parent) from None


def share(checkpoint: Mapping[str, Any], store: SharedWeights) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Move the checkpoint's large ``state_dict`` tensors to ``store``, leaving references.

    Returns:
        The checkpoint to save (everything else, plus the references) and the size and sha256 of
        each shared file it references, sorted by sha256.
    """
    state = checkpoint["state_dict"]
    kept = copy.copy(state)  # keeps the state_dict's type and version metadata
    references: dict[str, str] = {}
    files: dict[str, dict[str, Any]] = {}
    for name, tensor in state.items():
        if shareable(tensor):
            entry = store.put(tensor)
            references[name] = entry["sha256"]
            files[entry["sha256"]] = entry
            del kept[name]
    if not references:
        return dict(checkpoint), []
    reference = {"format": REFERENCES_FORMAT, "names": list(state), "tensors": references}
    return {**checkpoint, "state_dict": kept, REFERENCES_KEY: reference}, [files[key] for key in sorted(files)]


def has_references(checkpoint: Mapping[str, Any]) -> bool:
    """Whether the checkpoint references shared files (checkpoints of older runs do not)."""
    return REFERENCES_KEY in checkpoint


def join(checkpoint: Mapping[str, Any], store: SharedWeights, origin: Path) -> dict[str, Any]:
    """The full checkpoint, as it was before :func:`share`: references replaced by their tensors.

    Args:
        checkpoint: A loaded tile checkpoint (with or without references).
        store: The run's shared weights.
        origin: The checkpoint's file, named in errors.

    Raises:
        RunDirectoryError: If a referenced file is missing or corrupt, or the references are of an
            unknown format.
    """
    joined = dict(checkpoint)
    reference = joined.pop(REFERENCES_KEY, None)
    if reference is None:
        return joined
    if not isinstance(reference, dict) or reference.get("format") != REFERENCES_FORMAT:
        msg = f"{origin}: the tile checkpoint references shared weights of an unknown format; upgrade anomalib-tiled"
        raise RunDirectoryError(msg)
    kept, tensors = joined["state_dict"], reference["tensors"]
    loaded = {digest: store.get(digest) for digest in set(tensors.values())}
    state = copy.copy(kept)
    state.clear()
    for name in reference["names"]:
        if name in tensors:
            state[name] = loaded[tensors[name]]
        elif name in kept:
            state[name] = kept[name]
    joined["state_dict"] = state
    return joined
