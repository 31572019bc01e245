"""CRD: Centered Reward Distillation — KL-regularised reward maximisation on the forward process (methods.md §5).

Paper: "Centered Reward Distillation" (arXiv 2603.14128). The paper body was not available (only its abstract); no
official code exists. This implementation follows methods.md §5, i.e. the abstract plus the public port
``X-GenGroup/Flow-Factory`` (``trainers/crd.py``, which claims to mirror the original code) and the DiffusionNFT
code it derives from; the calibrated implicit-reward estimator (``weighting: elbo``) is our derivation (below).

Roles: ``generator`` (trainable adapter, the policy ``v_θ``), ``old`` (snapshot: the ratio reference ``p_old`` of the
implicit reward, blended toward the generator on a schedule), ``sampler`` (snapshot that produces the rollouts,
decoupled from ``old`` and blended on its own schedule), ``ema`` (evaluation EMA), ``teacher`` (frozen base: the
KL anchor, queried with CFG ``kl_guidance``).

Theory (§5.1). Per prompt c, ``max_p E_p[r] − β KL(p ‖ p_ref)`` has the optimum ``p*(x|c) = p_ref(x|c) e^{r(x,c)/β}/Z(c)``,
so ``r = β log(p*/p_ref) + β log Z(c)``. CRD chooses θ so that the *implicit reward* ``β log(p_θ/p_ref)`` matches
``r`` up to that prompt constant: centring both sides over the samples of the same prompt removes ``log Z(c)``:

    L_CRD = (A_max/β) · mean_i (β R̂ᶜ_i − Rᶜ_i)²,   R̂ᶜ = r̂ − sg(mean_g r̂),   Rᶜ = R − mean_g R,

with g = the prompt group of sample i (``centering: group``; the port centres over the whole batch, ``batch``).

Each iteration (one epoch: ``batch_size`` prompts × ``group_size`` samples per rank; groups are contiguous and whole on
one rank, and the ``opt_steps_per_epoch`` micro-batches are cut at group boundaries, so centring never needs a
cross-rank reduction) is the recipe:

1. Rollouts (no grad) of the ``sampler`` snapshot with the configured chain (port: 10-step ODE, no CFG).
2. External rewards ``r`` (black-box OK). Reward signal ``R`` = ``raw`` reward (then β is the temperature of the tilt
   exactly), or ``unit`` = the port's GRPO advantage (group mean, std over every rank), clipped to ±A_max and mapped
   to [0, 1] (§1.5) — then the effective temperature is ``β · 2 A_max · std(r)``.
3. Per micro-batch, for ``train_timesteps`` stratified levels t in [t_min, t_max] (shared by the batch and ranks, as
   the port, or per sample): ``x_t = (1−t)x0 + tε``, ``u = ε − x0``; ``v_θ`` (grad), ``v_old``, ``v_ref^ω`` (no grad).
4. Implicit reward ``r̂ ≈ log p_θ(x0)/p_old(x0)`` from noising errors (``fewstep_rl.objectives.crd``):
   ``elbo``: ``r̂ = −(1−t)/t · Σ_d[(v_θ−u)² − (v_old−u)²]`` — the continuous-time ELBO difference of the two flows
   (log-SNR λ = 2 log((1−t)/t), −λ'/2·‖ε̂−ε‖² = (1−t)/t·‖v−u‖²), tight for exact flows, hence a calibrated
   log-ratio; ``adaptive`` (port): ``−mean_d[(v_θ−u)²/sg(mean|v_θ−u|) − (v_old−u)²/mean|v_old−u|]``.
   Each timestep's r̂ is regressed separately (port), or their mean is (``average_timesteps``, lower variance).
5. CRD loss (above) + reward-adaptive KL anchor to the CFG-guided base:
   ``β_KL · mean_i κ_i mean_d (v_θ − v_ref^ω)²``, ``κ_i = c_min + s_i(1 − c_min)``, ``c_min = 1e-4/β_KL``, with the
   signal s = the [0,1] advantage (port) or the raw reward (the abstract's "weak KL while rewards are low"; rewards
   are clamped to [0, 1]) or κ = 1 (``off``); optionally ``fm_coef · mean w(t)‖v_θ(x_t) − u‖²`` (self-consistency, ours; w = 1
   or the ELBO weight ``(1−t)/t``, ``fm_weighting``).
   One optimiser step per micro-batch.
6. Snapshot blending after the epoch, n = generator optimiser steps so far (§5.3 step 8):
   ``θ_old ← d_o θ_old + (1−d_o) θ``, ``d_o(n) = min(old_d0 + old_kappa (n − old_n0)_+, old_dmax)`` (port 0.25,
   0.005, 0, 0.999); ``θ_samp`` likewise (port 0, 0.0075, 75, 0.999: on-policy for 75 steps, then slower). EMA.

Target distribution in theory: with a fixed ratio reference (``old_d0: 1, old_dmax: 1`` keep ``old`` = the initial
generator = the base) and no KL anchor, ``p_ref·exp(r/β)/Z`` exactly (``weighting: elbo``, ``reward_signal: raw``;
``fm_coef > 0`` keeps the learned field the exact flow of its own samples, which the ELBO identity needs). With the
port's moving ``old`` each epoch tilts the current old policy by ``exp(r/β)`` — a trust-region iteration toward
reward maximisation held back by the KL anchor and by the old snapshot freezing (d_o → 0.999).

Knob ↔ β: ``beta`` is β of ``p_ref·exp(r/β)`` when ``reward_signal: raw`` and ``weighting: elbo``; with ``unit``
the temperature is ``β·2·A_max·std(r)``; with ``adaptive`` weighting r̂ is not calibrated, so β is a relative
strength (port: β_crd = 1).

Deviations:
    * The paper was unavailable; the ``elbo`` estimator is derived here (module ``fewstep_rl.objectives.crd``), the
      ``adaptive`` one is the port's. The toy2d presets use ``elbo`` + ``raw`` + frozen ``old`` + no KL anchor
      + ``fm_coef: 3`` with ``fm_weighting: elbo`` (below), so that the fixed point is the closed-form tilt.
    * Centring within prompt groups (the paper's claim) instead of the port's batch centring (both offered).
    * Training levels are σ-uniform: ``train_timesteps`` levels stratified uniformly in σ over [t_min, t_max]
      (:func:`~fewstep_rl.sampling.stratified.stratified_levels`); the port (methods.md §5.3 step 2) stratifies over
      the rollout schedule's top 99 % of *steps*, i.e. over the shifted SD3 grid (shift 3), which puts most levels
      at high noise. With ``weighting: elbo`` the implicit reward is the integral of ``(1−t)/t·Δ‖v − u‖²`` over t,
      for which σ-uniform levels are the plain Monte-Carlo estimate (the port's density would reweight the
      integrand); with ``adaptive`` the two give different implicit rewards and so different effective β.
    * Few-step use: the implicit reward is the log-density of the *flow* (velocity field); it equals the sampled law
      only when the chain is accurate. The toy2d preset therefore samples with 32 Euler steps (the exact teacher's
      4-step Euler is ~20x above the noise floor); on shapes the 4-step x0-predict-and-renoise chain is used as the
      sampler (the paper uses 10-step ODE rollouts of a multi-step model, §5.7).
    * Old velocities are computed on the fly (no grad) instead of in a separate pass: ``old`` only changes between
      epochs, so the values are the same.
    * Options not in the port: ``average_timesteps`` (regress the mean of the T draws: the squared error of a noisy
      r̂ also minimises β² Var(r̂), a pull toward the reference that averaging divides by T), per-sample timesteps,
      and ``fm_coef``: plain flow matching of ``v_θ`` on its own rollouts. Regressing ELBO differences does not pin
      down the velocity field (many fields share an ELBO), and for a field that is not the exact flow of its own law
      the ELBO is only a lower bound of the log-density, so the sampled law over-tilts: on toy2d (β = 0.25, target
      shift of both means 1.0, T = 8 draws, 1600 iterations) the means moved by 1.4–1.5 without it and by 0.93–0.97
      with ``fm_coef: 1``; with T = 32 (less variance pull toward the base) it ended at mean reward 1.009
      against the target's 1.0095. The exact tilt is still a fixed point (the flow of its own samples has zero
      expected flow-matching gradient). An unbiased-
      gradient variant (residual and gradient from independent halves of the draws, no variance penalty) was tried
      and diverged on toy2d, so it is not offered. Issue 13 tried the all-pairs form too (subtract ``β² s²/T``,
      s² = the sample variance of each sample's T draws; with stratified levels, and with independent levels): it
      diverged as well (loss −128, gradient norm 1100 after 150 iterations) — the stop-gradient group mean makes the
      centred residual's variance smaller than s²/T, so the correction over-subtracts and rewards inflating the
      draws' spread. Not offered.
    * Issue 13, random multimodal worlds (README "Validation"): with ``fm_coef: 1`` and uniform weights the mode
      masses moved only ~75 % of the way (10 worlds: closure median 85 %, energy 45× the floor). Measured on
      ``2d-linear-s0-0`` (256 levels per sample, the trained generator's own samples): the regression was *not*
      solved — ``β r̂ − r`` stood +0.11…+0.23 higher in the components that should lose mass than in the one that
      should gain it. The uniform consistency term held it there: the ELBO weight ``(1−t)/t`` vanishes at high noise,
      where the mode masses are decided, so there the consistency term outweighed the regression and pinned the
      masses. Weighting it like the implicit reward (``fm_weighting: elbo``,
      :func:`~fewstep_rl.objectives.crd.consistency_weight`) makes the two trade off equally at every level:
      ``2d-linear-s0-0`` 84 % / 30× / mode-move 74 % → 105 % / 7.8× / 93 % (``fm_coef`` 3), 101 % / 8.8× / 88 %
      (5), 98 % / 10.4× / 85 % (10); on the default world (β = 0.25 / 1) 106 % / 129 % (1),
      93 % / 105 % (5), 85 % / 98 % (10; 117× the floor at β = 0.25), 96 % (4.1× the floor) / 112 % (3). On the 10
      random worlds (closure, energy/floor medians): 94 % / 30× (3), 93 % / 38× (5); linear-reward worlds 105 % /
      11.3×, worst 14.4× (3) and 101 % / 8.8×, worst 19.1× (5). The preset takes ``fm_coef: 3`` (better overall and
      on the default world; 5 is a little closer on linear worlds). Region rewards (a density step of ``e^{v/β}``, up
      to ~200×, at the box's faces) stay far from the tilt (closure median 82 %, energy 59× the floor): a smooth
      field does not draw that step. On the default world the price is shape accuracy: energy 4.1× the floor at
      β = 0.25 (was 1.9× with the uniform weight).
      Tried before and not helping: lower uniform ``fm_coef`` (frees the masses but over-tilts within-mode shifts:
      default world 112 % / 145 % at 0.2), SDE rollouts without it (~20 % under), T = 96 draws, log-t levels.
    * Iterations (toy2d preset 4000, was 1000): the random worlds were far from converged at 1000 — one world
      (``2d-linear-s1-6``) went 86 % / 57× / mode move 78 % → 95 % / 16× / 89 % at 3000, a region world
      (``2d-region-s1-7``, training seed 0) 74 % / 43× → 84 % / 5.2× (3000) → 88 % / 4.1× (5000). 10-world medians in
      the README. Re-tried in session 27 and still not offered: the cross-fitted (double-sampling) regression
      diverged again, log-t levels lost (83 % / 87× on s1-6).
    * ``optim.lr: 2e-3`` (toy2d preset since session 28; was 1e-3), same 4000 iterations and cosine schedule: the runs
      move further toward the tilt (``2d-region-s1-5`` 23.4× → 12.6×, ``2d-region-s0-5`` 32.5× → 19.9×; 20 worlds:
      better on 18, geometric-mean energy ratio 0.73; default world 5.0× → 4.5× the floor).
      Tried in session 29 on the same worlds and not adopted (paired with lr 2e-3, energy ratio per world):
      ``optim.lr: 3e-3`` (10 worlds, 5 per seed: better on 6, geometric mean 0.94) and 64 Euler steps instead of 32
      (20 worlds: better on 11, 0.96; seed 0 median 6.8×, worst 21.7×; seed 1 10.4×, worst 25.6×). The 32-step
      chain does contract the components: the exact tilted flow under 32-step Euler is 2–5 % too narrow and up
      to 3.7× the floor on the linear worlds (``benchmarks/toy2d_euler_floor.py``; 64 steps: 1–2.4 %, 2.1×), and the
      trained field on ``2d-linear-s1-2`` was 10 % too narrow. But halving the chain's share did not move the
      medians, so the rest of the remaining error is the learned field's, not the sampler's.
    * Where the remaining error on seed 1's worst worlds sits (session 30, ``2d-linear-s1-6``, preset 16.7× the floor,
      mode move 90 %). Per sample, the regression's gradient is a flow-matching gradient: for
      ``average_timesteps`` the two terms sum to ``(2w/Tn)(v_θ − u)·(fm_coef − 2·adv_clip·res_i)``,
      ``res_i = β r̂ᶜ_i − Rᶜ_i`` — flow matching on the model's own samples, weighted down (and, above
      ``res = fm_coef/(2·adv_clip)`` = 0.3, negatively) where the implicit reward is too high. Measured on the trained
      generator (600 samples per prompt, r̂ from 256 draws, the field's exact ODE log-density by RK4 with the exact
      divergence; the teacher's ODE log-density matches its closed form to 1e-4): the regression is not solved at
      the mode level — ``β r̂ − r`` (centred) is +0.27 in the component that should shrink vs −0.04 in the one that
      should grow (``2d-linear-s1-8``: +0.24…+0.32 vs −0.06) — and the exact log-ratio is much further off than the
      ELBO says (+1.5 vs −0.2; s1-8: +0.9…+3.1 vs −0.3…−0.4): the field is a worse denoiser of its own samples in the
      shrinking components (a larger ELBO gap), which lowers their implicit reward without moving their mass. On a
      region world (``2d-region-s1-5``, 12.6×) the residuals are small (≤ +0.11) and the ELBO is tight. The
      over-weighted masses did not move with any knob tried on s1-6 (energy / mass of the shrinking component,
      target 0.066; preset 16.7× / 0.117): ``t_min`` 0.005 16.8× / 0.118; adapters of width 256 19.7× / 0.120;
      ``fm_coef`` 5 19.7× / 0.122 and 8 19.4× / 0.119; ``grad_clip`` 10 (the clip at 1 is active on most steps:
      median grad norm 2–3.6) 16.9× / 0.118 (s1-8: 21.0× vs 19.5×). With session 29's probes (evaluation EMA 16.8×,
      8000 iterations 36.3×, ``fm_coef`` 1 35.3×, T = 96 draws 15.4×) this points to a fixed point of the objective
      itself, not to the optimiser, the run length or the network's size. It is not simply the balance between the
      two terms either: with ``fm_coef`` 8 the masses are the same while the unsolved residual grows (+0.45 vs −0.06;
      exact log-ratio +1.58 vs −0.22), below that run's sign-change point 0.8.
      ``python benchmarks/crd_elbo_gap.py --seed 1 --world 6 [--config fm8.yaml]`` prints these tables.
    * ``forward_batch``: a micro-batch of whole groups can be pushed through the network in pieces; the stop-gradient
      group means come from a no-grad pass first, so loss and gradient equal the one-pass values (tested).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
from torch import Tensor

from fewstep_rl.config import knob
from fewstep_rl.distributed import over_ranks
from fewstep_rl.method import FewStepMethod
from fewstep_rl.objectives import advantages_to_unit, flow_matching_loss, regime_advantages
from fewstep_rl.objectives.crd import (
    adaptive_kl_coef,
    center,
    center_mean_sg,
    consistency_weight,
    crd_regression,
    implicit_reward,
    velocity_kl,
)
from fewstep_rl.optim import OptimConfig, renamed_flat_keys
from fewstep_rl.rewards import RolloutScores
from fewstep_rl.roles import EMA, blend_role, schedule_decay
from fewstep_rl.sampling import Transition, forward_noise, sample
from fewstep_rl.sampling.stratified import stratified_levels

ROLES: tuple[str, ...] = ("generator",)


@dataclass
class CRDConfig:
    """Hyper-parameters of CRD (defaults: the port's where scale-free; see configs/crd/*.yaml)."""

    # old keys fail with the new name (config.build)
    RENAMED: ClassVar[dict[str, str]] = renamed_flat_keys()

    beta: float = knob(1.0, "β of the tilt p_ref·exp(r/β): implicit reward scale β_crd (port: 1)")
    reward_signal: Literal["raw", "unit"] = knob(
        "unit", "regression target: raw reward (β exact) or the port's advantage mapped to [0, 1]"
    )
    weighting: Literal["elbo", "adaptive"] = knob(
        "adaptive", "implicit reward estimator: elbo (calibrated log-ratio, derived) or adaptive (port)"
    )
    centering: Literal["group", "batch"] = knob("group", "centre within each prompt group (paper) or the batch (port)")
    batch_size: int = knob(4, "prompts per epoch per rank")
    group_size: int = knob(8, "samples per prompt K (port: 24)")
    num_steps: int = knob(4, "sampling steps of the rollout chain (port: 10 ODE steps)")
    shift: float = knob(1.0, "static schedule shift γ of the σ-grid (SD3: 3.0)")
    transition: str = knob("euler", "rollout/eval chain: euler (ODE) or cps(1.0) (predict x0 and re-noise)")
    optim: OptimConfig = knob(
        help="AdamW of the generator (port LoRA: lr 3e-4)",
        factory=lambda: OptimConfig(lr=3e-4, adam_betas=[0.9, 0.999], weight_decay=1e-4, grad_clip=1.0),
    )
    opt_steps_per_epoch: int = knob(2, "optimiser steps per epoch; micro-batches of whole prompt groups")
    train_timesteps: int = knob(4, "noise levels per sample per epoch (port: 20; NFT: 9)")
    t_min: float = knob(0.01, "lowest training noise level")
    t_max: float = knob(0.99, "highest training noise level (port: top 99% of the schedule)")
    shared_timesteps: bool = knob(True, "one set of stratified levels for the whole batch and every rank (port)")
    average_timesteps: bool = knob(False, "regress the mean implicit reward over the levels (lower variance)")
    forward_batch: int | None = knob(None, "samples per forward/backward inside a micro-batch (memory; exact)")
    adv_clip: float = knob(5.0, "A_max: advantage clip and loss scale")
    norm_floor: float = knob(1e-5, "floor of the adaptive normalisers")
    kl_coef: float = knob(0.1, "β_KL of the v-space KL anchor to the CFG-guided base (0 = off)")
    kl_guidance: float | None = knob(None, "CFG of the KL anchor (port: 4.5; default: the world's teacher guidance)")
    fm_coef: float = knob(
        0.0, "self-consistency: flow matching of v_θ on its own rollouts (ours; keeps r̂ = ELBO a true log-ratio)"
    )
    fm_weighting: Literal["uniform", "elbo"] = knob(
        "uniform", "noise-level weight of the self-consistency term: uniform, or the implicit reward's (1−t)/t"
    )
    kl_adaptive: Literal["off", "advantage", "reward"] = knob(
        "advantage", "reward-adaptive KL signal: off (κ=1), advantage in [0,1] (port), raw reward clamped to [0,1]"
    )
    old_d0: float = knob(0.25, "old snapshot decay d_o(n) = min(d0 + κ (n − n0)_+, d_max): d0 (1 = frozen)")
    old_kappa: float = knob(0.005, "old snapshot decay slope κ")
    old_n0: int = knob(0, "old snapshot decay start n0")
    old_dmax: float = knob(0.999, "old snapshot decay cap")
    sampler_d0: float = knob(0.0, "sampler snapshot decay d_s(n): d0 (0 = on-policy)")
    sampler_kappa: float = knob(0.0075, "sampler snapshot decay slope")
    sampler_n0: int = knob(75, "sampler snapshot decay start")
    sampler_dmax: float = knob(0.999, "sampler snapshot decay cap")
    ema_decay: float = knob(0.0, "evaluation EMA decay per optimiser step (0 = evaluate the generator)")

    def __post_init__(self) -> None:
        if self.batch_size < 1 or self.group_size < 2 or self.num_steps < 1:
            raise ValueError("need batch_size >= 1, group_size >= 2 (centring needs groups) and num_steps >= 1")
        if not self.beta > 0:
            raise ValueError(f"beta must be > 0, got {self.beta}")
        if self.opt_steps_per_epoch < 1 or self.batch_size % self.opt_steps_per_epoch:
            raise ValueError(
                f"opt_steps_per_epoch ({self.opt_steps_per_epoch}) must divide batch_size ({self.batch_size}): "
                "micro-batches hold whole prompt groups"
            )
        if self.train_timesteps < 1:
            raise ValueError(f"train_timesteps must be >= 1, got {self.train_timesteps}")
        if self.forward_batch is not None and self.forward_batch < 1:
            raise ValueError(f"forward_batch must be >= 1 or null, got {self.forward_batch}")
        if not 0.0 < self.t_min < self.t_max <= 1.0:
            raise ValueError(f"need 0 < t_min < t_max <= 1, got {self.t_min}, {self.t_max}")
        if self.weighting == "elbo" and self.t_max >= 1.0 and self.t_min <= 0.0:
            raise ValueError("elbo weighting (1−t)/t needs t_min > 0")
        if self.adv_clip <= 0 or self.kl_coef < 0 or self.norm_floor <= 0 or self.fm_coef < 0:
            raise ValueError("adv_clip and norm_floor must be > 0, kl_coef and fm_coef >= 0")
        for tag in ("old", "sampler"):
            d0, dmax, n0 = getattr(self, f"{tag}_d0"), getattr(self, f"{tag}_dmax"), getattr(self, f"{tag}_n0")
            if not (0.0 <= d0 <= 1.0 and 0.0 <= dmax <= 1.0) or getattr(self, f"{tag}_kappa") < 0 or n0 < 0:
                raise ValueError(f"{tag} decay: need d0, d_max in [0, 1], kappa >= 0 and n0 >= 0")
        if not 0.0 <= self.ema_decay <= 1.0:
            raise ValueError(f"ema_decay must lie in [0, 1], got {self.ema_decay}")
        Transition.parse(self.transition)


class CRD(FewStepMethod):
    """CRD: centred implicit-reward regression on the forward process with decoupled old/sampler snapshots."""

    name = "crd"
    paper = "Centered Reward Distillation (arXiv 2603.14128); recipe of the Flow-Factory port"
    Config = CRDConfig
    trainable_roles = ROLES
    snapshot_roles = {"old": "generator", "sampler": "generator", "ema": "generator"}
    reward_driven = True

    def __init__(self, cfg: CRDConfig, world: Any, rewards: Any = None, seed: int = 0, run_config: dict | None = None):
        super().__init__(cfg, world, rewards, seed, run_config)
        self.chain = Transition.parse(cfg.transition)
        self.ema = EMA("ema", "generator", cfg.ema_decay)
        self.kl_guidance = cfg.kl_guidance if cfg.kl_guidance is not None else float(world.teacher_guidance)

    def sampling_transition(self) -> Transition:
        return self.chain

    # ------------------------------------------------------------------ pieces
    def reward_signals(self, reward: Tensor, group: Tensor) -> tuple[Tensor, Tensor]:
        """``(R, s)``: the regression signal and the KL-adaptivity signal in [0, 1]."""
        cfg = self.cfg
        unit = None
        if cfg.reward_signal == "unit" or cfg.kl_adaptive == "advantage":
            adv = over_ranks(self, lambda r, g: regime_advantages(r, g, "paper", cfg.adv_clip), reward.detach().float(),
                             group)
            unit = advantages_to_unit(adv, cfg.adv_clip)
        signal = unit if cfg.reward_signal == "unit" else reward.detach().float()
        kl_signal = unit if cfg.kl_adaptive == "advantage" else reward.detach().float().clamp(0.0, 1.0)
        assert signal is not None and kl_signal is not None
        return signal, kl_signal

    def levels(self, n: int) -> Tensor:
        """``(T, n)`` training noise levels: stratified, shared by the batch and ranks or drawn per sample."""
        cfg = self.cfg
        if cfg.shared_timesteps:
            t = stratified_levels(cfg.train_timesteps, cfg.t_min, cfg.t_max, self.rng("timesteps", per_rank=False))
            return t.to(self.device, self.dtype)[:, None].expand(-1, n)
        return stratified_levels(cfg.train_timesteps, cfg.t_min, cfg.t_max, self.rng("timesteps"), batch=n).to(
            self.device, self.dtype
        )

    def micro_batch_loss(
        self,
        x0: Tensor,
        prompts: list[str],
        signal: Tensor,
        kl_signal: Tensor,
        group: Tensor,
        t_all: Tensor,
        g: torch.Generator,
    ) -> dict[str, Tensor]:
        """Accumulate the gradient of the CRD loss (+ KL anchor) of one micro-batch of whole groups.

        With ``forward_batch`` smaller than the micro-batch, a no-grad pass first computes every sample's implicit
        reward for the group means (they are stop-gradient), then pieces of ``forward_batch`` samples back-propagate
        their share — the same loss and gradient as one pass, with the memory of a piece.
        """
        cfg = self.cfg
        n, n_t = x0.shape[0], t_all.shape[0]
        coef = None if cfg.kl_adaptive == "off" or cfg.kl_coef == 0 else adaptive_kl_coef(kl_signal, cfg.kl_coef)
        eps = torch.stack([self.randn(x0.shape, g) for _ in range(n_t)])
        target = center(signal.float(), group, cfg.centering)
        size = cfg.forward_batch or n
        pieces = [slice(i, min(i + size, n)) for i in range(0, n, size)]
        conds = [self.backbone.encode_prompts(prompts[p]) for p in pieces]
        kl_parts: list[Tensor] = []

        def implicit(p: slice, cond: Any, k: int, grad: bool) -> tuple[Tensor, Tensor | None]:
            """Implicit reward of draw k on piece p, and its regulariser (KL anchor + self-consistency FM)."""
            t = t_all[k, p]
            x_t = forward_noise(x0[p], eps[k, p], t)
            u = eps[k, p] - x0[p]
            with torch.no_grad():
                v_old = self.backbone.velocity(x_t, t, cond, "old")
                v_ref = (
                    self.backbone.velocity(x_t, t, cond, "teacher", self.kl_guidance)
                    if grad and cfg.kl_coef > 0
                    else None
                )
            with torch.set_grad_enabled(grad):
                v = self.backbone.velocity(x_t, t, cond, "generator")
                r_hat = implicit_reward(v, v_old, u, t, cfg.weighting, cfg.norm_floor)
                reg = None
                if v_ref is not None:
                    kl = velocity_kl(v, v_ref, None if coef is None else coef[p])
                    kl_parts.append(kl.detach() * (p.stop - p.start) / n / n_t)
                    reg = cfg.kl_coef * kl
                if grad and cfg.fm_coef > 0:
                    fm_w = consistency_weight(t, cfg.fm_weighting)
                    fm = cfg.fm_coef * flow_matching_loss(v, x0[p], eps[k, p], fm_w)
                    reg = fm if reg is None else reg + fm
            return r_hat, reg

        # which noise draws form one implicit-reward estimate: each draw (port) or their mean
        sets = [list(range(n_t))] if cfg.average_timesteps else [[k] for k in range(n_t)]
        rows = len(sets)

        def estimates(r_k: list[Tensor]) -> Tensor:
            return torch.stack([torch.stack([r_k[k] for k in ks]).mean(0) for ks in sets])

        if len(pieces) > 1:  # no-grad pass for the (stop-gradient) group means
            with torch.no_grad():
                r_all = [torch.cat([implicit(p, c, k, False)[0] for p, c in zip(pieces, conds)]) for k in range(n_t)]
                centre = center_mean_sg(estimates(r_all), group, cfg.centering)
        loss_sum = torch.zeros((), device=self.device)
        r_rows: list[Tensor] = []
        for p, cond in zip(pieces, conds):
            frac = (p.stop - p.start) / n
            per_set = [sets] if len(sets) == 1 else [[ks] for ks in sets]
            for chosen in per_set:  # one backward per estimate set (per draw for the port: low memory)
                needed = sorted({k for ks in chosen for k in ks})
                out = {k: implicit(p, cond, k, True) for k in needed}
                est = torch.stack([torch.stack([out[k][0] for k in ks]).mean(0) for ks in chosen])
                idx = [sets.index(ks) for ks in chosen]
                ctr = centre[idx][:, p] if len(pieces) > 1 else center_mean_sg(est, group, cfg.centering)
                r_c = est - ctr
                loss = crd_regression(r_c, target[p], cfg.beta, cfg.adv_clip, count=n * rows)
                regs = [out[k][1] for k in needed if out[k][1] is not None]
                reg = torch.stack(regs).mean() * frac * len(needed) / n_t if regs else None
                self.manual_backward(loss + reg if reg is not None else loss)
                loss_sum = loss_sum + loss.detach()
                r_rows.append(r_c.detach().flatten())
        metrics = {"crd_loss": loss_sum, "implicit_reward_std": torch.cat(r_rows).std()}
        if kl_parts:
            metrics["kl"] = torch.stack(kl_parts).sum()
        return metrics

    # ------------------------------------------------------------------ the recipe
    def training_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        cfg = self.cfg
        prompts = list(batch["prompts"])
        group = batch["group"].to(self.device)
        n_chunks = cfg.opt_steps_per_epoch
        chunk = len(prompts) // n_chunks  # whole groups: batch_size prompts × group_size, cut at prompt boundaries
        conds = [self.backbone.encode_prompts(prompts[c * chunk : (c + 1) * chunk]) for c in range(n_chunks)]
        # 1. rollouts of the sampler snapshot (micro-batch c = prompts c·chunk … (c+1)·chunk−1: whole groups)
        g = self.rng("rollout")
        sigmas = self.sampling_sigmas().to(self.device)
        scores = RolloutScores(self.rewards, self.backbone.decode, self.reward_overlap)
        with torch.no_grad():  # chunk c+1 rolls out while the black-box rewards score chunk c
            x0 = scores.add_chunks((sample(self.velocity_fn("sampler", conds[c]), self.randn(self.sample_shape(chunk), g),
                                           sigmas, self.chain, generator=g).final, prompts[c * chunk : (c + 1) * chunk])
                                   for c in range(n_chunks))
        # 2. rewards → regression signal and KL-adaptivity signal
        reward = scores.combined()
        signal, kl_signal = self.reward_signals(reward, group)
        metrics: dict[str, Any] = {"reward": reward.mean()}
        # 3.–5. per micro-batch of whole groups: implicit reward, centred regression, KL anchor; one step each
        t_all = self.levels(len(prompts))
        gt = self.rng("noising")
        opt = self.opt("generator")
        for c in range(n_chunks):
            sl = slice(c * chunk, (c + 1) * chunk)
            opt.zero_grad(set_to_none=True)
            m = self.micro_batch_loss(x0[sl], prompts[sl], signal[sl], kl_signal[sl], group[sl], t_all[:, sl], gt)
            metrics.update({f"crd/{k}": v for k, v in m.items()})
            metrics["generator/grad_norm"] = self.step_role("generator", self.cfg.optim.grad_clip)
            self.ema_update(self.ema)
        metrics["generator/loss"] = metrics["crd/crd_loss"]
        # 6. snapshot blending
        n = self.updates["generator"]
        d_old = schedule_decay(n, cfg.old_d0, cfg.old_kappa, cfg.old_n0, cfg.old_dmax)
        d_samp = schedule_decay(n, cfg.sampler_d0, cfg.sampler_kappa, cfg.sampler_n0, cfg.sampler_dmax)
        if d_old < 1.0:
            blend_role(self.backbone, "old", "generator", d_old)
        if d_samp < 1.0:
            blend_role(self.backbone, "sampler", "generator", d_samp)
        metrics.update({"decay_old": d_old, "decay_sampler": d_samp})
        self.log_metrics(metrics)

