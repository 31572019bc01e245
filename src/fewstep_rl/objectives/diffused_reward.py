"""Diffused reward score, its proxy, and the tilted-score integral-KL direction (methods.md §3.1, §3.3; DIDR).

Notation (methods.md §1.1): ``x_t = (1-t)·x0 + t·ε``; a velocity gives ``x̂0 = x - t·v`` and the score
``s(x) = -(x - (1-t)x̂0)/t²``.

**Diffused tilted target.** The clean RLHF optimum is ``p̃_0(x0|c) ∝ p_ref(x0|c)·exp(r(x0,c)/β)``. Diffused by the
forward kernel ``q_t(x_t|x0)``,

    p̃_t(x_t) = ∫ q_t(x_t|x0) p_ref(x0) e^{r(x0)/β} dx0 / Z = p_ref,t(x_t) · E_{p_ref(x0|x_t)}[e^{r(x0)/β}] / Z,

so ``∇ log p̃_t = s_ref + s_r`` with the *Diffused Reward Score* (DRS)
``s_r(x_t) = ∇_{x_t} log E_{p_ref(x0|x_t)}[e^{r(x0)/β}]`` (:func:`gmm_diffused_reward_score` is its closed form for a
Gaussian-mixture reference and a linear reward).

**Why the integral KL has the clean tilted minimiser.** ``J(θ) = ∫ w(t) KL(p_θ,t ‖ p̃_t) dt`` with ``w > 0`` is
≥ 0 and is 0 iff ``p_θ,t = p̃_t`` for (almost) every t; the forward kernel is injective on distributions (Gaussian
convolution multiplies characteristic functions by a nowhere-zero factor), so that holds iff ``p_θ,0 = p̃_0``.
Every noise level therefore agrees on one minimiser — unlike a *terminal* reward added to a diffused KL,
``∫ w(t) KL(p_θ,t ‖ p_ref,t) dt − E[r]/β``, whose t > 0 terms are minimised by ``p_ref`` and so pull the optimum
away from ``p̃_0`` (see :mod:`fewstep_rl.objectives.kl_dmd`). The pathwise gradient of ``KL_t(p_θ,t ‖ p̃_t)`` with
respect to one clean sample ``y`` (``x_t = (1-t) y + t n``, fake score ``s_ψ ≈ ∇ log p_θ,t``) is

    ∇_y KL_t = (1-t)·(s_ψ - s_ref - s_r)(x_t) = (1-t)²/t² · (x̂0_ψ - x̂0_ref) - (1-t)·s_r(x_t),

i.e. the DMD direction with the fake clean estimate shifted to ``x̂0_ψ - t²/(1-t)·s_r`` (:func:`tilted_fake_x0`);
feeding that to :func:`~fewstep_rl.objectives.kl_dmd.kl_dmd_loss` keeps the KL scale, to
:func:`~fewstep_rl.objectives.dmd.dmd_loss` rescales each sample by a positive weight (same fixed point).

**Diffused Reward Proxy (DRP).** The DRS is intractable for images. The proxy runs K deterministic Euler steps of the
frozen reference from ``(x_t, t)`` to 0 (``D_K``), decodes, scores with a differentiable reward and takes
``s_r ≈ ∇_{x_t} r(Dec(D_K(x_t)))/β`` (:func:`drp_score`). What it costs: (i) the log-mean-exp is replaced by a plug-in
value — by the cumulant expansion ``log E[e^{r/β}] = E[r]/β + Var[r|x_t]/(2β²) + …`` the proxy keeps at most the
first term, dropping the gradient of the posterior reward variance (exactly zero for a Gaussian reference with a
linear reward, non-zero between the modes of a mixture); (ii) ``D_1`` is the posterior mean, so for a reward affine in
x0 the K = 1 proxy equals ``∇ E[r|x_t]/β`` — for a single Gaussian reference it is the exact DRS — while for K → ∞
``D_K`` tends to the probability-flow ODE map, a transport of ``p_ref,t`` onto ``p_ref`` rather than the posterior
mean: its Jacobian (``s/√((1-t)²s²+t²)`` for a Gaussian of std s) exceeds the posterior-mean Jacobian
(``(1-t)s²/((1-t)²s²+t²)``) and does not vanish as t → 1, so more steps give sharper images for an image reward but a
*larger* reward score at high noise. Tests measure both facts.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from fewstep_rl.sampling.param import expand_sigma
from fewstep_rl.sampling.trajectory import VelocityFn, sample


def tilted_fake_x0(x0_fake: Tensor, s_r: Tensor, t: Tensor | float) -> Tensor:
    """``x̂0_ψ - t²/(1-t)·s_r``: the fake clean estimate whose DMD direction is ``∝ s_ψ - s_ref - s_r`` (module doc).

    Shapes:
        x0_fake, s_r: (B, ...); t: () or (B,), with 0 < t < 1.
    """
    tt = expand_sigma(t, x0_fake).to(x0_fake.dtype)
    return x0_fake - tt**2 / (1 - tt) * s_r.to(x0_fake.dtype)


def surrogate_loss(y: Tensor, g: Tensor, reduce: str = "mean") -> Tensor:
    """``½(y − sg(y − g))²`` reduced so that ``∂L/∂y_b = g_b/numel`` (``mean``, as the normalised DMD loss) or
    ``g_b/B`` (``sample_sum``: per-sample sum, batch mean, as the KL-scaled loss); float64, returned in ``y``'s dtype.

    Used to add a reward gradient to a distribution-matching direction before taking the step (DI*-style terminal
    reward: ``g = g_DM − ∇_{x0} r/β``).

    Shapes:
        y, g: (B, ...).
    """
    if reduce not in ("mean", "sample_sum"):
        raise ValueError(f"reduce must be 'mean' or 'sample_sum', got {reduce!r}")
    y64 = y.double()
    sq = 0.5 * (y64 - (y64 - g.detach().double()).detach()) ** 2
    out = sq.mean() if reduce == "mean" else sq.reshape(y.shape[0], -1).sum(1).mean()
    return out.to(y.dtype)


def reward_input_grad(reward_fn: Callable[[Tensor], Tensor], x: Tensor) -> tuple[Tensor, Tensor]:
    """``(∇_x Σ_b r_b(x), r(x))`` for a differentiable ``reward_fn: x (B, ...) -> (B,)``, graph-free results.

    ``x`` is detached first, so no gradient reaches whatever produced it; only ``x`` is differentiated (reward and
    backbone weights are frozen or unaffected: ``torch.autograd.grad`` accumulates into no ``.grad``).
    """
    xd = x.detach().requires_grad_(True)
    with torch.enable_grad():
        r = reward_fn(xd)
        (g,) = torch.autograd.grad(r.sum(), xd)
    return g.detach(), r.detach()


def drp_denoise(velocity_fn: VelocityFn, x_t: Tensor, t: Tensor, steps: int) -> Tensor:
    """``D_K(x_t, t)``: K Euler steps of ``velocity_fn`` on the uniform per-sample grid ``t, t(K-1)/K, …, 0``.

    ``D_1(x_t) = x_t - t·v(x_t, t)`` (the reference's posterior mean). Runs with gradient (callers wrap it).

    Shapes:
        x_t: (B, ...); t: (B,). Returns (B, ...).
    """
    if steps < 1:
        raise ValueError(f"DRP needs steps >= 1, got {steps}")
    frac = torch.linspace(1.0, 0.0, steps + 1, device=x_t.device, dtype=t.dtype)
    grid = t.reshape(-1, 1) * frac.reshape(1, -1)  # (B, K+1), last column exactly 0
    return sample(velocity_fn, x_t, grid, "euler", grad="all").final  # type: ignore[return-value]


def drp_score(
    velocity_fn: VelocityFn, reward_fn: Callable[[Tensor], Tensor], x_t: Tensor, t: Tensor, steps: int, beta: float
) -> tuple[Tensor, Tensor]:
    """Diffused Reward Proxy ``s_r ≈ ∇_{x_t} r(D_K(x_t, t))/β`` (methods.md §3.1 "DRP"; costs in the module doc).

    Args:
        velocity_fn: frozen reference velocity ``(x, σ) -> v`` (CFG already applied if wanted).
        reward_fn: differentiable ``x0 (B, ...) -> r (B,)`` (decode + reward, weighted sum).
        x_t: noisy samples (detached inside).
        t: per-sample levels (B,).
        steps: K ≥ 1.
        beta: temperature β > 0.

    Returns:
        ``(s_r, r(D_K(x_t)))`` without graph.
    """
    if not beta > 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    g, r = reward_input_grad(lambda x: reward_fn(drp_denoise(velocity_fn, x, t, steps)), x_t)
    return g / beta, r


# ---------------------------------------------------------------------- exact DRS for a Gaussian-mixture reference
def gmm_score(x: Tensor, t: Tensor | float, means: Tensor, stds: Tensor, weights: Tensor) -> Tensor:
    """Exact ``∇ log p_t(x)`` of ``Σ_k W_bk N((1-t)μ_k, ((1-t)²s_k² + t²) I)`` in float64.

    Shapes:
        x: (B, d); t: () or (B,); means: (K, d) or (B, K, d); stds: (K,); weights: (B, K) (rows need not sum to 1).
    """
    x64 = x.double()
    tt = torch.as_tensor(t, dtype=torch.float64, device=x.device).expand(x.shape[0]).reshape(-1, 1)
    mu = means.to(x64).expand(x.shape[0], *means.shape[-2:])
    var = (1 - tt) ** 2 * stds.to(x64) ** 2 + tt**2  # (B, K)
    resid = x64[:, None, :] - (1 - tt)[:, :, None] * mu  # (B, K, d)
    logn = -0.5 * (resid**2).sum(-1) / var - 0.5 * x.shape[1] * torch.log(var)
    gamma = torch.softmax(torch.log(weights.to(x64).clamp_min(0)) + logn, dim=1)
    return -(gamma[..., None] * resid / var[..., None]).sum(1)


def gmm_tilt(means: Tensor, stds: Tensor, weights: Tensor, w: Tensor, beta: float) -> tuple[Tensor, Tensor]:
    """Linear tilt ``N(μ, s²I)·e^{w·x/β} ∝ N(μ + s²w/β, s²I)·e^{w·μ/β + s²‖w‖²/(2β²)}``: (means (K,d), weights (B,K)).

    Shapes:
        means: (K, d); stds: (K,); weights: (B, K); w: (d,).
    """
    mu, sd, wv = means.double(), stds.double(), w.to(means.device, torch.float64)
    new_means = mu + (sd**2)[:, None] * wv[None] / beta
    log_gain = mu @ wv / beta + sd**2 * (wv @ wv) / (2 * beta**2)
    logw = torch.log(weights.double().clamp_min(0)) + log_gain[None]
    return new_means, torch.softmax(logw, dim=1)


def gmm_diffused_reward_score(
    x: Tensor, t: Tensor | float, means: Tensor, stds: Tensor, weights: Tensor, w: Tensor, beta: float
) -> Tensor:
    """Exact DRS ``s_r = ∇ log p̃_t − ∇ log p_t`` for a Gaussian-mixture reference and ``r(x0) = w·x0 + b``.

    ``p̃_0 ∝ p·e^{w·x/β}`` is again a Gaussian mixture (:func:`gmm_tilt`), and diffusing a mixture diffuses each
    component, so both scores are closed forms (:func:`gmm_score`). Returned in ``x``'s dtype.

    Shapes:
        x: (B, d); t: () or (B,); means: (K, d); stds: (K,); weights: (B, K); w: (d,).
    """
    if not beta > 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    tm, tw = gmm_tilt(means, stds, weights, w, beta)
    return (gmm_score(x, t, tm, stds, tw) - gmm_score(x, t, means, stds, weights)).to(x.dtype)


# ---------------------------------------------------------------------- reward plumbing shared by reward-gradient methods
def differentiable_reward_fn(rewards: Any, decode: Callable[[Tensor], Tensor] | None, prompts: list[str]):
    """``x0 ↦ Σ_j λ_j r_j(Dec(x0), prompts)`` over the differentiable rewards of a ``MultiReward``.

    Raises:
        ValueError: when no configured reward is differentiable (the message lists the configured ones).
    """
    diff = rewards.differentiable_subset()
    if len(diff) == 0:
        raise ValueError(f"this method needs a differentiable reward; configured: {rewards.names}")
    return lambda x0: diff.combine(diff(decode(x0) if decode is not None else x0, prompts))


def linear_reward_direction(rewards: Any, dim: int) -> Tensor:
    """``w = Σ_j λ_j w_j`` of a ``MultiReward`` made only of toy2d ``linear`` rewards (for the exact DRS), float64.

    Raises:
        ValueError: a reward that is not linear (the closed form needs ``r(x) = w·x + b``) or of the wrong size.
    """
    w = torch.zeros(dim, dtype=torch.float64)
    for r, lam in zip(rewards.rewards, rewards.weights):
        if getattr(r, "name", None) != "linear" or not hasattr(getattr(r, "cfg", None), "w"):  # duck-typed: no rewards import
            raise ValueError(f"drs: exact needs linear rewards only, got {r.name!r}; use drs: drp")
        wr = torch.as_tensor(r.cfg.w, dtype=torch.float64)
        if wr.numel() != dim:
            raise ValueError(f"linear reward has {wr.numel()} entries but the world has d={dim}")
        w = w + lam * wr
    return w
