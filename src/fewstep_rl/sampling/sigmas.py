"""Noise-level grids and schedule shifts (methods.md §1.1 "Schedule shift").

* Static shift (SD3 / SD3.5, γ = 3): ``S_γ(u) = γu / (1 + (γ-1)u)``, inverse ``σ / (γ - (γ-1)σ)``.
* Dynamic exponential shift (FLUX): ``σ = e^μ / (e^μ + (1/u - 1))``, with μ linear in the number of image tokens
  for FLUX.1 (:func:`flux_mu`).
* The raw 4-step list [1000, 750, 500, 250] maps for γ = 3 to σ = [1.0, 0.9, 0.75, 0.5], then 0 is appended.

* FLUX.2-klein: μ an empirical function of the image tokens *and* the step count (:func:`flux2_mu`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor


def shift_static(u: Tensor | float, gamma: float) -> Tensor | float:
    """Static schedule shift ``S_γ(u) = γu / (1 + (γ-1)u)`` (methods.md §1.1).

    Args:
        u: Unshifted level(s) in [0, 1].
        gamma: Shift factor γ > 0 (1 = identity, SD3 uses 3).

    Returns:
        Shifted level(s), same type as ``u``.
    """
    return gamma * u / (1 + (gamma - 1) * u)


def unshift_static(sigma: Tensor | float, gamma: float) -> Tensor | float:
    """Inverse static shift ``S_γ^{-1}(σ) = σ / (γ - (γ-1)σ)`` (methods.md §1.1).

    Args:
        sigma: Shifted level(s) in [0, 1].
        gamma: Shift factor γ > 0.

    Returns:
        Unshifted level(s) ``u`` with ``shift_static(u, gamma) == sigma``.
    """
    return sigma / (gamma - (gamma - 1) * sigma)


def shift_dynamic(u: Tensor | float, mu: float) -> Tensor | float:
    """Dynamic exponential shift ``σ = e^μ / (e^μ + (1/u - 1))`` (methods.md §1.1).

    Evaluated as ``e^μ·u / (e^μ·u + (1-u))``, which is the same expression multiplied through by ``u`` and is
    well defined at ``u = 0`` (→ 0). ``shift_dynamic(u, log γ) == shift_static(u, γ)``.

    Args:
        u: Unshifted level(s) in [0, 1].
        mu: Shift exponent μ.

    Returns:
        Shifted level(s), same type as ``u``.
    """
    e = math.exp(mu)
    return e * u / (e * u + (1 - u))


def flux_mu(
    n_tokens: int,
    base_seq: int = 256,
    max_seq: int = 4096,
    base_shift: float = 0.5,
    max_shift: float = 1.15,
) -> float:
    """FLUX.1 dynamic-shift exponent, linear in the number of image tokens (methods.md §1.1).

    ``μ = base_shift + (n_tokens - base_seq)·(max_shift - base_shift)/(max_seq - base_seq)``
    (not clamped outside ``[base_seq, max_seq]``, as in diffusers' ``calculate_shift``).

    Args:
        n_tokens: Number of image tokens (e.g. 1024 for 512 px with 2×2 patches of 8× latents).
        base_seq: Token count at which μ = ``base_shift``.
        max_seq: Token count at which μ = ``max_shift``.
        base_shift: μ at ``base_seq``.
        max_shift: μ at ``max_seq``.

    Returns:
        μ as a float.

    Raises:
        ValueError: If ``max_seq == base_seq``.
    """
    if max_seq == base_seq:
        raise ValueError(f"max_seq must differ from base_seq, got both = {base_seq}")
    slope = (max_shift - base_shift) / (max_seq - base_seq)
    return base_shift + (n_tokens - base_seq) * slope


def flux2_mu(n_tokens: int, num_steps: int) -> float:
    """FLUX.2-klein's empirical dynamic-shift exponent (``Flux2KleinPipeline``'s ``compute_empirical_mu``).

    Two lines in the token count, fitted at 10 and 200 steps, interpolated linearly in the step count
    (methods.md §1.1); beyond 4300 tokens the 200-step line alone.

    Args:
        n_tokens: Image tokens (latent side / 2, squared: 1024 at 512 px).
        num_steps: Sampler steps K.

    Returns:
        μ as a float.
    """
    m_200 = 0.00016927 * n_tokens + 0.45666666
    if n_tokens > 4300:
        return float(m_200)
    m_10 = 8.73809524e-05 * n_tokens + 1.89833333
    a = (m_200 - m_10) / 190.0
    return float(a * num_steps + m_200 - 200.0 * a)


def sigma_grid(
    num_steps: int,
    shift: float = 1.0,
    mu: float | None = None,
    raw: Sequence[float] | Tensor | None = None,
) -> Tensor:
    """Few-step σ grid: raw levels → (static or dynamic) shift → append 0 (methods.md §1.1).

    Example: ``sigma_grid(4, shift=3.0)`` = [1.0, 0.9, 0.75, 0.5, 0.0] (raw [1, 0.75, 0.5, 0.25]).

    Args:
        num_steps: Number of sampler steps K ≥ 1.
        shift: Static shift γ > 0 (ignored when 1.0).
        mu: Dynamic-shift exponent; when given, the dynamic shift is used instead of the static one
            (``shift`` must then be 1.0).
        raw: Unshifted levels in (0, 1], strictly decreasing, ``num_steps`` entries. Default
            ``linspace(1, 0, num_steps+1)[:-1]`` (i.e. [1000, 750, 500, 250]/1000 for 4 steps). Scheduler-scale
            timesteps must be divided by 1000 first.

    Returns:
        float32 tensor of shape ``(num_steps + 1,)``, strictly decreasing, ending in 0.

    Raises:
        ValueError: On a non-positive step count or shift, both ``shift`` and ``mu`` given, or invalid ``raw``.
    """
    if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 1:
        raise ValueError(f"num_steps must be an int >= 1, got {num_steps!r}")
    if not shift > 0:
        raise ValueError(f"shift must be > 0, got {shift!r}")
    if mu is not None and shift != 1.0:
        raise ValueError(f"give either a static shift or a dynamic mu, not both (shift={shift}, mu={mu})")
    if raw is None:
        u = torch.linspace(1.0, 0.0, num_steps + 1, dtype=torch.float64)[:-1]
    else:
        u = torch.as_tensor(raw, dtype=torch.float64).flatten()
        if u.numel() != num_steps:
            raise ValueError(f"raw must have num_steps={num_steps} entries, got {u.numel()}")
        if not bool(((u > 0) & (u <= 1)).all()):
            raise ValueError(f"raw levels must lie in (0, 1] (divide scheduler timesteps by 1000), got {u.tolist()}")
        if not bool((u[1:] < u[:-1]).all()):
            raise ValueError(f"raw levels must be strictly decreasing, got {u.tolist()}")
    sig = shift_dynamic(u, mu) if mu is not None else shift_static(u, shift)
    return torch.cat([sig, sig.new_zeros(1)]).to(torch.float32)
