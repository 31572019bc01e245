"""ReFL / DRaFT: direct reward back-propagation through the last sampling step(s) (methods.md §6.5).

Papers: Xu et al., "ImageReward: Learning and Evaluating Human Preferences for Text-to-Image Generation" (NeurIPS
2023; ReFL), and Clark et al., "Directly Fine-Tuning Diffusion Models on Differentiable Rewards" (ICLR 2024; DRaFT,
DRaFT-K). Differentiable rewards only.

Roles: ``generator`` (trainable), ``teacher`` (frozen reference, used by the regulariser), ``ema`` (snapshot).

Each iteration:

1. Sample the generator's K-step chain (``cps(1.0)``: predict x0 and re-noise, as the DMD-family generators here)
   without gradient up to step ``K − draft_k``, then the last ``draft_k`` executed steps with gradient (DRaFT-K;
   ``draft_k = 1`` is DRaFT-1 = RTDMD's BP branch). ``random_stop: true`` is ReFL: stop at a random step
   k ∈ {1..K} and predict x̂0 = x − σv in one step with gradient.
2. Reward loss ``φ(r(Dec(x̂0)))``: ``objective: linear`` → ``−r/β`` (the first-order term of the tilted objective
   ``E[r]/β − KL``), ``hinge`` → ``ReLU(margin − r)/β`` (ReFL's φ; RTDMD's BP hinge).
3. Regulariser (methods.md §6.5 "optionally mixed with a pretraining/DM loss"): a KL-style velocity penalty
   ``kl_weight · mean‖v_θ(x_j, σ_j) − v_ref^ω(x_j, σ_j)‖²`` on every grad-step state of the chain — for Gaussian
   transitions with shared std this is the per-step KL between the generator's and the reference's kernels up to a
   constant (the Flow-GRPO mean-space KL, methods.md §6.2), and it is the DSM loss toward the reference's
   predictions, i.e. the "pretraining loss" without data. One generator update per iteration; EMA.

Target: none in closed form; for small steps the objective is ``E[r]/β − kl_weight·Σ_j KL_j``, a per-step
(path-space) KL-regularised reward maximisation, not the clean tilted target.

β-regime (``objective: linear``, the toy2d preset) and its fixed point. β is the temperature of the reward term:
the loss is ``−E[r]/β + kl_weight·mean‖v_θ − v_ref‖²`` — KL-regularised RL ``E[r] − β·KL`` with the velocity penalty
standing in for the KL. It cannot reach the tilt exactly: the last (trained) step is deterministic, so no per-step KL
exists there (a Gaussian step's KL ``(1−σ')²σ²‖Δv‖²/(2σ'²)`` diverges as σ' → 0), and the reward acts only through
its gradient at each sample. With a free velocity at the last step the stationary point is
``Δv = −σ_{K−1}·d·∇r/(2β·kl_weight)``, i.e. every sample is *translated* along ∇r by
``σ_{K−1}²·d·∇r/(2β·kl_weight)``: the shift scales as 1/β like the tilt's, but no mass moves between modes and the
spread is unchanged. For a Gaussian component (std s) with a linear reward the tilt is exactly such a translation by
``s²·∇r/β``, so ``kl_weight`` is calibrated once per world scale to make the two equal; the toy2d preset's 0.41 is
that calibration (measured, the parameter sharing across σ makes the shift ~1.6× the free-velocity value). For
mixtures whose tilt reweights modes the translation is the wrong fixed point (README "β regimes").

Deviations: no pretraining data set exists in these worlds, so the DM/pretraining loss is the reference-velocity
regression above; DRaFT-LV's variance reduction is not implemented.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch

from fewstep_rl.config import knob
from fewstep_rl.method import FewStepMethod
from fewstep_rl.objectives.diffused_reward import differentiable_reward_fn
from fewstep_rl.objectives.reward import reward_hinge
from fewstep_rl.optim import OptimConfig, renamed_flat_keys
from fewstep_rl.roles import EMA
from fewstep_rl.sampling import Transition, random_stop, sample, x0_from_v

ROLES: tuple[str, ...] = ("generator",)


@dataclass
class ReFLConfig:
    """Hyper-parameters of ReFL / DRaFT (presets in configs/refl/*.yaml)."""

    # old keys fail with the new name (config.build)
    RENAMED: ClassVar[dict[str, str]] = renamed_flat_keys()

    batch_size: int = knob(64, "prompts per batch per rank")
    num_steps: int = knob(1, "generator sampling steps K")
    shift: float = knob(1.0, "static schedule shift γ of the generator's σ-grid (SD3: 3.0)")
    transition: str = knob("cps(1.0)", "generator chain transition (cps(1.0) = predict x0 and re-noise)")
    draft_k: int = knob(1, "DRaFT-K: back-prop through the last K executed steps (1 = DRaFT-1)")
    random_stop: bool = knob(False, "ReFL: stop at a random step in 1..K and predict x0 from there")
    beta: float = knob(1.0, "reward temperature: the reward loss is φ(r)/β")
    objective: Literal["linear", "hinge"] = knob("linear", "φ: linear = −r, hinge = ReLU(margin − r)")
    margin: float = knob(1.0, "hinge margin m of ReLU(m − r)")
    kl_weight: float = knob(1.0, "weight of the velocity-KL regulariser ‖v_θ − v_ref‖² on the grad-step states")
    guidance: float | None = knob(None, "CFG scale of the reference in the regulariser (default: the world's)")
    optim: OptimConfig = knob(
        help="AdamW of the generator",
        factory=lambda: OptimConfig(lr=1e-3, adam_betas=[0.9, 0.999], weight_decay=0.0, grad_clip=10.0),
    )
    ema_decay: float = knob(0.99, "generator EMA decay per update")
    ema_warmup: bool = knob(False, "EMA decay min((1+n)/(10+n), ema_decay) over the first updates (methods.md §1.6)")

    def __post_init__(self) -> None:
        if self.num_steps < 1 or self.batch_size < 1:
            raise ValueError("num_steps and batch_size must be >= 1")
        if not 1 <= self.draft_k <= self.num_steps:
            raise ValueError(f"draft_k must lie in 1..num_steps={self.num_steps}, got {self.draft_k}")
        if not self.beta > 0:
            raise ValueError(f"beta must be > 0, got {self.beta}")
        if self.kl_weight < 0:
            raise ValueError(f"kl_weight must be >= 0, got {self.kl_weight}")
        if self.objective not in ("linear", "hinge"):
            raise ValueError(f"objective must be 'linear' or 'hinge', got {self.objective!r}")
        Transition.parse(self.transition)


class ReFL(FewStepMethod):
    """ReFL / DRaFT-K: reward back-prop through the last sampler step(s) with a reference-velocity KL regulariser."""

    name = "refl"
    paper = "Xu et al. 2023 ImageReward/ReFL (arXiv 2304.05977); Clark et al. 2024 DRaFT (arXiv 2309.17400)"
    Config = ReFLConfig
    trainable_roles = ROLES
    snapshot_roles = {"ema": "generator"}
    reward_driven = True

    def __init__(self, cfg: ReFLConfig, world: Any, rewards: Any = None, seed: int = 0, run_config: dict | None = None):
        super().__init__(cfg, world, rewards, seed, run_config)
        self.chain = Transition.parse(cfg.transition)
        self.ema = EMA("ema", "generator", cfg.ema_decay, warmup=cfg.ema_warmup)
        self.guidance = cfg.guidance if cfg.guidance is not None else float(world.teacher_guidance)
        differentiable_reward_fn(self.rewards, None, [])  # fail early without a differentiable reward

    def sampling_transition(self) -> Transition:
        return self.chain

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        cfg = self.cfg
        prompts = list(batch["prompts"])
        cond = self.backbone.encode_prompts(prompts)
        n = len(prompts)
        # 1. chain: no-grad prefix, then the last draft_k executed steps with gradient (ReFL: random stop)
        sigmas = self.sampling_sigmas().to(self.device)
        stop = random_stop(cfg.num_steps, self.rng("stop", per_rank=False)) if cfg.random_stop else cfg.num_steps
        k = min(cfg.draft_k, stop)
        g = self.rng("rollout")
        gen = self.velocity_fn("generator", cond)
        x = self.randn(self.sample_shape(n), g)
        if stop - k > 0:
            x = sample(gen, x, sigmas, self.chain, grad="none", stop=stop - k, generator=g).final
        traj = sample(gen, x.detach(), sigmas[stop - k :], self.chain, grad="all", stop=k, generator=g)
        x0 = x0_from_v(traj.x_in[-1] if k == 1 else traj.x_out[-2], traj.sigma[-1], traj.v[-1])
        # 2. reward loss on the decoded clean prediction
        r = differentiable_reward_fn(self.rewards, self.backbone.decode, prompts)(x0)
        if cfg.objective == "hinge":
            loss_r = reward_hinge(r, cfg.margin, 1.0 / cfg.beta)
        else:
            loss_r = -r.double().mean().to(r.dtype) / cfg.beta
        # 3. KL-style regulariser: generator vs reference velocity on the grad-step states
        loss_kl = torch.zeros((), device=x0.device, dtype=torch.float32)
        if cfg.kl_weight > 0:
            for x_j, s_j, v_j in zip(traj.x_in, traj.sigma, traj.v):
                with torch.no_grad():
                    v_ref = self.backbone.velocity(x_j, s_j, cond, "teacher", self.guidance)
                loss_kl = loss_kl + ((v_j.float() - v_ref.float()) ** 2).mean() / len(traj.v)
        loss = loss_r + cfg.kl_weight * loss_kl
        metrics = {
            "stop": stop,
            "generator/loss": loss.detach(),
            "generator/reward": r.detach().mean(),
            "generator/kl": loss_kl.detach(),
        }
        metrics["generator/grad_norm"] = self.update("generator", loss, cfg.optim.grad_clip)
        self.ema_update(self.ema)
        self.log_metrics(metrics)
