"""DMD2: improved distribution matching distillation (baseline, methods.md §6.1).

Paper: Yin et al., "Improved Distribution Matching Distillation for Fast Image Synthesis", NeurIPS 2024
(arXiv 2405.14867); reference code ``tianweiy/DMD2`` (``main/sd_guidance.py``).

Roles: ``generator`` (trainable adapter), ``fake_score`` (trainable adapter, the "fake" diffusion model of the
generator's distribution), ``teacher`` (frozen base, the "real score", queried with CFG), ``ema`` (snapshot).

Each iteration (one prompt batch) is the recipe:

1. Backward simulation (DMD2 §4.3): draw a stop index k ∈ {1..K} (same on every rank), run the generator's own
   K-step chain from pure noise for k steps — the chain predicts x̂0 and re-noises it to the next level with fresh
   noise, i.e. the ``cps(1.0)`` transition x' = (1−σ')x̂0 + σ'z — and keep x̂0 = x − σ v of step k (methods.md §1.1)
   with gradient on that last step only (on generator iterations).
2. Generator update every ``fake_updates_per_gen``-th iteration (two time-scale update rule): re-noise
   x_t = (1−t)x̂0 + t n with t ~ U[t_min, t_max] (DMD2: [0.02, 0.98]), teacher (CFG ω) and fake clean estimates
   x̂0_T, x̂0_F without gradient, and the normalised DMD loss (methods.md §1.4, in fp64)
   ``L = ½ mean(x̂0 − sg(x̂0 − g))²``, ``g = (x̂0_F − x̂0_T)/mean|x̂0 − x̂0_T|`` — its gradient is ∝ the difference of
   the fake and real scores, i.e. ∇ KL(p_gen ‖ p_teacher) (DMD Eq. 7).
3. Fake-score update every iteration: flow-matching denoising loss ‖v_fake(x_t, t) − (n − x̂0)‖² on the detached
   generator samples, t ~ U(0, 1] — it tracks the generator's current distribution.
4. EMA of the generator.

Target distribution in theory: the teacher's (CFG-guided if ω > 1) distribution p_teacher(x|c); the generator
minimises KL(p_gen ‖ p_teacher). Not reward-driven (rewards, if configured, are only evaluated).

Deviations from the paper:
    * No GAN loss. DMD2's GAN head is a classifier on the fake score UNet's bottleneck features; it is tied to a
      backbone's internals (and absent for the analytic toy2d teacher). Without it DMD2 is "DMD2 w/o GAN" of the
      paper's ablation (Table 3), which still matches the teacher in distribution.
    * One rollout per iteration feeds both updates (the reference code does the same: the guidance model is trained
      on the generator's detached output of the same step).
    * The fake score's t is sampled uniformly in σ (flow convention) rather than over DDPM timesteps.
    * ``backward_simulation: false`` (used by the toy2d preset) always runs the full K-step chain and trains only its
      last step, so the fake score models exactly the distribution that is sampled. With the random stop the fake
      score models the *mixture* of the k-step outputs, and in toy2d the hard one-step output (k = 1) biases the
      generator's final output: measured energy distance to the teacher 0.025 vs 0.003 after 3000 iterations.
    * ``dmd_weighting: batch`` divides by the batch mean of |x̂0 − x̂0_T| instead of the per-sample mean (the per-sample
      weight has infinite variance in 2-D); the fixed point is unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Literal

from fewstep_rl.config import knob
from fewstep_rl.method import FewStepMethod
from fewstep_rl.objectives import dmd_loss
from fewstep_rl.optim import OptimConfig, renamed_flat_keys
from fewstep_rl.roles import EMA
from fewstep_rl.sampling import Transition, x0_from_v
from fewstep_rl.steps import fake_score_flow_matching_step, generator_rollout, renoised_teacher_fake_x0

ROLES: tuple[str, ...] = ("generator", "fake_score")


@dataclass
class DMD2Config:
    """Hyper-parameters of DMD2 (defaults: toy scale; see configs/dmd2/*.yaml for presets)."""

    # old keys fail with the new name (config.build)
    RENAMED: ClassVar[dict[str, str]] = {"dmd_normalizer": "dmd_weighting", **renamed_flat_keys("fake_score")}

    beta: float | None = knob(
        None, "ignored by training (distillation-only; accepted so one shared β config runs every method)"
    )
    batch_size: int = knob(64, "prompts per batch per rank")
    num_steps: int = knob(4, "generator sampling steps K")
    shift: float = knob(1.0, "static schedule shift γ of the generator's σ-grid (SD3: 3.0)")
    transition: str = knob("cps(1.0)", "generator chain transition: cps(1.0) = predict x0 and re-noise (DMD2)")
    backward_simulation: bool = knob(
        True, "random stop index k in 1..K (DMD2); false: always the full K-step chain, gradient on its last step"
    )
    optim: OptimConfig = knob(
        help="AdamW of the roles generator, fake_score (a TTUR learning rate: roles.fake_score.lr); DMD2 SDXL uses "
        "betas (0.0, 0.999) for the GAN setup",
        factory=lambda: OptimConfig(lr=1e-3, adam_betas=[0.0, 0.99], weight_decay=0.0, grad_clip=10.0),
    )
    fake_updates_per_gen: int = knob(5, "TTUR: fake-score updates per generator update")
    guidance: float | None = knob(None, "teacher CFG scale ω in the DMD loss (default: the world's)")
    dmd_weighting: Literal["sample", "batch"] = knob(
        "sample", "DMD normaliser mean|x0 − x0_teacher|: per sample (paper) or over the batch (low-dim worlds)"
    )
    t_min: float = knob(0.02, "lower bound of the DMD re-noising level")
    t_max: float = knob(0.98, "upper bound of the DMD re-noising level")
    ema_decay: float = knob(0.99, "generator EMA decay per generator update")
    ema_warmup: bool = knob(False, "EMA decay min((1+n)/(10+n), ema_decay) over the first updates (methods.md §1.6)")

    def __post_init__(self) -> None:
        if self.num_steps < 1 or self.fake_updates_per_gen < 1 or self.batch_size < 1:
            raise ValueError("num_steps, fake_updates_per_gen and batch_size must be >= 1")
        if not 0.0 <= self.t_min < self.t_max <= 1.0:
            raise ValueError(f"need 0 <= t_min < t_max <= 1, got {self.t_min}, {self.t_max}")
        Transition.parse(self.transition)


class DMD2(FewStepMethod):
    """DMD2 (without GAN): fake-score DSM + normalised DMD generator loss with TTUR and backward simulation."""

    name = "dmd2"
    paper = "Yin et al. 2024, Improved Distribution Matching Distillation (arXiv 2405.14867)"
    Config = DMD2Config
    trainable_roles = ROLES
    snapshot_roles = {"ema": "generator"}

    def __init__(self, cfg: DMD2Config, world: Any, rewards: Any = None, seed: int = 0, run_config: dict | None = None):
        super().__init__(cfg, world, rewards, seed, run_config)
        self.chain = Transition.parse(cfg.transition)
        self.ema = EMA("ema", "generator", cfg.ema_decay, warmup=cfg.ema_warmup)
        self.guidance = cfg.guidance if cfg.guidance is not None else float(world.teacher_guidance)

    def sampling_transition(self) -> Transition:
        return self.chain

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        cfg = self.cfg
        # 1. prompts and conditioning
        prompts = batch["prompts"]
        cond = self.backbone.encode_prompts(prompts)
        n = len(prompts)
        gen_step = self.iteration % cfg.fake_updates_per_gen == 0
        # 2. backward simulation: the generator's own chain, gradient on the last executed step
        traj = generator_rollout(self, cond, n, num_steps=cfg.num_steps, backward_simulation=cfg.backward_simulation,
                                 grad="last" if gen_step else "none")
        x0 = x0_from_v(traj.x_in[-1], traj.sigma[-1], traj.v[-1])
        metrics: dict[str, Any] = {"stop": traj.stop}
        # 3. generator: normalised DMD loss at a random re-noising level (TTUR)
        if gen_step:
            _, _, x0_teacher, x0_fake = renoised_teacher_fake_x0(
                self, x0, cond, tag="dmd", t_min=cfg.t_min, t_max=cfg.t_max, guidance=self.guidance
            )
            loss_g = dmd_loss(x0, x0_fake, x0_teacher, cfg.dmd_weighting)
            metrics["generator/loss"] = loss_g.detach()
            metrics["generator/grad_norm"] = self.update("generator", loss_g, cfg.optim.grad_clip)
            self.ema_update(self.ema)
        # 4. fake score: flow matching on the generator's detached samples
        metrics.update(fake_score_flow_matching_step(self, x0, cond, grad_clip=cfg.optim.grad_clip))
        self.log_metrics(metrics)
