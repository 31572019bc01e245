"""Centered reward distillation: implicit rewards from noising errors, within-prompt centring, CRD loss (methods.md §5).

KL-regularised reward maximisation ``max_p E_p[r] − β KL(p ‖ p_ref)`` has the optimum
``p*(x|c) = p_ref(x|c) exp(r(x,c)/β) / Z(c)``, i.e. ``r = β log(p*/p_ref) + β log Z(c)`` (§5.1). CRD fits the
model's *implicit reward* ``r̂_θ = log(p_θ/p_ref)`` so that ``β r̂_θ`` matches ``r``; the unknown ``β log Z(c)`` is
constant per prompt, so both sides are **centred within each prompt group** before the regression.

Implicit reward from noising errors (forward process, no trajectory likelihoods). With ``x_t = (1−t)x0 + tε`` and
``u = ε − x0``, two estimators of ``log p_θ(x0) − log p_ref(x0)`` per sample and noise draw are offered:

* ``elbo`` (derived here): the continuous-time variational bound of a flow with α = 1−t, σ_t = t has
  log-SNR ``λ(t) = 2 log((1−t)/t)``, ``−λ'(t) = 2/(t(1−t))``, and ``ε̂ − ε = (1−t)(v − u)``; so
  ``−log p(x0) ≤ E_{t~U(0,1), ε}[½(−λ') ‖ε̂ − ε‖²] + C = E[(1−t)/t · ‖v − u‖²] + C``. For models whose velocity is
  the exact flow of their own law the bound is tight pointwise (the model's path posterior equals the forward
  process), hence ``r̂ = −(1−t)/t · Σ_d[(v_θ − u)² − (v_ref − u)²]`` is an unbiased single-draw estimate of the
  log-ratio, and ``β r̂ = r − const`` at every x0 characterises exactly ``p_ref·exp(r/β)/Z``.
* ``adaptive`` (the public port, §5.3 step 4): ``r̂ = −mean_d[(v_θ−u)²/sg(mean_d|v_θ−u|) − (v_ref−u)²/mean_d|v_ref−u|]``
  (normalisers floored at 1e-5) — self-normalised, scale-free across noise levels, but not a calibrated log-ratio, so
  β is then only a relative strength.

CRD loss (§5.3 steps 5–6): ``R̂ᶜ = r̂ − sg(mean_g r̂)``, ``Rᶜ = R − mean_g R`` (g = prompt group, or the whole batch with
``centering="batch"`` as the port does), ``L = (scale/β) · mean_i (β R̂ᶜ_i − Rᶜ_i)²``. Group centring makes ``L``
and its gradient invariant to adding any per-prompt constant to ``R`` (batch centring is not), which is what lets the
prompt's log-partition cancel.

Reward-adaptive KL anchor (§5.3 step 7): ``κ_i = c_min + s_i (1 − c_min)``, ``c_min = 1e-4/β_KL``, and
``β_KL · mean_i κ_i mean_d (v_θ − v_ref^ω)²`` with the CFG-guided base ``v_ref^ω``.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from fewstep_rl.objectives._reduce import per_sample_mean, upcast
from fewstep_rl.sampling.param import expand_sigma

Weighting = Literal["elbo", "adaptive"]
Centering = Literal["group", "batch"]


def elbo_weight(t: Tensor) -> Tensor:
    """The ELBO weight ``(1 − t)/t`` of a squared velocity error at noise level ``t`` (module docstring), elementwise."""
    return (1 - t) / t


def implicit_reward(
    v: Tensor, v_ref: Tensor, u: Tensor, t: Tensor, weighting: Weighting = "adaptive", floor: float = 1e-5
) -> Tensor:
    """Per-sample implicit reward ``r̂ ≈ log p_θ(x0)/p_ref(x0)`` from one noising draw (see the module docstring).

    Args:
        v: Model velocity at ``(x_t, t)`` (with gradient), ``(B, ...)``.
        v_ref: Reference (``old``) velocity at the same point (treated as constant).
        u: Flow-matching target ``ε − x0``.
        t: Noise levels ``(B,)`` (or a scalar); only ``elbo`` uses them.
        weighting: ``elbo`` (calibrated log-ratio, summed over dims) or ``adaptive`` (port, mean over dims).
        floor: Lower bound of the ``adaptive`` normalisers.

    Returns:
        ``(B,)`` in at least float32.
    """
    v, v_ref, u = upcast(v), upcast(v_ref).detach(), upcast(u).detach()
    err, err_ref = (v - u) ** 2, (v_ref - u) ** 2
    if weighting == "elbo":
        tt = expand_sigma(torch.as_tensor(t, device=v.device, dtype=v.dtype), v)
        w = elbo_weight(tt).reshape(-1) if tt.ndim else elbo_weight(tt)
        diff = (err - err_ref).reshape(v.shape[0], -1).sum(dim=1)
        return -w * diff
    if weighting == "adaptive":
        norm = per_sample_mean((v - u).abs()).detach().clamp_min(floor)
        norm_ref = per_sample_mean((v_ref - u).abs()).clamp_min(floor)
        return -(per_sample_mean(err) / norm - per_sample_mean(err_ref) / norm_ref)
    raise ValueError(f"weighting must be 'elbo' or 'adaptive', got {weighting!r}")


def group_mean(x: Tensor, group_ids: Tensor | None) -> Tensor:
    """Per-element mean of ``x`` over its group (last dim indexes samples); ``group_ids=None``: over the whole batch.

    Shapes:
        x: ``(..., B)``; group_ids: ``(B,)``.
    """
    if group_ids is None:
        return x.mean(dim=-1, keepdim=True).expand_as(x)
    if group_ids.shape != x.shape[-1:]:
        raise ValueError(f"group_ids must have shape ({x.shape[-1]},), got {tuple(group_ids.shape)}")
    _, inv = torch.unique(group_ids.to(x.device), return_inverse=True)
    n = int(inv.max()) + 1
    flat = x.reshape(-1, x.shape[-1])
    count = torch.zeros(n, dtype=x.dtype, device=x.device).index_add_(0, inv, torch.ones_like(flat[0]))
    sums = torch.zeros(flat.shape[0], n, dtype=x.dtype, device=x.device).index_add_(1, inv, flat)
    return (sums / count)[:, inv].reshape(x.shape)


def center(x: Tensor, group_ids: Tensor, centering: Centering = "group") -> Tensor:
    """``x − mean`` over each prompt group (``group``) or over the whole batch (``batch``, the public port)."""
    if centering not in ("group", "batch"):
        raise ValueError(f"centering must be 'group' or 'batch', got {centering!r}")
    return x - group_mean(x, group_ids if centering == "group" else None)


def crd_loss(
    r_hat: Tensor, reward: Tensor, group_ids: Tensor, beta: float, centering: Centering = "group", scale: float = 5.0
) -> tuple[Tensor, dict[str, Tensor]]:
    """CRD regression ``(scale/β) · mean (β R̂ᶜ − Rᶜ)²`` (methods.md §5.3 steps 5–6).

    Args:
        r_hat: Implicit rewards ``(B,)`` or ``(T, B)`` (one row per training timestep, each regressed separately).
        reward: External reward signal ``(B,)`` (raw reward, or the port's advantage mapped to [0, 1]).
        group_ids: Prompt-group id per sample ``(B,)``; every group must be complete in this call.
        beta: β of the tilt ``p_ref·exp(r/β)``.
        centering: ``group`` (the paper's within-prompt centring) or ``batch`` (the port).
        scale: Loss scale (the port's ``A_max`` = 5).

    Returns:
        ``(loss, metrics)``; metrics: ``implicit_reward_std`` (centred), ``fit_corr`` (correlation of β R̂ᶜ and Rᶜ).
    """
    rh = upcast(r_hat)
    target = center(upcast(reward).detach().to(rh.dtype), group_ids, centering)
    rh_c = rh - center_mean_sg(rh, group_ids, centering)
    loss = crd_regression(rh_c, target, beta, scale)
    with torch.no_grad():
        pred = (beta * rh_c).reshape(-1, rh.shape[-1]).mean(0)
        denom = pred.norm() * target.norm()
        corr = (pred * target).sum() / denom if denom > 0 else torch.zeros((), device=rh.device)
        metrics = {"implicit_reward_std": rh_c.std() if rh_c.numel() > 1 else rh_c.abs().sum(), "fit_corr": corr}
    return loss, metrics


def crd_regression(
    r_hat_c: Tensor, target_c: Tensor, beta: float, scale: float = 5.0, count: int | None = None
) -> Tensor:
    """``(scale/β) · Σ (β R̂ᶜ − Rᶜ)² / count`` on already-centred inputs (count default: ``r_hat_c.numel()``).

    Lets a micro-batch of a larger group contribute its share: centre with the group means of the whole group
    (computed without gradient — they are stop-gradient anyway) and divide by the whole group's count.
    """
    if not beta > 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    resid = beta * upcast(r_hat_c) - upcast(target_c).detach()
    return (scale / beta) * (resid**2).sum() / (resid.numel() if count is None else count)


def center_mean_sg(x: Tensor, group_ids: Tensor, centering: Centering) -> Tensor:
    """The stop-gradient centring mean ``sg(mean_g x)`` of :func:`crd_loss`."""
    return (x - center(x, group_ids, centering)).detach()


def adaptive_kl_coef(signal: Tensor, kl_coef: float, c_min_numerator: float = 1e-4) -> Tensor:
    """Reward-adaptive KL weight ``κ = c_min + s (1 − c_min)``, ``c_min = 1e-4/β_KL`` (methods.md §5.3 step 7).

    ``s`` in [0, 1] (clamped): weak KL while the reward is low, full strength when it is high.
    """
    if not kl_coef > 0:
        raise ValueError(f"kl_coef must be > 0 for an adaptive coefficient, got {kl_coef}")
    c_min = min(c_min_numerator / kl_coef, 1.0)
    return c_min + upcast(signal).detach().clamp(0.0, 1.0) * (1.0 - c_min)


def velocity_kl(v: Tensor, v_ref: Tensor, coef: Tensor | float | None = None) -> Tensor:
    """``mean_i κ_i mean_d (v_θ − v_ref)²`` (the v-space KL surrogate of §5.3 step 7 and §6.4); ``coef=None``: κ = 1."""
    per = per_sample_mean((upcast(v) - upcast(v_ref).detach()) ** 2)
    if coef is None:
        return per.mean()
    return (torch.as_tensor(coef, dtype=per.dtype, device=per.device) * per).mean()


def consistency_weight(t: Tensor, weighting: Literal["uniform", "elbo"] = "uniform") -> Tensor | None:
    """Per-sample noise-level weight of CRD's self-consistency flow matching ``w(t) · mean_d ‖v_θ(x_t) − u‖²``.

    ``uniform``: ``None`` (w = 1). ``elbo``: :func:`elbo_weight`, the weight the ``elbo`` implicit reward puts on the
    same squared error, so the regression and the consistency term trade off equally at every level. With uniform
    weights the consistency term dominates at high noise, where ``(1 − t)/t → 0`` and where the mode masses are
    decided, and holds the masses back (issue 13: mode-move 74 % on ``2d-linear-s0-0``).

    Shapes: t ``(B,)`` → ``(B,)``.
    """
    if weighting == "uniform":
        return None
    if weighting == "elbo":
        return elbo_weight(t)
    raise ValueError(f"consistency weighting must be 'uniform' or 'elbo', got {weighting!r}")
