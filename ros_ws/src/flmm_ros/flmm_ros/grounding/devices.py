"""Host-to-device copies that do not stall the GPU's queue.

A copy from ordinary (pageable) host memory to a CUDA device synchronises the stream before it starts, so the
host waits for every kernel already queued; from pinned memory with `non_blocking=True` it is queued like a
kernel. Token ids and preprocessed frames go to the GPU this way. (PyTorch's caching host allocator keeps a
pinned block alive until its copy has completed, so the source may go out of scope at once.)
"""
from __future__ import annotations

import torch


def to_device(tensor: torch.Tensor, device: torch.device | str, dtype: torch.dtype | None = None) -> torch.Tensor:
    """`tensor` on `device` (and in `dtype`); from pinned memory without blocking when the device is CUDA."""
    device = torch.device(device)
    if device.type == "cuda" and tensor.device.type == "cpu":
        tensor = tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device, dtype) if dtype is not None else tensor.to(device)


def ids_tensor(ids: list[int], device: torch.device | str) -> torch.Tensor:
    """A (1, len(ids)) int64 tensor of token ids on `device`."""
    return to_device(torch.tensor([ids], dtype=torch.long), device)
