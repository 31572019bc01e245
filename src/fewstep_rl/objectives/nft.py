"""DiffusionNFT's implicit positive/negative policy loss on the forward process (methods.md §6.4).

Given a clean sample ``x0`` with optimality probability ``r̃ ∈ [0, 1]`` (advantages mapped by
:func:`~fewstep_rl.objectives.advantages.advantages_to_unit`), a noised ``x_t = (1−t)x0 + tε`` and the current and
old velocities, the *implicit* positive and negative policies are

    v⁺ = β v_θ + (1 − β) v_old,          v⁻ = (1 + β) v_old − β v_θ,

and the loss trains ``v⁺`` to denoise the positive samples and ``v⁻`` the negative ones:

    L = (A_max/β) · mean_i[ r̃_i ‖x̂0(v⁺) − x0‖²/w⁺_i + (1 − r̃_i) ‖x̂0(v⁻) − x0‖²/w⁻_i ],   x̂0(v) = x_t − t v,

with self-normalising weights ``w^± = sg(mean_d |x̂0(v^±) − x0|)`` (floored) and ``‖·‖² = mean_d``. Its optimum moves
``v_θ`` from ``v_old`` toward the positive (reward-weighted) distribution's velocity by a step ∝ 1/β (DiffusionNFT,
Zheng et al. 2025, arXiv 2509.16117, Theorem "policy improvement"); there is no fixed tilt temperature.

On-policy gradient (``v_θ = v_old``, no self-normalisation, ``r̃ = ½ + A/(2A_max)`` unclipped): ``v⁺ = v⁻ = v_old``
and ``∂L/∂v = 2t²·A·(v − u)/d`` with ``u = ε − x0`` — the gradient of the advantage-weighted flow-matching loss
``A·‖x̂0(v) − x0‖²``, independent of β and A_max (:func:`nft_policy_loss` with ``normalize=False`` and any real
``r_unit``). That is the β-regime of ``methods/nft.py``.
"""

from __future__ import annotations

from torch import Tensor

from fewstep_rl.objectives._reduce import per_sample_mean, upcast
from fewstep_rl.sampling.param import x0_from_v


def nft_policy_loss(
    v: Tensor,
    v_old: Tensor,
    x_t: Tensor,
    x0: Tensor,
    t: Tensor,
    r_unit: Tensor,
    beta: float,
    a_max: float = 5.0,
    floor: float = 1e-5,
    normalize: bool = True,
) -> tuple[Tensor, dict[str, Tensor]]:
    """DiffusionNFT positive/negative loss (see the module docstring).

    Args:
        v: Current velocity at ``(x_t, t)`` (with gradient), ``(B, ...)``.
        v_old: Old-snapshot velocity (treated as constant).
        x_t: Noised samples; x0: clean samples; t: levels ``(B,)``.
        r_unit: Optimality probabilities ``(B,)`` in [0, 1] (any real values with ``normalize=False``: the loss stays
            a convex quadratic in ``v`` of curvature ∝ A_max·β·t², since the two weights sum to 1).
        beta: NFT guidance strength β > 0.
        a_max: Loss scale (advantage clip, 5).
        floor: Lower bound of the self-normalising weights.
        normalize: Divide by the self-normalising weights ``w^±`` (paper); False: ``w^± = 1``.

    Returns:
        ``(loss, metrics)`` with ``pos_loss`` and ``neg_loss`` (unweighted per-sample means).
    """
    if not beta > 0:
        raise ValueError(f"NFT beta must be > 0, got {beta}")
    v, v_old = upcast(v), upcast(v_old).detach()
    x_t, x0 = upcast(x_t).detach(), upcast(x0).detach()
    v_pos = beta * v + (1 - beta) * v_old
    v_neg = (1 + beta) * v_old - beta * v
    e_pos = x0_from_v(x_t, t, v_pos) - x0
    e_neg = x0_from_v(x_t, t, v_neg) - x0
    if normalize:
        w_pos = per_sample_mean(e_pos.abs()).detach().clamp_min(floor)
        w_neg = per_sample_mean(e_neg.abs()).detach().clamp_min(floor)
    else:
        w_pos = w_neg = 1.0
    pos, neg = per_sample_mean(e_pos**2), per_sample_mean(e_neg**2)
    r = upcast(r_unit).detach().to(pos.dtype)
    loss = (a_max / beta) * (r * pos / w_pos + (1 - r) * neg / w_neg).mean()
    return loss, {"pos_loss": pos.detach().mean(), "neg_loss": neg.detach().mean()}
