"""DiffusionNFT: online diffusion RL on the forward process with implicit positive/negative policies (baseline, §6.4).

Paper: Zheng et al., "DiffusionNFT: Online Diffusion Reinforcement with Forward Process" (arXiv 2509.16117);
reference code ``NVlabs/DiffusionNFT`` (``scripts/train_nft_sd3.py``, ``config/nft.py``), as summarised in
methods.md §6.4.

Roles: ``generator`` (trainable adapter, ``v_θ``), ``old`` (snapshot blended toward the generator; it both produces
the rollouts and is the reference of the implicit policies), ``ema`` (evaluation EMA), ``teacher`` (frozen base,
KL reference).

Each iteration (``batch_size`` prompts × ``group_size`` samples per rank) is the recipe:

1. Rollouts (no grad) of the ``old`` snapshot with any solver (paper: 10-step ODE, no CFG; here the configured chain).
2. Rewards → GRPO advantages (group mean, std over every rank) clipped to ±A_max → optimality probability
   ``r̃ = clip(A)/(2A_max) + ½`` (§1.5).
3. Per micro-batch (whole groups), for ``train_timesteps`` levels t (stratified, shared by the batch and ranks):
   ``x_t = (1−t)x0 + tε``, ``v⁺ = β v_θ + (1−β) v_old``, ``v⁻ = (1+β) v_old − β v_θ``,
   ``L = (A_max/β)·mean[r̃ ‖x̂0(v⁺) − x0‖²/w⁺ + (1−r̃) ‖x̂0(v⁻) − x0‖²/w⁻]`` with self-normalising
   ``w^± = sg(mean|x̂0(v^±) − x0|)`` (``fewstep_rl.objectives.nft``), plus ``kl_coef·mean_d (v_θ − v_ref)²``.
   One optimiser step per micro-batch.
4. ``θ_old ← d θ_old + (1−d) θ`` with ``d(n) = min(d0 + κ (n − n0)_+, d_max)`` (paper default 0, 0.001, 0, 0.5), EMA.

Target distribution and β. ``regime: paper`` (sd3/shapes presets): each update moves ``v_θ`` from ``v_old`` toward
the velocity of the positive policy ``π⁺ ∝ r̃ π_old`` by a step ∝ 1/``nft_beta`` (the paper's policy-improvement
result); iterated with the moving ``old`` it climbs the reward with no fixed tilt temperature (its strength is
``nft_beta`` and the standardised advantages), and ``beta`` is only the evaluation temperature.

``regime: tilt`` (toy2d preset) makes ``beta`` the training temperature. Derivation: on-policy (``old`` = θ, i.e.
``old_d0 = old_kappa = old_dmax = 0`` and ``opt_steps_per_epoch: 1``) and without the self-normalising weights, the
NFT gradient is exactly that of the advantage-weighted flow-matching loss ``A·t²‖v − u‖²`` (``u = ε − x0``,
:mod:`fewstep_rl.objectives.nft`) — NFT's policy-improvement step toward the reward-weighted old policy, taken at
first order. With raw leave-one-out advantages (reward units, baseline independent of the sample) and the KL term
``β·t²‖v − v_ref‖²`` (same t-weighting), the stationary point at every ``(x_t, t)`` is
``E[A(v − u)|x_t] + β(v − v_ref) = 0``, i.e. ``v = v_ref + Cov_θ(r, u | x_t)/β`` (using ``E[u|x_t] = v`` on-policy).
The tilt ``p* ∝ p_ref·e^{r/β}`` satisfies ``∂v_λ/∂λ = Cov_λ(r, u|x_t)`` along ``λ = 1/β``, so this fixed point **is**
the exact tilt whenever that covariance does not change along the tilt path — Gaussian components with a linear
reward (a mean shift leaves the posterior covariance unchanged; toy2d's default world) — and its first-order (in
1/β) approximation otherwise: for mixtures whose tilt moves mass between modes it under- or over-reweights the
modes. Measured (toy2d preset, r = x_1): mean reward 1.003 at β = 0.25 and 0.263 at β = 1 against the closed-form
1.0 and 0.25 (energy to the tilt 0.006 / 0.0007, floor 0.0004); on one prompt covering both Gaussians (±2, r = x_1/2,
β = 2, tilt moves the right mode's mass 0.50 → 0.731) 300 epochs reach mass 0.688 and 87 % of the reward gain —
under-reweighted, as the first-order fixed point predicts. README "β regimes". ``nft_beta``, ``adv_clip`` and ``norm_floor`` do not enter the
on-policy gradient in this regime (A_max only sets the curvature of the quadratic, i.e. the trust region).

Deviations from the paper:
    * Timesteps are stratified over [t_min, t_max] in σ (the paper samples over its rollout schedule's steps).
    * Few-step use: rollouts with the generator's few-step chain (toy2d: many Euler steps; shapes: the 4-step
      x0-predict-and-renoise chain); the paper uses 10-step dpm2 rollouts of a multi-step model.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
from torch import Tensor

from fewstep_rl.config import knob
from fewstep_rl.distributed import over_ranks
from fewstep_rl.method import FewStepMethod
from fewstep_rl.objectives import advantages_to_unit, regime_advantages
from fewstep_rl.objectives.crd import velocity_kl
from fewstep_rl.objectives.nft import nft_policy_loss
from fewstep_rl.optim import OptimConfig, renamed_flat_keys
from fewstep_rl.rewards import RolloutScores
from fewstep_rl.roles import EMA, blend_role, schedule_decay
from fewstep_rl.sampling import Transition, forward_noise, sample
from fewstep_rl.sampling.stratified import stratified_levels

ROLES: tuple[str, ...] = ("generator",)


@dataclass
class DiffusionNFTConfig:
    """Hyper-parameters of DiffusionNFT (defaults: the paper's where scale-free; see configs/nft/*.yaml)."""

    # old keys fail with the new name (config.build)
    RENAMED: ClassVar[dict[str, str]] = renamed_flat_keys()

    beta: float = knob(1.0, "β of the target p_ref·exp(r/β): trains with regime tilt (KL coef); else evaluation only")
    regime: Literal["paper", "tilt"] = knob(
        "paper", "paper: NFT as published; tilt: raw leave-one-out advantages, no self-normalising weights, KL β·t²"
    )
    nft_beta: float = knob(1.0, "NFT guidance strength β of v± (paper: 1; 0.1 for OCR / multi-reward)")
    batch_size: int = knob(4, "prompts per epoch per rank")
    group_size: int = knob(8, "samples per prompt K (paper: 24)")
    num_steps: int = knob(4, "sampling steps of the rollout chain (paper: 10)")
    shift: float = knob(1.0, "static schedule shift γ of the σ-grid (SD3: 3.0)")
    transition: str = knob("euler", "rollout/eval chain: euler (ODE) or cps(1.0) (predict x0 and re-noise)")
    optim: OptimConfig = knob(
        help="AdamW of the generator (paper LoRA: lr 3e-4)",
        factory=lambda: OptimConfig(lr=3e-4, adam_betas=[0.9, 0.999], weight_decay=1e-4, grad_clip=1.0),
    )
    opt_steps_per_epoch: int = knob(2, "optimiser steps per epoch; micro-batches of whole prompt groups")
    train_timesteps: int = knob(4, "noise levels per sample per epoch (paper: ⌊0.99·10⌋ = 9)")
    t_min: float = knob(0.01, "lowest training noise level")
    t_max: float = knob(0.99, "highest training noise level")
    adv_clip: float = knob(5.0, "A_max: advantage clip and loss scale")
    norm_floor: float = knob(1e-5, "floor of the self-normalising weights")
    kl_coef: float = knob(1e-4, "coefficient of the v-space KL to the base (paper: 1e-4; 0 = off; regime tilt: β·t²)")
    kl_guidance: float = knob(1.0, "CFG of the KL reference (paper: the unguided base, 1)")
    old_d0: float = knob(0.0, "old snapshot decay d(n) = min(d0 + κ (n − n0)_+, d_max): d0")
    old_kappa: float = knob(0.001, "old snapshot decay slope κ")
    old_n0: int = knob(0, "old snapshot decay start n0")
    old_dmax: float = knob(0.5, "old snapshot decay cap")
    ema_decay: float = knob(0.0, "evaluation EMA decay per optimiser step (0 = evaluate the generator)")

    def __post_init__(self) -> None:
        if self.batch_size < 1 or self.group_size < 2 or self.num_steps < 1:
            raise ValueError("need batch_size >= 1, group_size >= 2 (GRPO groups) and num_steps >= 1")
        if not self.beta > 0 or not self.nft_beta > 0:
            raise ValueError(f"beta and nft_beta must be > 0, got {self.beta}, {self.nft_beta}")
        if self.opt_steps_per_epoch < 1 or self.batch_size % self.opt_steps_per_epoch:
            raise ValueError(
                f"opt_steps_per_epoch ({self.opt_steps_per_epoch}) must divide batch_size ({self.batch_size}): "
                "micro-batches hold whole prompt groups"
            )
        if self.train_timesteps < 1:
            raise ValueError(f"train_timesteps must be >= 1, got {self.train_timesteps}")
        if not 0.0 < self.t_min < self.t_max <= 1.0:
            raise ValueError(f"need 0 < t_min < t_max <= 1, got {self.t_min}, {self.t_max}")
        if self.adv_clip <= 0 or self.kl_coef < 0 or self.norm_floor <= 0:
            raise ValueError("adv_clip and norm_floor must be > 0 and kl_coef >= 0")
        if not (0.0 <= self.old_d0 <= 1.0 and 0.0 <= self.old_dmax <= 1.0) or self.old_kappa < 0 or self.old_n0 < 0:
            raise ValueError("old decay: need d0, d_max in [0, 1], kappa >= 0 and n0 >= 0")
        if not 0.0 <= self.ema_decay <= 1.0:
            raise ValueError(f"ema_decay must lie in [0, 1], got {self.ema_decay}")
        Transition.parse(self.transition)


class DiffusionNFT(FewStepMethod):
    """DiffusionNFT: forward-process positive/negative policy loss, old snapshot as sampler and reference."""

    name = "nft"
    paper = "Zheng et al. 2025, DiffusionNFT: Online Diffusion Reinforcement with Forward Process (arXiv 2509.16117)"
    Config = DiffusionNFTConfig
    trainable_roles = ROLES
    snapshot_roles = {"old": "generator", "ema": "generator"}
    reward_driven = True

    def __init__(
        self, cfg: DiffusionNFTConfig, world: Any, rewards: Any = None, seed: int = 0, run_config: dict | None = None
    ):
        super().__init__(cfg, world, rewards, seed, run_config)
        self.chain = Transition.parse(cfg.transition)
        self.ema = EMA("ema", "generator", cfg.ema_decay)
        self.kl_guidance = float(cfg.kl_guidance)

    def sampling_transition(self) -> Transition:
        return self.chain

    def optimality(self, reward: Tensor, group: Tensor) -> Tensor:
        """``r̃ ∈ [0, 1]`` from GRPO advantages with the std over every rank (§1.5); ``regime: tilt``:
        ``½ + A/(2A_max)`` from raw leave-one-out advantages, unclipped (any real value)."""
        cfg = self.cfg
        adv = over_ranks(self, lambda r, g: regime_advantages(r, g, cfg.regime, cfg.adv_clip), reward.detach().float(),
                         group)
        if cfg.regime == "tilt":
            return 0.5 + adv / (2 * cfg.adv_clip)
        return advantages_to_unit(adv, cfg.adv_clip)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        cfg = self.cfg
        prompts = list(batch["prompts"])
        group = batch["group"].to(self.device)
        n_chunks = cfg.opt_steps_per_epoch
        tilt = cfg.regime == "tilt"
        chunk = len(prompts) // n_chunks
        conds = [self.backbone.encode_prompts(prompts[c * chunk : (c + 1) * chunk]) for c in range(n_chunks)]
        # 1. rollouts of the old snapshot
        g = self.rng("rollout")
        sigmas = self.sampling_sigmas().to(self.device)
        scores = RolloutScores(self.rewards, self.backbone.decode, self.reward_overlap)
        with torch.no_grad():  # chunk c+1 rolls out while the black-box rewards score chunk c
            x0 = scores.add_chunks((sample(self.velocity_fn("old", conds[c]), self.randn(self.sample_shape(chunk), g),
                                           sigmas, self.chain, generator=g).final, prompts[c * chunk : (c + 1) * chunk])
                                   for c in range(n_chunks))
        # 2. rewards → optimality probabilities
        reward = scores.combined()
        r_unit = self.optimality(reward, group)
        metrics: dict[str, Any] = {"reward": reward.mean()}
        # 3. NFT loss per micro-batch of whole groups, stratified levels shared by the batch and ranks
        t_levels = stratified_levels(cfg.train_timesteps, cfg.t_min, cfg.t_max, self.rng("timesteps", per_rank=False))
        gt = self.rng("noising")
        opt = self.opt("generator")
        for c in range(n_chunks):
            sl = slice(c * chunk, (c + 1) * chunk)
            xc = x0[sl]
            opt.zero_grad(set_to_none=True)
            for k in range(cfg.train_timesteps):
                t = t_levels[k].to(self.device, self.dtype).expand(chunk)
                x_t = forward_noise(xc, self.randn(xc.shape, gt), t)
                with torch.no_grad():
                    v_old = self.backbone.velocity(x_t, t, conds[c], "old")
                    v_ref = (
                        self.backbone.velocity(x_t, t, conds[c], "teacher", self.kl_guidance)
                        if cfg.kl_coef > 0 or tilt
                        else None
                    )
                v = self.backbone.velocity(x_t, t, conds[c], "generator")
                loss, m = nft_policy_loss(
                    v, v_old, x_t, xc, t, r_unit[sl], cfg.nft_beta, cfg.adv_clip, cfg.norm_floor, normalize=not tilt
                )
                total = loss
                if v_ref is not None:
                    # tilt: β·t²‖v − v_ref‖², the same t-weighting as the advantage-weighted x̂0 loss
                    kl = velocity_kl(v, v_ref, t**2 if tilt else None)
                    total = total + (cfg.beta if tilt else cfg.kl_coef) * kl
                    metrics["kl"] = kl.detach()
                self.manual_backward(total / cfg.train_timesteps)
                metrics["generator/loss"] = loss.detach()
                metrics.update({f"nft/{key}": val for key, val in m.items()})
            metrics["generator/grad_norm"] = self.step_role("generator", self.cfg.optim.grad_clip)
            self.ema_update(self.ema)
        # 4. old snapshot blending
        d_old = schedule_decay(self.updates["generator"], cfg.old_d0, cfg.old_kappa, cfg.old_n0, cfg.old_dmax)
        if d_old < 1.0:
            blend_role(self.backbone, "old", "generator", d_old)
        metrics["decay_old"] = d_old
        self.log_metrics(metrics)

