"""Per-step time sampling of TDM / TDM-R1 (methods.md §4.5).

For a few-step trajectory with boundaries ``σ_0 > σ_1 > … > σ_K = 0`` the query level of step ``j`` lies above the
step's lower boundary ``σ_{j+1}``, drawn uniformly in *pre-shift* time with a margin (TDM-R1: 20 of 1000 units):

    ℓ' = min(S_γ^{-1}(ℓ) + m, 1),   τ = S_γ(ℓ' + u·(1 − ℓ')),   u ~ U(0, 1),

with ``S_γ`` the static schedule shift (methods.md §1.1) and ``ℓ`` the lower bound: ``σ_{j+1}`` (generator and fake
score), ``max(σ_{j+1}, t_min)`` (generator reward query), ``max(σ_{j'+1}, t^s_min)`` (surrogate). The surrogate's
step ``j'`` is drawn with ``p_k ∝ k + 1`` (favours late, clean steps).

Deviations: levels are in σ units (the code's timesteps / 1000); the code's final ``max(τ, ℓ)`` clamp is implied
(``τ ≥ S_γ(ℓ') ≥ ℓ``).
"""

from __future__ import annotations

import torch
from torch import Tensor

from fewstep_rl.sampling.sigmas import shift_static, unshift_static


def level_above(lower: Tensor | float, u: Tensor, shift: float = 1.0, margin: float = 0.02) -> Tensor:
    """``τ = S_γ(ℓ' + u(1 − ℓ'))`` with ``ℓ' = min(S_γ^{-1}(lower) + margin, 1)`` (methods.md §4.5).

    Args:
        lower: Lower bound(s) ``ℓ`` in σ units, in [0, 1].
        u: Uniform draws in [0, 1] (one shared value or one per sample).
        shift: Static shift γ of the schedule.
        margin: Pre-shift margin above the lower bound (TDM-R1: 0.02 = 20/1000).

    Returns:
        Levels in ``[ℓ, 1]`` with the broadcast shape of ``lower`` and ``u``, in ``u``'s dtype.
    """
    lo = torch.as_tensor(lower, dtype=u.dtype, device=u.device)
    if bool((lo < 0).any()) or bool((lo > 1).any()):
        raise ValueError(f"lower bounds must lie in [0, 1], got {lo.tolist()}")
    pre = torch.clamp(unshift_static(lo, shift) + margin, max=1.0)
    return shift_static(pre + u * (1 - pre), shift)


def weighted_step(num_steps: int, generator: torch.Generator) -> int:
    """A step index ``k ∈ {0..K−1}`` with ``P(k) ∝ k + 1`` (TDM-R1 surrogate step, methods.md §4.5).

    Identical on every rank when ``generator`` is rank-synchronised.
    """
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    p = torch.arange(1, num_steps + 1, dtype=torch.float64, device=generator.device)
    return int(torch.multinomial(p / p.sum(), 1, generator=generator).item())
