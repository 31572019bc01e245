"""Small reduction helpers shared by the objectives."""

from __future__ import annotations

import torch
from torch import Tensor


def upcast(t: Tensor) -> Tensor:
    """Promote half-precision tensors to float32 (losses are reduced in at least float32)."""
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


def per_sample_mean(t: Tensor) -> Tensor:
    """Mean over all non-batch dims: ``(B, ...) -> (B,)``."""
    return t.mean(dim=tuple(range(1, t.ndim))) if t.ndim > 1 else t


def weighted_batch_mean(per_sample: Tensor, weight: Tensor | float | None) -> Tensor:
    """``mean_b(w_b · l_b)``; ``weight`` is None, a scalar, or shape ``(B,)``."""
    if weight is None:
        return per_sample.mean()
    w = torch.as_tensor(weight, device=per_sample.device, dtype=per_sample.dtype)
    return (w * per_sample).mean()
