"""Timestep / noise-level samplers with explicit generators (methods.md §7.5, §2.3 "Renoise level").

All samplers draw float32 values on the generator's device (so the values do not depend on where they are used)
and move them to ``device`` when given.
"""

from __future__ import annotations

import torch
from torch import Tensor


def _rand(shape: tuple[int, ...], generator: torch.Generator) -> Tensor:
    return torch.rand(shape, generator=generator, device=generator.device, dtype=torch.float32)


def _check_interval(low: float, high: float) -> None:
    if not low <= high:
        raise ValueError(f"need low <= high, got low={low}, high={high}")


def sample_uniform(
    n: int,
    generator: torch.Generator,
    low: float = 0.0,
    high: float = 1.0,
    device: torch.device | str | None = None,
) -> Tensor:
    """``n`` independent draws from ``U[low, high]`` (methods.md §7.5 "uniform").

    Args:
        n: Number of draws.
        generator: Source of randomness.
        low: Lower bound.
        high: Upper bound.
        device: Output device (default: the generator's).

    Returns:
        float32 tensor of shape ``(n,)``.
    """
    _check_interval(low, high)
    return (low + (high - low) * _rand((n,), generator)).to(device or generator.device)


def sample_logit_normal(
    n: int,
    generator: torch.Generator,
    mean: float = 0.0,
    std: float = 1.0,
    low: float = 0.0,
    high: float = 1.0,
    device: torch.device | str | None = None,
) -> Tensor:
    """``n`` draws of ``sigmoid(N(mean, std²))`` truncated to ``[low, high]`` by clamping (methods.md §7.5).

    Args:
        n: Number of draws.
        generator: Source of randomness.
        mean: Mean of the underlying normal.
        std: Std of the underlying normal (≥ 0).
        low: Lower clamp.
        high: Upper clamp.
        device: Output device (default: the generator's).

    Returns:
        float32 tensor of shape ``(n,)``.
    """
    _check_interval(low, high)
    if std < 0:
        raise ValueError(f"std must be >= 0, got {std}")
    z = torch.randn((n,), generator=generator, device=generator.device, dtype=torch.float32)
    return torch.sigmoid(mean + std * z).clamp(low, high).to(device or generator.device)


def sample_interval(
    n: int,
    generator: torch.Generator,
    low: float | Tensor,
    high: float | Tensor,
    shared: bool = False,
) -> Tensor:
    """Uniform draws on ``[low, high]``; per-sample or one value shared by the batch (methods.md §7.5).

    ``low``/``high`` may be per-sample tensors of shape ``(n,)``; with ``shared=True`` a single ``U[0, 1]`` draw
    is mapped into every sample's interval (so with scalar bounds, all ``n`` values are equal).

    Args:
        n: Batch size.
        generator: Source of randomness (rank-synchronised when ``shared`` values must agree across ranks).
        low: Lower bound(s).
        high: Upper bound(s).
        shared: One draw for the whole batch.

    Returns:
        Tensor of shape ``(n,)`` (float32, or the promoted dtype of tensor bounds), on the bounds' device if they
        are tensors, else on the generator's device.
    """
    u = _rand((1,) if shared else (n,), generator)
    ref = low if isinstance(low, Tensor) else high if isinstance(high, Tensor) else None
    if ref is not None:
        u = u.to(ref.device)
    return (low + (high - low) * u).expand(n).contiguous()


def ambient_renoise_levels(
    s: Tensor,
    generator: torch.Generator,
    offset: float = 0.01,
    clamp: tuple[float, float] = (0.02, 0.98),
) -> Tensor:
    """Renoise levels ``t ~ U[s + offset, 1]`` clamped to ``clamp`` (methods.md §2.3 "Renoise level").

    RTDMD draws ``t ∈ [1000 s + 10, 1000]``, clamps to [20, 980] and divides by 1000, uniform in the already
    shifted σ space. Here t is continuous. Note that for ``s > clamp[1]`` the clamp makes ``t < s`` (no valid
    ambient kernel); the grids used in practice never get there.

    Args:
        s: Observation levels, shape ``(B,)``.
        generator: Source of randomness.
        offset: Minimum gap ``t - s`` before clamping.
        clamp: ``(min, max)`` clamp of ``t``.

    Returns:
        Tensor like ``s``.
    """
    lo = s + offset
    u = _rand(tuple(s.shape), generator).to(device=s.device, dtype=s.dtype)
    return (lo + (1 - lo) * u).clamp(clamp[0], clamp[1])
