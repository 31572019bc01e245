"""Stratified noise levels for forward-process RL losses (CRD / DiffusionNFT, methods.md §5.3 step 2, §7.5)."""

from __future__ import annotations

import torch
from torch import Tensor


def stratified_levels(
    n: int,
    low: float,
    high: float,
    generator: torch.Generator,
    batch: int | None = None,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """``n`` levels, one uniform draw in each of ``n`` equal strata of ``[low, high]``, in random order.

    Args:
        n: Number of levels (strata).
        low, high: Interval, ``0 <= low < high <= 1``.
        generator: The only source of randomness (its device is used).
        batch: ``None``: one level per stratum shared by the whole batch, shape ``(n,)`` (the port's shared
            timesteps; pass a rank-synchronised generator); an int ``B``: independent strata per sample, ``(n, B)``.
        dtype: Output dtype.
    """
    if n < 1:
        raise ValueError(f"need n >= 1 levels, got {n}")
    if not 0.0 <= low < high <= 1.0:
        raise ValueError(f"need 0 <= low < high <= 1, got [{low}, {high}]")
    dev = generator.device
    cols = 1 if batch is None else batch
    u = torch.rand(n, cols, generator=generator, device=dev, dtype=torch.float64)
    order = torch.argsort(torch.rand(n, cols, generator=generator, device=dev, dtype=torch.float64), dim=0)
    strata = (order.to(torch.float64) + u) / n
    out = (low + (high - low) * strata).to(dtype)
    return out[:, 0] if batch is None else out
