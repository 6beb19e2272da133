"""Moving tensors between the host and a GPU in as few copies as possible.

A GPU run of SDXL is bound by its host: every copy is an operator to launch, and a
copy from pageable host memory waits for the GPU to finish its queue. So the per-step state of
isolated attention moves in few copies: many tensors as one flat buffer (``move_together``),
and host-to-GPU copies from pinned memory, asynchronously (``to_device``).
"""
from __future__ import annotations

import torch

__all__ = ["concrete_device", "move_together", "to_device"]


def concrete_device(device) -> torch.device:
    """``device`` as tensors report it ("cuda" -> "cuda:0"), so it compares equal to theirs."""
    return torch.empty(0, device=device).device


def to_device(t: torch.Tensor, device: torch.device, dtype: torch.dtype | None = None) -> torch.Tensor:
    """``t`` on ``device`` in ``dtype``; from the host to a GPU through pinned memory, without
    waiting for the GPU (the pinned buffer is kept until the copy is done by torch's caching
    host allocator)."""
    device = torch.device(device)  # only its type is read: no need to make it concrete
    if dtype is not None and t.dtype != dtype and t.device.type == "cpu":
        t = t.to(dtype)  # convert on the host, then copy the converted values once
    if device.type == "cuda" and t.device.type == "cpu":
        return t.pin_memory().to(device, dtype, non_blocking=True)
    return t.to(device, dtype)


def move_together(tensors: list[torch.Tensor], device: torch.device,
                  dtype: torch.dtype | None = None) -> list[torch.Tensor]:
    """The tensors on ``device`` (in ``dtype``, default the first tensor's) in one copy: flattened
    into one buffer, moved, and viewed back in their shapes. Tensors already there in that
    dtype are returned as they are. Give ``device`` as tensors report it ("cuda:0", see
    ``concrete_device``): "cuda" compares unequal to a tensor's "cuda:0"."""
    if not tensors:
        return []
    device, dtype = torch.device(device), dtype or tensors[0].dtype
    if all(t.device == device and t.dtype == dtype for t in tensors):
        return list(tensors)
    flat = torch.cat([t.reshape(-1).to(dtype) for t in tensors])  # (Σ numel,) on the source device
    flat = to_device(flat, device) if flat.device != device else flat
    moved, offset = [], 0
    for t in tensors:
        moved.append(flat[offset:offset + t.numel()].view(t.shape))
        offset += t.numel()
    return moved
