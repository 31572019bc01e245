"""DGPO group preference loss on denoising errors, with TDM-R1's masks (methods.md §4.6(b), §6.6).

Per sample ``i`` of group ``g`` (all K samples of one prompt, with shared noise and level), with per-sample DSM errors
``ℓ_θ`` (trained model), ``ℓ_ref`` (frozen reference), ``ℓ_old`` (old snapshot) and advantages ``A``:

* group weight (stop-grad) ``ω_g = sigmoid(β · mean_{i∈g} A_i (ℓ_θ,i − ℓ_ref,i))``; this is the gradient of the
  group DPO loss ``−log sigmoid(−β mean_g A (ℓ_θ − ℓ_ref))`` up to the constant ``β/K``;
* trust region vs old: ``ρ = exp(ℓ_old − ℓ_θ)``; the sample gets no gradient if (A > 0 and ρ > 1 + ε) or
  (A < 0 and ρ < 1 − ε);
* reference mask: when the scalar drift ``R = mean (D_θ − T)²`` exceeds ``threshold``, samples that already moved the
  preferred way relative to the reference ((A > 0 and ℓ_θ < ℓ_ref) or (A < 0 and ℓ_θ > ℓ_ref)) get no gradient;
* ``L = mean_i(ω_{g(i)} A_i ℓ̃_i) + λ_R·R`` where ``ℓ̃`` is ``ℓ_θ`` with the masked entries detached.

Positive-advantage samples are pushed to a lower denoising error than the reference, negative ones to a higher, so
``D_θ − T`` points toward preferred samples (the surrogate's implicit reward is ``ℓ_ref − ℓ_θ``).

Groups must be complete in the tensors passed (one rank, one micro-batch); the mean over a group divides by its
size K.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fewstep_rl.objectives._reduce import per_sample_mean, upcast


def per_sample_mse(pred: Tensor, target: Tensor) -> Tensor:
    """``mean_d (pred − target)²`` per sample, shape ``(B,)`` (at least float32)."""
    return per_sample_mean((upcast(pred) - upcast(target)) ** 2)


def group_mean(x: Tensor, group_ids: Tensor) -> Tensor:
    """Per-sample mean of ``x`` over its group, shape ``(B,)``."""
    _, inv = torch.unique(group_ids, return_inverse=True)
    n = int(inv.max()) + 1 if inv.numel() else 0
    s = torch.zeros(n, dtype=x.dtype, device=x.device).index_add_(0, inv, x)
    c = torch.zeros(n, dtype=x.dtype, device=x.device).index_add_(0, inv, torch.ones_like(x))
    return (s / c)[inv]


def dgpo_group_weights(l_theta: Tensor, l_ref: Tensor, adv: Tensor, group_ids: Tensor, beta: float) -> Tensor:
    """``ω_g = sigmoid(β · mean_{i∈g} A_i (ℓ_θ,i − ℓ_ref,i))`` per sample (detached).

    Shapes:
        l_theta, l_ref, adv, group_ids: (B,).
    """
    with torch.no_grad():
        z = upcast(adv) * (upcast(l_theta) - upcast(l_ref))
        return torch.sigmoid(beta * group_mean(z, group_ids.to(z.device)))


def dgpo_keep_mask(
    l_theta: Tensor,
    l_ref: Tensor,
    adv: Tensor,
    l_old: Tensor | None = None,
    clip_eps: float | None = None,
    drift: Tensor | float | None = None,
    drift_threshold: float = 0.05,
) -> tuple[Tensor, Tensor, Tensor]:
    """Samples that keep their gradient: ``(keep, trust_masked, ref_masked)`` boolean ``(B,)`` tensors.

    Trust region (needs ``l_old`` and ``clip_eps``) and reference mask (needs ``drift``), see the module docstring.
    """
    with torch.no_grad():
        lt, lr, a = upcast(l_theta), upcast(l_ref), upcast(adv)
        trust = torch.zeros_like(lt, dtype=torch.bool)
        if l_old is not None and clip_eps is not None:
            rho = torch.exp(upcast(l_old) - lt)
            trust = ((a > 0) & (rho > 1 + clip_eps)) | ((a < 0) & (rho < 1 - clip_eps))
        ref = torch.zeros_like(trust)
        if drift is not None and float(torch.as_tensor(drift).detach()) > drift_threshold:
            ref = ((a > 0) & (lt < lr)) | ((a < 0) & (lt > lr))
        return ~(trust | ref), trust, ref


def dgpo_loss(
    l_theta: Tensor,
    l_ref: Tensor,
    adv: Tensor,
    group_ids: Tensor,
    beta: float,
    *,
    l_old: Tensor | None = None,
    clip_eps: float | None = None,
    drift: Tensor | None = None,
    drift_threshold: float = 0.05,
    drift_weight: float = 0.0,
) -> tuple[Tensor, dict[str, Tensor]]:
    """DGPO loss ``mean_i(ω_g A_i ℓ̃_i) + λ_R·R`` with TDM-R1's masks (methods.md §4.6(b)).

    Args:
        l_theta: Per-sample DSM errors of the trained model ``(B,)`` (with gradient).
        l_ref: Per-sample DSM errors of the frozen reference ``(B,)``.
        adv: Advantages ``(B,)``.
        group_ids: Group id per sample ``(B,)``; groups must be complete.
        beta: β_dpo of the group weight.
        l_old: Per-sample DSM errors of the old snapshot (trust-region mask), or None.
        clip_eps: Trust-region ε, or None (no trust-region mask).
        drift: Scalar ``R = mean (D_θ − T)²`` with gradient, or None (no reference mask, no drift term).
        drift_threshold: Reference mask applies when ``R`` exceeds this.
        drift_weight: ``λ_R`` of the drift regulariser (TDM-R1: 0.001).

    Returns:
        ``(loss, metrics)``; metrics (detached): ``omega_mean``, ``trust_masked``, ``ref_masked`` (fractions).

    Shapes:
        l_theta, l_ref, adv, group_ids, l_old: (B,); drift: ().
    """
    if not l_theta.shape == l_ref.shape == adv.shape == group_ids.shape or l_theta.ndim != 1:
        raise ValueError(
            f"l_theta, l_ref, adv and group_ids must all be (B,), got {tuple(l_theta.shape)}, {tuple(l_ref.shape)}, "
            f"{tuple(adv.shape)}, {tuple(group_ids.shape)}"
        )
    lt = upcast(l_theta)
    omega = dgpo_group_weights(lt, l_ref, adv, group_ids, beta)
    keep, trust, ref = dgpo_keep_mask(lt, l_ref, adv, l_old, clip_eps, drift, drift_threshold)
    l_eff = torch.where(keep, lt, lt.detach())
    loss = (omega * upcast(adv).detach() * l_eff).mean()
    if drift is not None and drift_weight:
        loss = loss + drift_weight * upcast(drift)
    metrics = {"omega_mean": omega.mean(), "trust_masked": trust.float().mean(), "ref_masked": ref.float().mean()}
    return loss, metrics


def tilt_regression_loss(v_phi: Tensor, v_ref: Tensor, u: Tensor, v_gen: Tensor, adv: Tensor, beta: float) -> Tensor:
    """TDM-R1's β-regime surrogate loss (methods/tdm_r1.py): a regression of the surrogate onto a tilted target,

    ``L = mean_i ‖v_φ(x_t) − sg[v_ref(x_t) + A_i·(u_i − v_gen(x_t))/β]‖²/d``  (per-dimension mean, then batch mean),

    shapes: ``v_phi``, ``v_ref``, ``u``, ``v_gen`` ``(B, ...)`` velocities at the same ``(x_t, t)`` (``u`` the DSM
    target of sample i, ``v_gen`` ≈ E_gen[u | x_t], the generator's own velocity — the fake score), ``adv`` ``(B,)``
    advantages in reward units. Its minimiser is ``E[target | x_t] = v_ref + Cov_gen(A, u | x_t)/β`` (because
    ``E[u − v_gen | x_t] = 0``), the fixed point ``D = T + Cov(r, u | x_t)/β`` of the advantage-weighted DSM
    ``mean(A·ℓ_φ) + β·mean‖v_φ − v_ref‖²`` — but as a convex regression for every β: the weighted DSM's quadratic
    coefficient ``E[A | x_t] + β`` turns negative wherever a low-noise ``x_t`` has ``E[A | x_t] < −β``, and that loss
    then diverges (seen on toy2d at β = 0.25 after ~600 iterations).
    """
    a = upcast(adv).detach().reshape(-1, *[1] * (u.ndim - 1))
    with torch.no_grad():
        target = upcast(v_ref) + a * (upcast(u) - upcast(v_gen)) / beta
    return per_sample_mse(v_phi, target).mean()
