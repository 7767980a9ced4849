"""Antialiased bilinear resize as plain tensor ops, so that every export backend computes the same pixels.

``predict`` resizes images with torchvision's antialiased bilinear ``resize`` before tiling. Exported,
that op becomes ONNX ``Resize(antialias=1)``, which ONNX Runtime follows but OpenVINO's converter
does not (it drops the antialiasing: pixel values off by up to 0.5). anomalib's own exports switch
antialiasing off instead (``get_exportable_transform``), which would change what the tile models see.
This module computes torch's antialiasing filter (``aten::_upsample_bilinear2d_aa``: a triangle
filter stretched by the scale factor when shrinking, renormalised at the borders) from the input
shape inside the graph, as a gather and a weighted sum per axis, so any input size works.
"""

from __future__ import annotations

import torch

from anomalib_tiled.tiling import Size


def _axis_taps(length: int, target: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Source indices and weights, ``(target, taps)`` each, of a resize along one axis.

    Args:
        length: Input length (symbolic while exporting: the graph takes any image size).
        target: Output length.
        device: Device of the tensors.

    Returns:
        Indices into the input axis and their weights; each row's weights sum to one.
    """
    scale = torch.ones((), device=device) * length / target
    # Shrinking stretches the filter over `scale` input pixels; enlarging keeps plain bilinear support.
    support = scale.clamp(min=1.0)
    # As many taps as torch's kernel: 2 * ceil(support) + 1 (integer arithmetic keeps the shape symbolic).
    taps = 2 * ((length + target - 1) // target) + 1
    center = (torch.arange(target, device=device, dtype=torch.float32) + 0.5) * scale
    # torch truncates towards zero and then clamps at 0; on the clamped (non-negative) values that is a floor.
    start = torch.floor((center - support + 0.5).clamp(min=0))
    stop = torch.floor(center + support + 0.5).clamp(max=length)
    index = start[:, None] + torch.arange(taps, device=device, dtype=torch.float32)[None]
    weight = (1 - ((index - center[:, None] + 0.5) / support).abs()).clamp(min=0)
    weight = torch.where(index < stop[:, None], weight, torch.zeros_like(weight))
    weight = weight / weight.sum(dim=1, keepdim=True)
    return index.clamp(max=length - 1).long(), weight


def resize_antialiased(images: torch.Tensor, size: Size) -> torch.Tensor:
    """Resize ``(B, C, h, w)`` images to ``size`` like ``torchvision``'s ``resize(..., antialias=True)``.

    Args:
        images: Float images of any size.
        size: ``(height, width)`` of the result.

    Returns:
        ``(B, C, height, width)`` images (equal to the input when it already has that size).
    """
    rows, row_weights = _axis_taps(images.shape[-2], size[0], images.device)
    cols, col_weights = _axis_taps(images.shape[-1], size[1], images.device)
    # index_select with flat indices exports as one Gather; advanced indexing adds transposes around it.
    taps = images.index_select(-2, rows.flatten()).unflatten(-2, rows.shape)
    images = (taps * row_weights[:, :, None]).sum(dim=-2)
    taps = images.index_select(-1, cols.flatten()).unflatten(-1, cols.shape)
    return (taps * col_weights).sum(dim=-1)
