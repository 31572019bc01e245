"""``di_star``: the DI++ form — integral-KL Diff-Instruct plus a *terminal* reward on the generator's output (§6.8).

What it implements is DI++ ("Diff-Instruct++", Luo 2024): maximise ``α·E[r(g_θ(z))]`` minus the integral KL
(Diff-Instruct) to the reference, with α = 1/β. It is *not* DI*'s score-based divergence (pseudo-Huber distance
between fake and reference scores, SIM-style gradient; see "Deviations"): the registry key ``di_star`` is kept for
compatibility with existing configs. Papers: Luo et al., "Diff-Instruct*: Towards Human-Preferred One-step
Text-to-image Generative Models" (2024; DI*), and DI++ (2024) for the reward-plus-IKL form implemented here. Used as
the terminal-reward baseline of DIDR (methods.md §3.3 "special cases": replace s_r by a terminal term
−α∇_θ r(g_θ(z))).

Roles: ``generator`` (trainable), ``fake_score`` (trainable "TA" score), ``teacher`` (frozen reference, CFG ω inside
the reference as DI*-IN), ``ema`` (snapshot).

Each iteration:

1. Generator chain exactly as DIDR / DMD2 (``cps(1.0)`` K-step chain, gradient on the last executed step).
2. Generator update every ``fake_updates_per_gen``-th iteration: ``t ~ U[t_min, t_max]``, ``x_t = (1-t)x0 + t n``,
   reference (CFG) and fake clean estimates without gradient, and the terminal reward gradient
   ``∇_{x0} r(Dec(x0))`` (back-prop through decoder and differentiable reward at the clean output). The generator
   step follows ``g = g_DM − ∇_{x0} r/β`` (:func:`~fewstep_rl.objectives.diffused_reward.surrogate_loss`): with
   ``dmd_weighting: kl`` ``g_DM`` is the exact pathwise ``∇KL_t`` (:mod:`fewstep_rl.objectives.kl_dmd`), so the step is
   the gradient of ``KL_t(p_θ,t ‖ p_ref,t) − E[r(x0)]/β``; with ``sample``/``batch`` it is the normalised DMD
   direction (methods.md §1.4) and β is only a relative reward weight (DI++'s α = 1/β).
3. Fake-score DSM on detached generator samples (TTUR). 4. EMA.

β-regime and fixed point (``dmd_weighting: kl``, the toy2d preset): β is DI++'s 1/α, the exact coefficient of
``E[r]`` against the integral KL, so training follows ``∇[E_t KL_t(p_θ,t ‖ p_ref,t) − E[r]/β]``. Target: none
exactly. ``∫ w(t)[KL(p_θ,t ‖ p_ref,t)] dt − E[r]/β`` has its t > 0 KL terms minimised by p_ref, so its
optimum is a reward tilt of p_ref whose strength depends on w(t) (weaker or stronger than the clean tilt
``p_ref·e^{r/β}``); DIDR's diffused reward score removes that mismatch. The reward only acts on the final sample,
which is what makes terminal-reward methods prone to exploiting noise-fragile details of a proxy reward.

Closed form of that fixed point for a Gaussian component (std s) and a linear reward: a translation δ of the
component has ``KL_t = c(t)·δ²/2`` with ``c(t) = (1−t)²/((1−t)²s² + t²)``, so ``E_t[KL_t] − E[r]/β`` is minimised at
``δ = ∇r/(β·c̄)``, ``c̄ = E_{t∼U[t_min,t_max]} c(t)``, while the tilt moves it by ``s²∇r/β`` (= ∇r/(β·c(0))): the
effective temperature is ``β·c̄·s²``. On toy2d (s = 0.5, t ∈ [0.02, 0.98]) c̄ = 1.397, so the predicted reward gain is
``1/(c̄ s²)`` = 2.86× the tilt's at every β — measured: mean reward 2.86 at β = 0.25 (target 1.0, 2000 iterations)
0.69 at β = 1 (target 0.25, predicted 0.72). The ``beta`` knob still sets the temperature monotonically (gain ∝ 1/β); a method that
reaches the clean tilt with a terminal-style reward is DIDR (diffused reward score).

Deviations from DI*: the paper replaces the KL by a score-based divergence (pseudo-Huber distance between fake and
reference scores, SIM-style gradient); here the divergence is the integral KL/DMD one (DI++-style), so DIDR and
this baseline differ only in where the reward acts (diffused score vs terminal gradient). No GAN term.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Literal

from fewstep_rl.config import knob
from fewstep_rl.method import FewStepMethod
from fewstep_rl.objectives import dmd_grad_direction
from fewstep_rl.objectives.diffused_reward import differentiable_reward_fn, reward_input_grad, surrogate_loss
from fewstep_rl.objectives.kl_dmd import kl_dmd_direction
from fewstep_rl.optim import OptimConfig, renamed_flat_keys
from fewstep_rl.roles import EMA
from fewstep_rl.sampling import Transition, x0_from_v
from fewstep_rl.steps import fake_score_flow_matching_step, generator_rollout, renoised_teacher_fake_x0

ROLES: tuple[str, ...] = ("generator", "fake_score")


@dataclass
class DIStarConfig:
    """Hyper-parameters of the DI++-form baseline ``di_star`` (presets in configs/di_star/*.yaml)."""

    # old keys fail with the new name (config.build)
    RENAMED: ClassVar[dict[str, str]] = {"weighting": "dmd_weighting", **renamed_flat_keys("fake_score")}

    batch_size: int = knob(64, "prompts per batch per rank")
    num_steps: int = knob(1, "generator sampling steps K (1 = one-step generator)")
    shift: float = knob(1.0, "static schedule shift γ of the generator's σ-grid (SD3: 3.0)")
    transition: str = knob("cps(1.0)", "generator chain transition (cps(1.0) = predict x0 and re-noise)")
    backward_simulation: bool = knob(False, "random stop index in 1..K (DMD2); false: full chain, grad on last step")
    beta: float = knob(1.0, "reward temperature: reward gradient ∇r/β (DI++'s α = 1/β)")
    optim: OptimConfig = knob(
        help="AdamW of the roles generator, fake_score (a TTUR learning rate: roles.fake_score.lr)",
        factory=lambda: OptimConfig(lr=1e-3, adam_betas=[0.0, 0.99], weight_decay=0.0, grad_clip=10.0),
    )
    fake_updates_per_gen: int = knob(5, "TTUR: fake-score updates per generator update")
    guidance: float | None = knob(None, "reference CFG scale (α_cfg; default: the world's)")
    dmd_weighting: Literal["sample", "batch", "kl"] = knob(
        "sample", "generator loss scale: normalised DMD per sample / per batch, or the exact KL scale (kl)"
    )
    t_min: float = knob(0.02, "lower bound of the re-noising level t")
    t_max: float = knob(0.98, "upper bound of the re-noising level t")
    ema_decay: float = knob(0.99, "generator EMA decay per generator update")
    ema_warmup: bool = knob(False, "EMA decay min((1+n)/(10+n), ema_decay) over the first updates (methods.md §1.6)")

    def __post_init__(self) -> None:
        if self.num_steps < 1 or self.fake_updates_per_gen < 1 or self.batch_size < 1:
            raise ValueError("num_steps, fake_updates_per_gen and batch_size must be >= 1")
        if not self.beta > 0:
            raise ValueError(f"beta must be > 0, got {self.beta}")
        if not 0.0 < self.t_min < self.t_max < 1.0:
            raise ValueError(f"need 0 < t_min < t_max < 1, got {self.t_min}, {self.t_max}")
        Transition.parse(self.transition)


class DIStar(FewStepMethod):
    """The DI++ form (registry key ``di_star``): integral-KL/DMD update plus a terminal reward gradient ∇r/β."""

    name = "di_star"
    paper = (
        "DI++ form: Luo 2024, Diff-Instruct++ (arXiv 2405.18881) — integral KL + terminal reward; "
        "not DI*'s score divergence (arXiv 2410.20898)"
    )
    Config = DIStarConfig
    trainable_roles = ROLES
    snapshot_roles = {"ema": "generator"}
    reward_driven = True

    def __init__(
        self, cfg: DIStarConfig, world: Any, rewards: Any = None, seed: int = 0, run_config: dict | None = None
    ):
        super().__init__(cfg, world, rewards, seed, run_config)
        self.chain = Transition.parse(cfg.transition)
        self.ema = EMA("ema", "generator", cfg.ema_decay, warmup=cfg.ema_warmup)
        self.guidance = cfg.guidance if cfg.guidance is not None else float(world.teacher_guidance)
        differentiable_reward_fn(self.rewards, None, [])  # fail early without a differentiable reward

    def sampling_transition(self) -> Transition:
        return self.chain

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        cfg = self.cfg
        # 1. prompts, conditioning, generator chain
        prompts = list(batch["prompts"])
        cond = self.backbone.encode_prompts(prompts)
        n = len(prompts)
        gen_step = self.iteration % cfg.fake_updates_per_gen == 0
        traj = generator_rollout(self, cond, n, num_steps=cfg.num_steps, backward_simulation=cfg.backward_simulation,
                                 grad="last" if gen_step else "none")
        x0 = x0_from_v(traj.x_in[-1], traj.sigma[-1], traj.v[-1])
        metrics: dict[str, Any] = {"stop": traj.stop}
        # 2. generator: IKL/DMD direction plus the terminal reward gradient
        if gen_step:
            _, t, x0_ref, x0_fake = renoised_teacher_fake_x0(
                self, x0, cond, tag="ikl", t_min=cfg.t_min, t_max=cfg.t_max, guidance=self.guidance
            )
            grad_r, r = reward_input_grad(differentiable_reward_fn(self.rewards, self.backbone.decode, prompts), x0)
            if cfg.dmd_weighting == "kl":
                g_dm, reduce = kl_dmd_direction(x0, x0_fake, x0_ref, t), "sample_sum"
            else:
                g_dm, reduce = dmd_grad_direction(x0, x0_fake, x0_ref, cfg.dmd_weighting), "mean"
            loss_g = surrogate_loss(x0, g_dm - grad_r.double() / cfg.beta, reduce)
            metrics["generator/loss"] = loss_g.detach()
            metrics["generator/reward"] = r.mean()
            metrics["generator/grad_norm"] = self.update("generator", loss_g, cfg.optim.grad_clip)
            self.ema_update(self.ema)
        # 3. fake score: flow-matching DSM on the detached generator samples
        metrics.update(fake_score_flow_matching_step(self, x0, cond, grad_clip=cfg.optim.grad_clip))
        self.log_metrics(metrics)
