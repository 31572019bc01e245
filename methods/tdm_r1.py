"""TDM-R1: RL for few-step TDM generators with non-differentiable rewards via a learned surrogate (methods.md §4).

Paper: Luo et al., "TDM-R1: Reinforcing Few-Step Diffusion Models with Non-Differentiable Reward" (arXiv 2603.07700);
reference code ``Luo-Yihong/TDM-R1`` (``scripts/train_tdmr1_pub.py``, ``config/tdmr1_clean.py``), as specified in
methods.md §4.3–§4.8. Builds on TDM (§4.1, ``methods/tdm.py``) and DGPO (§6.6).

Roles (one base, three trainable adapters, §4.3): ``generator`` (deterministic K-step sampler), ``fake_score`` (TDM
fake model of the generator's per-step clean estimates), ``surrogate`` (a velocity model D_φ trained by DGPO so that
its deviation from the frozen base encodes what the reward prefers), ``teacher``/``reference`` (frozen base),
snapshots ``old_surrogate`` (blend of the surrogate, trust region of DGPO) and ``ema`` (generator EMA, sampling role).

Only the surrogate sees rewards: the reward is evaluated under ``no_grad`` on decoded samples (black boxes such as the
shapes ``gold`` verifier, toy2d ``region`` and ``jpeg`` work), turned into advantages, and reaches the generator only
through the surrogate's reward direction ``x̂0^{D,ω_rl} − x̂0^{ref}``, computed without gradient.

One iteration = one epoch (§4.7):

1. Rollout (no grad): ``batch_size`` prompts × ``group_size`` samples per rank, the generator's deterministic K-step
   chain (no CFG); store ``x_j`` at every boundary, final ``x_K``.
2. Rewards of the decoded finals (weighted sum); GRPO advantages with per-group mean and the **global** std over every
   rank, clipped ±``adv_clip`` (§1.5, §4.4); replicated over steps (the deterministic trajectory maps every
   intermediate state to its final sample, so the final reward labels every ``x_j``).
3. For each of ``micro_batches`` chunks (whole groups), draw ``train_steps`` = M step indices j (uniform without
   replacement) and, per j, a surrogate step ``j' ~ Cat(p_k ∝ k+1)``; levels are shared by the global batch (§4.5).
   For each j, in order fake → surrogate → generator, accumulate (÷ micro_batches·M):
   a. Fake (§4.6(a)): generator ``v_G`` at ``x_j`` (gradient kept for (c)), ``x̂0 = x_j − σ_j v_G``, Euler next point
      ``x^G_{j+1}``; ``x_τ = a x^G_{j+1} + b n`` (§1.3), τ above ``σ_{j+1}``; ``mean(u − f)² + 0.02·mean(T − f)²`` with
      ``u = (x_τ − x̂0)/τ``.
   b. Surrogate (§4.6(b), :func:`~fewstep_rl.objectives.dgpo.dgpo_loss`): the *stored* point ``x_{j'+1}`` re-noised to
      ``τ^s`` (above ``max(σ_{j'+1}, t^s_min)``) with group-shared noise ``n_g``; ambient target ``u_amb``; per-sample
      errors ``ℓ_φ, ℓ_old, ℓ_ref``; trust-region mask (ε), reference mask (drift R > 0.05), group weight
      ``ω_g = sigmoid(β_dpo mean_g A(ℓ_φ − ℓ_ref))``; ``L = (j'+1)/K · [mean(ω A ℓ̃_φ) + 0.001 R]``.
   c. Generator (§4.6(c)), gradient only through ``x̂0``: at ``x_τ`` (fresh noise) fake ``x̂0^F``, teacher conditional
      ``x̂0^{T,c}``, unconditional ``x̂0^{T,∅}``, CFG-ω ``x̂0^{T,ω}``; if ``j < j_trunc`` at ``x^r`` (level ``τ^r`` above
      ``max(σ_{j+1}, t_min)``, group-shared noise) the surrogate with CFG ω_rl and the frozen base without CFG.
      ``d_cfg = c_cfg (x̂0^{T,c} − x̂0^{T,∅})``, ``d_kl = x̂0^{T,c} − x̂0^F``, ``d_rl = x̂0^{D,ω_rl} − x̂0^{ref}``;
      ``w_f = mean|x̂0 − x̂0^{T,ω}|``, ``w_r = mean|x̂0 − x̂0^{D,ω_rl}|``;
      ``L_G = λ L(d_cfg, w_f) + (1−λ) L(d_rl, w_r) + L(d_kl, w_f)`` (j < j_trunc), else ``λ [L(d_cfg, w_f) + L(d_kl, w_f)]``
      with ``L(d, w) = mean[(sg(x̂0 + d) − x̂0)²/w]``.
4. One optimiser step per role, in the order fake → surrogate → generator (clip each); then the old surrogate
   ``φ⁻ ← d_n φ⁻ + (1 − d_n) φ`` with ``d_n = min(0.3, 0.001 + 0.001 n)``, and the generator EMA (0.9 with warm-up).

Theoretical target. The surrogate's DGPO optimum is a diffusion model tilted toward preferred samples relative to the
reference (implicit reward ``ℓ_ref − ℓ_φ``); the generator follows ``d_kl`` (trajectory distribution matching to the
unguided teacher) + ``λ d_cfg`` (CFG as implicit reward) + ``(1−λ) d_rl`` (the surrogate's score difference), so at a
fixed point its law is approximately ``p_teacher · (p_D/p_ref)^{(1−λ)·w_f/w_r} · (CFG tilt)^λ`` — a reward-tilted
teacher whose temperature is set implicitly by β_dpo, the DGPO masks (drift threshold) and the normalisers, not by an
explicit β. With ``regime: paper`` (sd3/shapes and toy2d_region presets) ``beta`` is only the temperature of the tilted reference used
by evaluation.

β-regime (``regime: tilt``, toy2d preset). DGPO's drift regulariser ``R = mean (D_φ − T)²`` is a KL to the reference
in velocity space and its ``ω·A·ℓ_φ`` term an advantage-weighted DSM; with the group weight fixed (ω = 1, β_dpo → 0),
no masks and raw leave-one-out advantages, the surrogate loss ``mean_i(A_i ℓ_φ,i) + β·R`` has, once the generator's law
equals the surrogate's (``E[u|x_t] = D``), the stationary point ``D = T + Cov(r, u | x_t)/β`` — the same condition as
NFT's β-regime (``methods/nft.py``): the exact tilt ``p_teacher·exp(r/β)`` for Gaussian components with a linear
reward, its first-order (in 1/β) approximation when the tilt reweights modes. That loss is not bounded below where a
low-noise ``x_t`` has ``E[A|x_t] < −β`` (its quadratic coefficient is ``E[A|x_t] + β``) and diverged on toy2d at
β = 0.25, so the surrogate is trained by the convex regression with the same minimiser,
:func:`~fewstep_rl.objectives.dgpo.tilt_regression_loss` ``‖v_φ − sg[v_ref + A(u − v_gen)/β]‖²`` with ``v_gen`` the
fake score (the generator's own velocity), on the clean generator samples. The generator then runs λ = 0 with the
reward direction queried at the fake's ``x_τ`` with the fake's normaliser, so ``d_kl + d_rl = x̂0^D − x̂0^F``:
trajectory distribution matching toward the surrogate's law (ω_rl, ``reward_t_min``, ``surrogate_t_min``,
``reward_steps``, ``dpo_beta``, ``clip_eps``, ``drift_*`` and ``tdm_weight`` do not apply). A DPO temperature is a β too,
but DGPO's sigmoid weight on deterministic advantages has no finite optimum (it pushes until a mask stops it), so the
drift weight, not β_dpo, is the one that maps onto β.

Fixed point actually reached: ``Cov(r, u | x_t)`` is the covariance under the *generator's* law, so the tilt is as
strong as the 4-step generator is dispersed (exact when the generator's law is the tilt; weaker when it is narrower).
Measured on toy2d (r = x_1, 4000 samples; target 1.0 at β = 0.25, 0.25 at β = 1) with the fake score at the
surrogate's lr 3e-4 and 600 epochs: 92 % of the gap at β = 0.25 but 76 % at β = 1 (outside the 15 % bar of
``tests/test_beta.py``'s slow two-β test). Diagnosis (β = 1): the generator's per-prompt variance along x_1 was 0.17
where the teacher's is 0.23–0.25 (the fake score's law 0.15, the surrogate's 0.23) — a fake score that lags its
generator under-disperses it, and the reward gain is the surrogate's shift scaled by that under-dispersion. The
toy2d preset therefore trains the fake score at lr 1e-3 (the surrogate stays at 3e-4: at 1e-3 its loss diverged at
β = 0.25) for 1200 epochs: 86–92 % of the gap at β = 1 and 99–109 % at β = 0.25 over seeds 0–2 (seed 2 at
β = 0.5 / 2: 92 % / 92 %). Not helping (same test): all 4 trajectory steps trained per micro-batch (`train_steps` 4), Adam β₁ = 0.9,
no EMA, cosine schedules (β = 1: 75–85 %), a generator lr of 1e-3 (diverged).

Knobs (methods.md §4.8): ``dpo_beta`` β_dpo, ``clip_eps`` ε, ``rl_guidance`` ω_rl, ``reward_t_min`` t_min,
``surrogate_t_min`` t^s_min, ``reward_steps`` j_trunc, ``tdm_weight`` λ, ``guidance`` (teacher CFG for ``w_f``),
``cfg_reward_scale`` (3.5 in the code; default ω − 1), ``drift_weight`` 0.001, ``drift_threshold`` 0.05,
``fake_teacher_reg`` 0.02, learning rates (generator 3e-4/4, fake and surrogate 3e-4), Adam β (0, 0.999) for
generator/fake and (0.9, 0.999) for the surrogate, EMA 0.9, old-surrogate schedule.

Known behaviour (toy2d, region reward). The in-region mass rises toward the tilted target within a few hundred
epochs (``toy2d_region`` preset: 400), then slowly drifts back on long runs (measured with its values: mass 0.50 → 0.75 at
300 epochs → 0.68 at 600; with 4× larger learning rates it oscillates and ends below the teacher's mass). The
negative-advantage half of DGPO *raises* the surrogate's denoising error on dispreferred samples, an unstable
direction whose growth only the trust region and the reference mask (R > drift_threshold) bound; once most samples are
in the region the surrogate's direction at the few remaining ones is dominated by it. ``drift_threshold`` and the
surrogate learning rate are the knobs that bound it.

Deviations from the reference code:
    * Rollouts use the deterministic Euler chain instead of DPM-Solver++(2M) (§4.11): training treats every step as
      an Euler step from the stored ``x_j`` (``x^G_{j+1}``), and the surrogate trains on the stored ``x_{j+1}``; with an
      Euler rollout both coincide, so there is no rollout/training mismatch (and no multistep solver in the library).
    * An epoch is one prompt batch per rank rolled out in ``micro_batches`` chunks that are also the training
      micro-batches (whole groups; no shuffle), so DGPO group weights are local to a micro-batch and need no
      all-reduce. Advantages use the global std over all ranks, as the code.
    * Per-role gradient clipping instead of the code's joint clip over all LoRA parameters (§4.7: the clean
      equivalent).
    * Group-shared noise is keyed by the group id (unique across ranks) instead of the prompt, so two groups with the
      same prompt in one batch (toy2d has two prompts) get independent noise.
    * ``shared_levels: false`` (toy2d presets) draws one level per sample instead of one per global batch, and
      ``dmd_weighting: batch`` divides the direction losses by batch means (2-D: per-sample weights have infinite
      variance); the paper values are ``true`` and ``sample``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
from torch import Tensor

from fewstep_rl.config import knob
from fewstep_rl.distributed import over_ranks
from fewstep_rl.init_from import load_roles
from fewstep_rl.method import FewStepMethod
from fewstep_rl.objectives import ambient_renoise, ambient_velocity_target, direction_loss, regime_advantages
from fewstep_rl.objectives.dgpo import dgpo_loss, per_sample_mse, tilt_regression_loss
from fewstep_rl.objectives.tdm import direction_weight, tdm_fake_loss
from fewstep_rl.optim import OptimConfig, RoleOptim, renamed_flat_keys
from fewstep_rl.rewards import RolloutScores
from fewstep_rl.roles import EMA, blend_role, schedule_decay
from fewstep_rl.sampling import Trajectory, Transition, sample, x0_from_v
from fewstep_rl.sampling.noise import group_noise, stable_hash
from fewstep_rl.sampling.subsets import step_subset
from fewstep_rl.sampling.tdm_times import level_above, weighted_step

ROLES: tuple[str, ...] = ("generator", "fake_score", "surrogate")


@dataclass
class TDMR1Config:
    """Hyper-parameters of TDM-R1 (defaults: the OCR recipe of methods.md §4.8; see configs/tdm_r1/*.yaml)."""

    # old keys fail with the new name (config.build)
    RENAMED: ClassVar[dict[str, str]] = {
        "normalizer": "dmd_weighting",
        **renamed_flat_keys(*ROLES),
        "surrogate_adam_betas": "optim.roles.surrogate.adam_betas",
    }

    beta: float = knob(1.0, "β of the target p_ref·exp(r/β): trains with regime tilt (surrogate KL); else evaluation only")
    regime: Literal["paper", "tilt"] = knob(
        "paper", "paper: DGPO surrogate + λ-mixed directions; tilt: advantage-weighted DSM + β·R surrogate, DM toward it"
    )
    batch_size: int = knob(2, "prompts per epoch per rank")
    group_size: int = knob(24, "samples per prompt K (GRPO / DGPO groups)")
    num_steps: int = knob(4, "generator steps (deterministic Euler chain)")
    shift: float = knob(1.0, "static schedule shift γ of the σ-grid and of the level sampling (SD3: 3.0)")
    init_from: str | None = knob(None, "checkpoint of a TDM run: generator and ema ← its ema (surrogate fresh)")
    init_fake: bool = knob(False, "with init_from, also start the fake score from the run's (paper: fresh LoRA)")
    micro_batches: int = knob(1, "rollout/training chunks per epoch (gradient accumulation; must split whole groups)")
    train_steps: int = knob(2, "M: trajectory steps trained per micro-batch (uniform without replacement)")
    shared_levels: bool = knob(True, "one τ per step for the whole global batch (code); false: one per sample")
    level_margin: float = knob(0.02, "pre-shift margin of every level above its lower bound (code: 20/1000)")
    # generator
    guidance: float | None = knob(None, "teacher CFG ω of x̂0^{T,ω} in w_f (code: 4.5; default: the world's)")
    cfg_reward_scale: float | None = knob(None, "c_cfg of d_cfg = c_cfg (x̂0^{T,c} − x̂0^{T,∅}) (code: 3.5; None: ω − 1)")
    rl_guidance: float = knob(4.5, "ω_rl: CFG of the surrogate in the reward direction (OCR 4.5, GenEval 2.5)")
    tdm_weight: float = knob(0.3, "λ: weight of the CFG direction (and 1 − λ of the reward direction)")
    reward_steps: int | None = knob(None, "j_trunc: steps j < j_trunc get the reward direction (None: all)")
    reward_t_min: float = knob(0.3, "t_min: lower bound of the generator's reward query level (OCR 0.3, GenEval 0.25)")
    huber_c: float | None = knob(None, "pseudo-Huber c of the direction losses (code: off)")
    dmd_weighting: Literal["sample", "batch"] = knob("sample", "direction weights per sample (code) or batch mean")
    # fake score
    fake_teacher_reg: float = knob(0.02, "weight of mean (T − f)² in the fake loss")
    # surrogate (DGPO)
    dpo_beta: float = knob(10.0, "β_dpo of the DGPO group weight (OCR/HPS 10, GenEval/IR 1)")
    clip_eps: float = knob(1e-3, "trust-region ε against the old surrogate (OCR/GenEval 1e-3, IR/HPS 2e-3)")
    surrogate_t_min: float = knob(0.3, "t^s_min: lower bound of the surrogate training level (OCR 0.3, else 0.55)")
    drift_weight: float = knob(1e-3, "weight of R = mean (D_φ − T)² in the surrogate loss")
    drift_threshold: float = knob(0.05, "reference mask applies when R exceeds this")
    time_weight: bool = knob(True, "scale the surrogate loss by (j' + 1)/K")
    adv_clip: float = knob(5.0, "advantage clip")
    # optimisation
    optim: OptimConfig = knob(
        help="AdamW of the roles generator, fake_score, surrogate (code: generator lr 3e-4/4; the surrogate's betas "
        "(0.9, 0.999))",
        factory=lambda: OptimConfig(
            lr=3e-4, adam_betas=[0.0, 0.999], weight_decay=1e-4, grad_clip=1.0,
            roles={"generator": RoleOptim(lr=7.5e-5), "surrogate": RoleOptim(adam_betas=[0.9, 0.999])},
        ),
    )
    ema_decay: float = knob(0.9, "generator EMA decay (with warm-up), every generator update")
    old_decay_start: float = knob(0.001, "old-surrogate decay d_n = min(d_max, start + slope·n)")
    old_decay_slope: float = knob(0.001, "slope of the old-surrogate decay per surrogate update")
    old_decay_max: float = knob(0.3, "maximum old-surrogate decay")

    def __post_init__(self) -> None:
        if self.batch_size < 1 or self.group_size < 2 or self.num_steps < 1:
            raise ValueError("need batch_size >= 1, group_size >= 2 (preference groups) and num_steps >= 1")
        if not self.beta > 0:
            raise ValueError(f"beta must be > 0, got {self.beta}")
        if self.micro_batches < 1 or self.batch_size % self.micro_batches:
            raise ValueError(
                f"micro_batches ({self.micro_batches}) must divide batch_size ({self.batch_size}) so that every "
                "micro-batch holds whole groups"
            )
        if not 1 <= self.train_steps <= self.num_steps:
            raise ValueError(f"train_steps must be in 1..num_steps={self.num_steps}, got {self.train_steps}")
        if self.reward_steps is not None and not 0 <= self.reward_steps <= self.num_steps:
            raise ValueError(f"reward_steps (j_trunc) must be in 0..{self.num_steps} or null, got {self.reward_steps}")
        if not self.shift > 0 or not 0 <= self.level_margin < 1:
            raise ValueError(f"need shift > 0 and 0 <= level_margin < 1, got {self.shift}, {self.level_margin}")
        for name in ("reward_t_min", "surrogate_t_min"):
            if not 0 <= getattr(self, name) < 1:
                raise ValueError(f"{name} must lie in [0, 1), got {getattr(self, name)}")
        if not 0 <= self.tdm_weight <= 1:
            raise ValueError(f"tdm_weight (λ) must lie in [0, 1], got {self.tdm_weight}")
        if self.dpo_beta <= 0 or self.clip_eps <= 0 or self.adv_clip <= 0:
            raise ValueError("dpo_beta, clip_eps and adv_clip must be > 0")
        if self.drift_weight < 0 or self.drift_threshold < 0 or self.fake_teacher_reg < 0:
            raise ValueError("drift_weight, drift_threshold and fake_teacher_reg must be >= 0")
        if not 0 <= self.ema_decay <= 1 or not 0 <= self.old_decay_start <= self.old_decay_max <= 1:
            raise ValueError("need ema_decay in [0, 1] and 0 <= old_decay_start <= old_decay_max <= 1")
        if self.old_decay_slope < 0:
            raise ValueError(f"old_decay_slope must be >= 0, got {self.old_decay_slope}")
        if self.huber_c is not None and self.huber_c <= 0:
            raise ValueError(f"huber_c must be > 0 or null, got {self.huber_c}")


class TDMR1(FewStepMethod):
    """TDM-R1: TDM generator + DGPO surrogate reward model on the deterministic trajectory + reward direction."""

    name = "tdm_r1"
    paper = "Luo et al. 2026, TDM-R1: Reinforcing Few-Step Diffusion Models with Non-Differentiable Reward (arXiv 2603.07700)"
    Config = TDMR1Config
    trainable_roles = ROLES
    snapshot_roles = {"ema": "generator", "old_surrogate": "surrogate"}
    reward_driven = True

    def __init__(
        self, cfg: TDMR1Config, world: Any, rewards: Any = None, seed: int = 0, run_config: dict | None = None
    ):
        super().__init__(cfg, world, rewards, seed, run_config)
        self.ema = EMA("ema", "generator", cfg.ema_decay, warmup=True)
        self.guidance = cfg.guidance if cfg.guidance is not None else float(world.teacher_guidance)
        self.cfg_scale = cfg.cfg_reward_scale if cfg.cfg_reward_scale is not None else self.guidance - 1.0
        self.j_trunc = cfg.num_steps if cfg.reward_steps is None else cfg.reward_steps

    # ------------------------------------------------------------------ setup
    def configure_model(self) -> None:
        fresh = self.backbone is None
        super().configure_model()
        if fresh and self.cfg.init_from:
            roles = {"generator": "ema", "ema": "ema"}
            if self.cfg.init_fake:
                roles["fake_score"] = "fake_score"
            load_roles(self.backbone, self.cfg.init_from, roles)

    def sampling_transition(self) -> Transition:
        return Transition("euler")

    # ------------------------------------------------------------------ randomness helpers
    def levels(self, lower: Tensor, n: int, tag: str) -> Tensor:
        """Levels above ``lower`` (methods.md §4.5): one rank-synchronised draw, or one per sample."""
        cfg = self.cfg
        g = self.rng(tag, per_rank=not cfg.shared_levels)
        u = torch.rand(1 if cfg.shared_levels else n, generator=g, device=g.device, dtype=torch.float32)
        return level_above(lower.float(), u.to(lower.device), cfg.shift, cfg.level_margin).expand(n).to(lower)

    def shared_noise(self, group: Tensor, step: int, tag: str, like: Tensor) -> Tensor:
        """Noise identical for the members of a group, on every rank (keyed by group id, step, epoch, tag)."""
        keys = [str(int(i)) for i in group.tolist()]
        return group_noise(
            keys, step, self.iteration, tuple(like.shape[1:]), stable_hash(self.seed, tag), like.dtype, like.device
        )

    # ------------------------------------------------------------------ losses
    def fake_loss(
        self, x0: Tensor, x_next: Tensor, s_next: Tensor, cond: Any, tag: str, tau: Tensor | None = None
    ) -> Tensor:
        """§4.6(a): anchored-target DSM of the fake score at ``x_τ = a x^G_{j+1} + b n`` + teacher pull.

        ``tau``: the step's level τ_j, shared with the generator loss (§4.5); None draws one."""
        tau = self.levels(s_next, x0.shape[0], f"{tag}/tau") if tau is None else tau
        x_tau = ambient_renoise(x_next, self.randn(x0.shape, self.rng(f"{tag}/noise")).to(x0), tau, s_next).to(x0)
        v_f = self.backbone.velocity(x_tau, tau, cond, "fake_score")
        v_t = None
        if self.cfg.fake_teacher_reg:
            with torch.no_grad():
                v_t = self.backbone.velocity(x_tau, tau, cond, "teacher")
        return tdm_fake_loss(v_f, x_tau, x0.detach(), tau, v_t, self.cfg.fake_teacher_reg)

    def surrogate_loss(
        self, x_s: Tensor, s: Tensor, step: int, cond: Any, adv: Tensor, group: Tensor, tag: str
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """§4.6(b): DGPO on the stored point ``x_{j'+1}`` at level ``τ^s`` with group-shared noise.

        ``regime: tilt``: the advantage-weighted DSM ``mean_i(A_i ℓ_φ,i) + β·R`` instead of DGPO (no group weight, no
        masks; levels above ``s`` only), whose fixed point is ``D = T + Cov(r, u | x_t)/β`` (module docstring)."""
        cfg = self.cfg
        tilt = cfg.regime == "tilt"
        x_s = x_s.detach()
        tau = self.levels(s if tilt else s.clamp_min(cfg.surrogate_t_min), x_s.shape[0], f"{tag}/tau")
        n = self.shared_noise(group, step, f"{tag}/noise", x_s)
        x_t = ambient_renoise(x_s, n, tau, s).to(x_s)
        u = ambient_velocity_target(x_s, n, tau, s)
        v_phi = self.backbone.velocity(x_t, tau, cond, "surrogate")
        with torch.no_grad():
            v_old = self.backbone.velocity(x_t, tau, cond, "old_surrogate")
            v_ref = self.backbone.velocity(x_t, tau, cond, "reference")
        l_phi, l_old, l_ref = per_sample_mse(v_phi, u), per_sample_mse(v_old, u), per_sample_mse(v_ref, u)
        drift = ((v_phi.float() - v_ref.float()) ** 2).mean()
        if tilt:
            with torch.no_grad():
                v_gen = self.backbone.velocity(x_t, tau, cond, "fake_score")
            loss = tilt_regression_loss(v_phi, v_ref, u, v_gen, adv, cfg.beta)
            m = {"tilt_regression": loss.detach()}
        else:
            loss, m = dgpo_loss(
                l_phi,
                l_ref,
                adv,
                group,
                cfg.dpo_beta,
                l_old=l_old,
                clip_eps=cfg.clip_eps,
                drift=drift,
                drift_threshold=cfg.drift_threshold,
                drift_weight=cfg.drift_weight,
            )
        if cfg.time_weight:
            loss = loss * (step + 1) / cfg.num_steps
        m["drift"] = drift.detach()
        m["implicit_reward_gap"] = ((l_ref - l_phi.detach()) * adv.sign()).mean()
        return loss, m

    def generator_loss(
        self, x0: Tensor, x_next: Tensor, s_next: Tensor, j: int, cond: Any, group: Tensor, tag: str,
        tau: Tensor | None = None,
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """§4.6(c): direction losses on the clean estimate ``x̂0`` (its only gradient path).

        Every query of fake, teacher, reference and surrogate runs under ``no_grad``: no role but the generator
        receives a gradient from this loss. ``tau``: the step's level τ_j shared with the fake loss (§4.5); None
        draws one. ``regime: tilt``: the reward direction is queried at the same ``x_τ`` with the same normaliser
        as ``d_kl`` and λ = 0, so the two directions add up to ``x̂0^D − x̂0^F`` (DM toward the surrogate).
        """
        cfg = self.cfg
        n = x0.shape[0]
        tilt = cfg.regime == "tilt"
        tau = self.levels(s_next, n, f"{tag}/tau") if tau is None else tau
        x_tau = ambient_renoise(x_next, self.randn(x0.shape, self.rng(f"{tag}/noise")).to(x0), tau, s_next).to(x0)
        need_uncond = self.guidance != 1.0 or self.cfg_scale != 0.0
        out: dict[str, Tensor] = {}
        with torch.no_grad():
            x0_f = x0_from_v(x_tau, tau, self.backbone.velocity(x_tau, tau, cond, "fake_score"))
            v_c = self.backbone.velocity(x_tau, tau, cond, "teacher")
            x0_c = x0_from_v(x_tau, tau, v_c)
            if need_uncond:
                v_u = self.backbone.velocity(x_tau, tau, self.backbone.null_cond(n), "teacher")
                x0_u = x0_from_v(x_tau, tau, v_u)
                x0_w = x0_from_v(x_tau, tau, v_u + self.guidance * (v_c - v_u))
                d_cfg = self.cfg_scale * (x0_c - x0_u)
            else:
                x0_w, d_cfg = x0_c, torch.zeros_like(x0_c)
            d_kl = x0_c - x0_f
            w_f = direction_weight(x0, x0_w, cfg.dmd_weighting)
            with_rl = tilt or j < self.j_trunc
            if tilt:
                x0_d = x0_from_v(x_tau, tau, self.backbone.velocity(x_tau, tau, cond, "surrogate"))
                d_rl, w_r = x0_d - x0_c, w_f  # reference = frozen base without CFG = x̂0^{T,c}
            elif with_rl:
                tau_r = self.levels(s_next.clamp_min(cfg.reward_t_min), n, f"{tag}/tau_r")
                x_r = ambient_renoise(x_next, self.shared_noise(group, j, f"{tag}/noise_r", x0), tau_r, s_next).to(x0)
                x0_d = x0_from_v(x_r, tau_r, self.backbone.velocity(x_r, tau_r, cond, "surrogate", cfg.rl_guidance))
                x0_ref = x0_from_v(x_r, tau_r, self.backbone.velocity(x_r, tau_r, cond, "reference"))
                d_rl = x0_d - x0_ref
                w_r = direction_weight(x0, x0_d, cfg.dmd_weighting)
        lam = 0.0 if tilt else cfg.tdm_weight
        l_cfg = direction_loss(x0, d_cfg, w_f, cfg.huber_c) if self.cfg_scale != 0.0 and not tilt else None
        l_kl = direction_loss(x0, d_kl, w_f, cfg.huber_c)
        out["generator/kl"] = l_kl.detach()
        if with_rl:
            l_rl = direction_loss(x0, d_rl, w_r, cfg.huber_c)
            loss = (1 - lam) * l_rl + l_kl + (lam * l_cfg if l_cfg is not None else 0.0)
            out["generator/rl"] = l_rl.detach()
            out["generator/d_rl_norm"] = d_rl.float().pow(2).mean().sqrt()
        else:
            loss = lam * (l_kl + (l_cfg if l_cfg is not None else 0.0))
        if l_cfg is not None:
            out["generator/cfg"] = l_cfg.detach()
        return loss, out

    # ------------------------------------------------------------------ evaluation helper
    @torch.no_grad()
    def implicit_reward(self, x0: Tensor, prompts: list[str], draws: int = 8, seed: int = 0) -> Tensor:
        """The surrogate's implicit reward ``E[ℓ_ref − ℓ_φ]`` of clean samples ``x0`` (per sample, ``(B,)``).

        Clean samples (s = 0) re-noised to levels above ``surrogate_t_min`` as in training (one level and noise per
        sample and draw); higher means the surrogate denoises the sample better than the reference, i.e. prefers it.
        """
        cond = self.backbone.encode_prompts(prompts)
        g = torch.Generator(device=x0.device).manual_seed(seed)
        s = torch.zeros(x0.shape[0], device=x0.device, dtype=x0.dtype)
        total = torch.zeros(x0.shape[0], device=x0.device, dtype=torch.float32)
        for _ in range(draws):
            u = torch.rand(x0.shape[0], generator=g, device=x0.device, dtype=torch.float32)
            tau = level_above(
                s.float().clamp_min(self.cfg.surrogate_t_min), u, self.cfg.shift, self.cfg.level_margin
            ).to(x0)
            n = torch.randn(x0.shape, generator=g, device=x0.device, dtype=torch.float32).to(x0)
            x_t = ambient_renoise(x0, n, tau, s).to(x0)
            target = ambient_velocity_target(x0, n, tau, s)
            l_phi = per_sample_mse(self.backbone.velocity(x_t, tau, cond, "surrogate"), target)
            l_ref = per_sample_mse(self.backbone.velocity(x_t, tau, cond, "reference"), target)
            total += (l_ref - l_phi).float()
        return total / draws

    # ------------------------------------------------------------------ the recipe
    def rollout(self, prompts: list[str], conds: list[Any], scores: RolloutScores | None = None) -> list[Trajectory]:
        """Deterministic K-step Euler rollouts of the generator, one trajectory per micro-batch (no grad), each
        handed to ``scores`` when done (black-box rewards score it while the next micro-batch rolls out)."""
        g = self.rng("rollout")
        sigmas = self.sampling_sigmas().to(self.device)
        chunk = len(prompts) // self.cfg.micro_batches
        trajs = []
        with torch.no_grad():
            for c in range(self.cfg.micro_batches):
                trajs.append(sample(self.velocity_fn("generator", conds[c]), self.randn(self.sample_shape(chunk), g),
                                    sigmas, Transition("euler")))
                if scores is not None:
                    scores.add(trajs[-1].final, prompts[c * chunk : (c + 1) * chunk])
        return trajs


    def training_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        cfg = self.cfg
        prompts = list(batch["prompts"])
        group = batch["group"].to(self.device)
        chunk = len(prompts) // cfg.micro_batches
        conds = [self.backbone.encode_prompts(prompts[c * chunk : (c + 1) * chunk]) for c in range(cfg.micro_batches)]
        # 1. rollouts, each micro-batch submitted to the rewards when done
        scores = RolloutScores(self.rewards, self.backbone.decode, self.reward_overlap)
        trajs = self.rollout(prompts, conds, scores)
        # 2. rewards → advantages (black box: no gradient ever leaves the reward)
        reward = scores.combined()
        # GRPO advantages: per-group mean, global std over every rank, clipped (§1.5, §4.4); tilt: leave-one-out, raw
        adv = over_ranks(self, lambda r, g: regime_advantages(r, g, cfg.regime, cfg.adv_clip), reward.detach().float(),
                         group)
        metrics: dict[str, Any] = {"reward": reward.mean(), "adv_abs": adv.abs().mean()}
        # 3. fake → surrogate → generator per trained step, accumulated over micro-batches × steps
        for role in self.trainable_roles:
            self.opt(role).zero_grad(set_to_none=True)
        terms = cfg.micro_batches * cfg.train_steps
        for c, tr in enumerate(trajs):
            sl = slice(c * chunk, (c + 1) * chunk)
            steps = step_subset(range(cfg.num_steps), cfg.train_steps, self.rng(f"steps/{c}", per_rank=False))
            for m, j in enumerate(steps):
                tag = f"mb{c}/m{m}"
                x, sigma, s_next = tr.x_in[j], tr.sigma[j], tr.sigma_next[j]
                v = self.backbone.velocity(x, sigma, conds[c], "generator")
                x0 = x0_from_v(x, sigma, v)
                x_next = (x - (sigma - s_next).reshape(-1, *[1] * (x.ndim - 1)) * v).detach()
                # τ_j shared by the fake and generator losses of this step (§4.5)
                tau = self.levels(s_next, x.shape[0], f"{tag}/tau")
                # a. fake score
                loss_f = self.fake_loss(x0, x_next, s_next, conds[c], f"{tag}/fake", tau)
                self.manual_backward(loss_f / terms)
                # b. surrogate on the stored trajectory point of step j'
                jp = weighted_step(cfg.num_steps, self.rng(f"{tag}/surrogate_step", per_rank=False))
                if cfg.regime == "tilt":  # the clean final sample (s = 0): plain DSM of the generator's law
                    jp = cfg.num_steps - 1
                loss_s, ms = self.surrogate_loss(
                    tr.x_out[jp], tr.sigma_next[jp], jp, conds[c], adv[sl], group[sl], f"{tag}/surrogate"
                )
                self.manual_backward(loss_s / terms)
                # c. generator
                loss_g, mg = self.generator_loss(x0, x_next, s_next, j, conds[c], group[sl], f"{tag}/gen", tau)
                self.manual_backward(loss_g / terms)
                metrics.update(
                    {
                        "fake_score/loss": loss_f.detach(),
                        "surrogate/loss": loss_s.detach(),
                        "generator/loss": loss_g.detach(),
                    }
                )
                metrics.update({f"surrogate/{k}": val for k, val in ms.items()})
                metrics.update(mg)
        # 4. one step per role in the order fake → surrogate → generator; snapshots
        for role in ("fake_score", "surrogate", "generator"):
            metrics[f"{role}/grad_norm"] = self.step_role(role, self.cfg.optim.grad_clip)
        n_sur = self.updates["surrogate"] - 1
        blend_role(
            self.backbone,
            "old_surrogate",
            "surrogate",
            schedule_decay(n_sur, cfg.old_decay_start, cfg.old_decay_slope, 0, cfg.old_decay_max),
        )
        self.ema_update(self.ema)
        self.log_metrics(metrics)


__all__ = ["TDMR1", "TDMR1Config"]
