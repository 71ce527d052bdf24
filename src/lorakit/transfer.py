"""Host-to-device copies in the training step that do not make the CPU wait for the GPU.

A plain `tensor.to("cuda")` of a tensor in ordinary (pageable) host memory synchronises: PyTorch waits for the
copy, and the copy waits for every kernel already queued on the stream. Each such copy in a step (latents, token
ids, loss weights, size conditioning, a schedule table) stops the CPU until the GPU has caught up, so the CPU's
share of the next step — fetching the batch, tokenising, launching kernels — cannot overlap the GPU's work on the
current one. Copied from pinned memory with `non_blocking=True`, the copy is queued on the stream like a kernel
(ordered before the kernels that read it), and PyTorch's pinned-memory cache keeps the staging block until the
copy has run. On a CPU run every call here is a plain `.to`.
"""

from __future__ import annotations

import torch

__all__ = ["to_device"]


def to_device(tensor: torch.Tensor, device: torch.device | str, dtype: torch.dtype | None = None) -> torch.Tensor:
    """`tensor.to(device, dtype)` without a host-device synchronisation when it moves host memory to a GPU."""
    device = torch.device(device)
    if device.type == "cuda" and tensor.device.type == "cpu":
        staged = tensor if tensor.is_pinned() else tensor.pin_memory()
        return staged.to(device=device, dtype=dtype, non_blocking=True)
    return tensor.to(device=device, dtype=dtype)
