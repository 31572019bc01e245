"""TDM: Trajectory Distribution Matching for few-step generators (baseline, methods.md §4.1, §6.7).

Paper: Luo et al., "Learning Few-Step Diffusion Models by Trajectory Distribution Matching" (arXiv 2503.06674);
reference code ``Luo-Yihong/TDM`` (``train_tdm_demo.py``).

Roles: ``generator`` (trainable adapter, a K-step *deterministic* sampler), ``fake_score`` (trainable adapter: the
diffusion model of the generator's per-step clean estimates), ``teacher`` (frozen base, CFG ω), ``ema`` (snapshot,
the sampling role).

Each iteration (one prompt batch) is the recipe:

1. Rollout (no grad): the generator's deterministic K-step Euler chain from pure noise; store ``x_j`` at every
   boundary ``σ_j`` (methods.md §1.2 Euler).
2. Choose ``train_steps`` step indices j (uniform without replacement, rank-synchronised) and one level per step
   ``τ_j`` uniform in pre-shift time above ``σ_{j+1}`` with a 0.02 margin (methods.md §4.5; shared by the batch unless
   ``shared_levels: false``). For each chosen j:
   a. Generator velocity with gradient at ``x_j``: ``x̂0 = x_j − σ_j v_G``, Euler next point
      ``x^G_{j+1} = x_j − (σ_j − σ_{j+1}) v_G`` (detached); re-noise ``x_τ = a x^G_{j+1} + b n`` (ambient kernel,
      §1.3, s = σ_{j+1}).
   b. Fake score (§4.6(a)): ``mean (u − f(x_τ))² + reg · mean (T(x_τ) − f(x_τ))²``, ``u = (x_τ − x̂0)/τ``.
   c. Generator (§4.1, §1.4): teacher (CFG ω) and fake clean estimates at ``x_τ`` (no grad), direction
      ``d = x̂0^{T,ω} − x̂0^F`` = ``(x̂0^{T,c} − x̂0^F) + (ω − 1)(x̂0^{T,c} − x̂0^{T,∅})``, weight
      ``w = mean|x̂0 − x̂0^{T,ω}|``, ``L = mean[ρ((sg(x̂0 + d) − x̂0)²)/w]`` (optional pseudo-Huber ρ).
   Gradients are accumulated over the chosen steps (÷ train_steps); then one optimiser step of the fake score, then
   one of the generator (1:1, the demo's ratio; order fake → generator as in TDM-R1 §4.7).
3. Generator EMA.

Target distribution in theory: the CFG-guided teacher's distribution, matched along the trajectory: at every step the
generator's clean estimate follows the score difference between the guided teacher and the fake model of the
generator's own clean estimates (an integral KL over levels above the step's boundary).

Knobs: ``guidance`` (ω; default the world's), ``train_steps`` (steps trained per iteration), ``level_margin``,
``fake_teacher_reg``, ``huber_c``, ``dmd_weighting`` (``batch`` for toy2d), learning rates (demo: generator lr = fake lr/5,
Adam β = (0, 0.95)).

Deviations from the reference code:
    * The fake score regresses velocities on the anchored target (methods.md §4.6(a), the TDM-R1 form) instead of the
      demo's x0-space MSE weighted by min(SNR, 5) × an importance weight for the mixed noise.
    * Rollouts use the Euler chain that training assumes. Released TDM models are *sampled* with DPM-Solver++(2M);
      training treats every step as an Euler step, so Euler keeps rollout and training consistent (no solver here).
    * ``dmd_weighting: batch`` (toy2d) divides by the batch mean of ``|x̂0 − x̂0^T|`` (infinite-variance weights in 2-D).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
from torch import Tensor

from fewstep_rl.config import knob
from fewstep_rl.method import FewStepMethod
from fewstep_rl.objectives import ambient_renoise, direction_loss
from fewstep_rl.objectives.tdm import direction_weight, tdm_fake_loss
from fewstep_rl.optim import OptimConfig, renamed_flat_keys
from fewstep_rl.roles import EMA
from fewstep_rl.sampling import Transition, sample, x0_from_v
from fewstep_rl.sampling.subsets import step_subset
from fewstep_rl.sampling.tdm_times import level_above

ROLES: tuple[str, ...] = ("generator", "fake_score")


@dataclass
class TDMConfig:
    """Hyper-parameters of TDM (defaults: the demo's where scale-free; see configs/tdm/*.yaml)."""

    # old keys fail with the new name (config.build)
    RENAMED: ClassVar[dict[str, str]] = {"normalizer": "dmd_weighting", **renamed_flat_keys("generator")}

    beta: float | None = knob(None, "ignored by training (distillation-only; accepted so one shared β config runs every method)")
    batch_size: int = knob(16, "prompts per batch per rank")
    num_steps: int = knob(4, "generator steps K (deterministic Euler chain)")
    shift: float = knob(1.0, "static schedule shift γ of the σ-grid and of the level sampling (SD3: 3.0)")
    guidance: float | None = knob(None, "teacher CFG ω in the direction (default: the world's)")
    train_steps: int = knob(1, "trajectory steps trained per iteration (rank-synchronised, without replacement)")
    shared_levels: bool = knob(True, "one τ per step for the whole batch (TDM-R1 code); false: one per sample")
    level_margin: float = knob(0.02, "pre-shift margin of τ above the step's lower boundary (code: 20/1000)")
    optim: OptimConfig = knob(
        help="AdamW of the roles generator, fake_score (demo: generator lr = fake lr/5 via roles.generator.lr, "
        "betas (0, 0.95))",
        factory=lambda: OptimConfig(lr=1e-4, adam_betas=[0.0, 0.95], weight_decay=0.0, grad_clip=1.0),
    )
    fake_teacher_reg: float = knob(0.0, "weight of mean (T − f)² in the fake loss (TDM-R1: 0.02)")
    huber_c: float | None = knob(None, "pseudo-Huber c of the direction loss (demo option 1e-3; None: squared)")
    dmd_weighting: Literal["sample", "batch"] = knob("sample", "direction weight mean|x̂0 − x̂0^T|: per sample or batch")
    ema_decay: float = knob(0.99, "generator EMA decay per generator update")
    ema_warmup: bool = knob(True, "EMA decay min((1+n)/(10+n), ema_decay) (methods.md §1.6)")

    def __post_init__(self) -> None:
        if self.batch_size < 1 or self.num_steps < 1:
            raise ValueError("batch_size and num_steps must be >= 1")
        if not 1 <= self.train_steps <= self.num_steps:
            raise ValueError(f"train_steps must be in 1..num_steps={self.num_steps}, got {self.train_steps}")
        if not self.shift > 0 or not 0 <= self.level_margin < 1:
            raise ValueError(f"need shift > 0 and 0 <= level_margin < 1, got {self.shift}, {self.level_margin}")
        if self.fake_teacher_reg < 0 or (self.huber_c is not None and self.huber_c <= 0):
            raise ValueError("fake_teacher_reg must be >= 0 and huber_c > 0 (or null)")
        if not 0 <= self.ema_decay <= 1:
            raise ValueError(f"ema_decay must lie in [0, 1], got {self.ema_decay}")


class TDM(FewStepMethod):
    """TDM: trajectory distribution matching of a deterministic K-step generator against a CFG teacher."""

    name = "tdm"
    paper = "Luo et al. 2025, Learning Few-Step Diffusion Models by Trajectory Distribution Matching (arXiv 2503.06674)"
    Config = TDMConfig
    trainable_roles = ROLES
    snapshot_roles = {"ema": "generator"}

    def __init__(self, cfg: TDMConfig, world: Any, rewards: Any = None, seed: int = 0, run_config: dict | None = None):
        super().__init__(cfg, world, rewards, seed, run_config)
        self.ema = EMA("ema", "generator", cfg.ema_decay, warmup=cfg.ema_warmup)
        self.guidance = cfg.guidance if cfg.guidance is not None else float(world.teacher_guidance)

    def sampling_transition(self) -> Transition:
        return Transition("euler")

    # ------------------------------------------------------------------ pieces
    def levels(self, lower: Tensor, n: int, tag: str) -> Tensor:
        """τ above ``lower`` (methods.md §4.5): one shared draw (rank-synchronised) or one per sample."""
        cfg = self.cfg
        g = self.rng(tag, per_rank=not cfg.shared_levels)
        u = torch.rand(1 if cfg.shared_levels else n, generator=g, device=g.device, dtype=torch.float32)
        return level_above(lower.float(), u.to(lower.device), cfg.shift, cfg.level_margin).expand(n).to(lower)

    def step_losses(self, x: Tensor, sigma: Tensor, sigma_next: Tensor, cond: Any, tag: str) -> dict[str, Tensor]:
        """Fake and generator losses of one trajectory step (recipe 2a–2c)."""
        cfg = self.cfg
        v = self.backbone.velocity(x, sigma, cond, "generator")
        x0 = x0_from_v(x, sigma, v)
        x_next = (x - (sigma - sigma_next).reshape(-1, *[1] * (x.ndim - 1)) * v).detach()
        tau = self.levels(sigma_next, x.shape[0], f"{tag}/tau")
        n = self.randn(x.shape, self.rng(f"{tag}/noise")).to(x)
        x_tau = ambient_renoise(x_next, n, tau, sigma_next).to(x)
        v_f = self.backbone.velocity(x_tau, tau, cond, "fake_score")
        with torch.no_grad():
            v_t = self.backbone.velocity(x_tau, tau, cond, "teacher") if cfg.fake_teacher_reg else None
            x0_teacher = x0_from_v(x_tau, tau, self.backbone.velocity(x_tau, tau, cond, "teacher", self.guidance))
            x0_fake = x0_from_v(x_tau, tau, v_f.detach())
        loss_f = tdm_fake_loss(v_f, x_tau, x0.detach(), tau, v_t, cfg.fake_teacher_reg)
        w = direction_weight(x0, x0_teacher, cfg.dmd_weighting)
        loss_g = direction_loss(x0, x0_teacher - x0_fake, w, cfg.huber_c)
        return {"fake": loss_f, "generator": loss_g}


    # ------------------------------------------------------------------ the recipe
    def training_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        cfg = self.cfg
        prompts = list(batch["prompts"])
        cond = self.backbone.encode_prompts(prompts)
        n = len(prompts)
        # 1. deterministic rollout of the generator
        g = self.rng("rollout")
        with torch.no_grad():
            traj = sample(
                self.velocity_fn("generator", cond),
                self.randn(self.sample_shape(n), g),
                self.sampling_sigmas().to(self.device),
                Transition("euler"),
            )
        # 2. chosen steps: fake and generator losses, accumulated
        steps = step_subset(range(cfg.num_steps), cfg.train_steps, self.rng("steps", per_rank=False))
        for role in self.trainable_roles:
            self.opt(role).zero_grad(set_to_none=True)
        metrics: dict[str, Any] = {}
        for j in steps:
            losses = self.step_losses(traj.x_in[j], traj.sigma[j], traj.sigma_next[j], cond, f"step{j}")
            self.manual_backward((losses["fake"] + losses["generator"]) / len(steps))
            metrics["fake_score/loss"] = losses["fake"].detach()
            metrics["generator/loss"] = losses["generator"].detach()
        metrics["fake_score/grad_norm"] = self.step_role("fake_score", self.cfg.optim.grad_clip)
        metrics["generator/grad_norm"] = self.step_role("generator", self.cfg.optim.grad_clip)
        # 3. EMA
        self.ema_update(self.ema)
        self.log_metrics(metrics)


__all__ = ["TDM", "TDMConfig"]
