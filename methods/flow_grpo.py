"""Flow-GRPO: online RL for flow models with SDE rollouts, group advantages and PPO (baseline, methods.md §6.2).

Paper: Liu et al., "Flow-GRPO: Training Flow Matching Models via Online RL" (arXiv 2505.05470); reference code
``yifan123/flow_grpo`` (``config/grpo.py``, ``flow_grpo/diffusers_patch/sd3_sde_with_logprob.py``).

Roles: ``generator`` (trainable adapter, the policy), ``ref_policy`` (frozen snapshot of the generator at the start:
the KL reference, i.e. the pretrained model — or the ``init_from`` generator), ``ema`` (parameter EMA, sampling role),
``teacher`` (frozen base; unused by the loss).

Each iteration (one epoch = ``batch_size`` prompts × ``group_size`` samples per rank) is the recipe:

1. Rollouts (no grad) with a stochastic transition (Flow-GRPO: the SDE of methods.md §1.2 ``flow_sde(0.7)``; for
   few-step generators ``cps(η)``), CFG ``guidance`` in rollout and training, Gaussian per-step log-probs
   ``mean_d[−(x'−μ)²/(2 std²) − log std − ½ log 2π]`` stored; independent initial noise per sample (optionally shared
   by a group: ``shared_init_noise``, DanceGRPO style, keyed by (seed, prompt, epoch) so identical on every rank).
   Rolled out in ``opt_steps_per_epoch`` chunks, which are also the optimisation chunks.
2. Rewards of the decoded samples (weighted sum), GRPO advantages ``(r − mean_group)/(std_global + 1e-4)`` over every
   rank, clipped to ±``adv_clip`` (§1.5).
3. For each chunk (one optimiser step each; Flow-GRPO: two per epoch), for each trained step ``j`` (the stochastic
   steps, or a rank-synchronised random ``train_steps`` of them): recompute ``log π_θ`` and the mean ``μ_θ``,
   ``L = PPO-clip(ρ, A, ε) + kl_coef · ‖μ_θ − μ_ref‖²/(2 std²)`` (``mean_kl``), accumulated ÷ #steps. In the first chunk
   ρ is exactly 1 (same weights as the rollout).
4. Parameter EMA with warm-up ``min((1+n)/(10+n), d)`` every ``ema_every`` optimiser steps (§1.6).

Target distribution and β. ``regime: paper`` (the sd3/shapes presets) is the paper's loss: standardised, clipped
advantages and ``kl_coef`` 0.04, whose optimum ``p_ref·exp(A/kl_coef)`` is in units of the batch's reward std — no
fixed tilt of the teacher; ``beta`` is then only the evaluation temperature. ``regime: tilt`` (the toy2d preset) makes
``beta`` the training temperature. Derivation: KL-regularised RL ``max_θ E[r(x_0)] − β·KL(p_θ^path ‖ p_ref^path)``
over the chain's paths has the optimum ``p*(path) ∝ p_ref(path)·exp(r(x_0)/β)`` (Gibbs variational principle), whose
``x_0``-marginal is ``p_ref-chain(x_0)·exp(r/β)/Z``. The path KL is the sum of the per-step Gaussian KLs
``Σ_j ‖μ_θ − μ_ref‖²/(2 std_j²)`` (chain rule of KL), and its policy gradient is ``E[(r − b)·Σ_j ∇log π_θ(x_{j+1}|x_j)]``.
With the per-step loss ``−A·ρ_j + kl·mean_kl_j`` averaged over the trained steps (both the log-prob and ``mean_kl``
are per-dimension means, so the common 1/(d·#steps) factor cancels), the stationary point is exactly that optimum
when ``A`` is in reward units with a baseline independent of the sample and ``kl = β``. So ``regime: tilt`` uses
raw leave-one-out advantages ``r_i − mean_{j≠i} r_j`` (:func:`~fewstep_rl.objectives.advantages.loo_advantages`; no
std, no clip) and the coefficient ``β`` in place of ``kl_coef``; with ``opt_steps_per_epoch: 1`` every ratio is 1
and the PPO clip never binds. Fixed point: the tilt of the *reference chain's* marginal (the chain of the starting
policy, not the teacher's exact law), provided every step is Gaussian: a ``cps(η)`` chain's deterministic last step
has no likelihood, so it is neither trained by the policy gradient nor covered by the KL and moves only through
parameters shared across σ — measured on toy2d with the 4-step ``cps(0.9)`` chain, the trained mean reward was 0.42 at
β = 0.25 and 0.112 at β = 1 against the targets' 0.99 and 0.24 (∝ 1/β, but 43 % of the gain), hence ``flow_sde`` in
the toy2d preset. For a linear reward the tilt moves each component's mean by its variance/β, so the reward gain is
the reference chain's variance over the teacher's: the Euler–Maruyama ``flow_sde(0.7)`` chain of the exact toy2d
teacher has variance 0.2255 / 0.2356 / 0.2461 (90 / 94 / 98.5 % of the exact 0.25) at 8 / 16 / 32 steps (20 000
samples), and the trained gains followed: 85 % (8 steps), 89 % (16), 92 % at β = 0.25 and 94 % at β = 1 (32 steps,
400 epochs; 1000 epochs at 16 steps gave the same 89 %, so it is the chain, not convergence). The toy2d preset uses 32
steps. README
"β regimes".

Deviations from the paper:
    * Few-step use (as RTDMD's config does): a ``cps(η)`` chain whose last step is deterministic, so it is never trained
      (a point mass has no likelihood ratio); Flow-GRPO proper uses 10 SDE steps and evaluates with 40 ODE steps.
    * Rollout chunks are not shuffled before training (chunk = optimisation batch), so recomputed log-probs of the
      first chunk are bit-identical to the rollout's.
    * No CFG by default (``guidance`` 1: few-step generators are CFG-free); Flow-GRPO uses 4.5 in rollout and training.
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
from fewstep_rl.objectives import mean_kl, ppo_clip_loss, regime_advantages
from fewstep_rl.optim import OptimConfig, renamed_flat_keys
from fewstep_rl.rewards import RolloutScores
from fewstep_rl.roles import EMA
from fewstep_rl.sampling import NoiseSource, Trajectory, Transition, recompute_log_prob, sample, transition_mean_std
from fewstep_rl.sampling.noise import group_noise
from fewstep_rl.sampling.subsets import step_subset

ROLES: tuple[str, ...] = ("generator",)


@dataclass
class FlowGRPOConfig:
    """Hyper-parameters of Flow-GRPO (defaults: the paper's where scale-free; see configs/flow_grpo/*.yaml)."""

    # old keys fail with the new name (config.build)
    RENAMED: ClassVar[dict[str, str]] = renamed_flat_keys()

    beta: float = knob(1.0, "β of the target p_ref·exp(r/β): the KL coefficient with regime tilt; else evaluation only")
    regime: Literal["paper", "tilt"] = knob(
        "paper", "paper: std-normalised clipped advantages + kl_coef; tilt: raw leave-one-out advantages + KL coef β"
    )
    batch_size: int = knob(4, "prompts per epoch per rank")
    group_size: int = knob(8, "samples per prompt K (Flow-GRPO: 24)")
    num_steps: int = knob(4, "sampling steps (Flow-GRPO: 10 SDE steps; few-step generators: 4)")
    shift: float = knob(1.0, "static schedule shift γ of the σ-grid (SD3: 3.0)")
    transition: str = knob("cps(0.9)", "stochastic rollout transition: flow_sde(0.7) (paper) or cps(η) (few-step)")
    guidance: float = knob(1.0, "CFG scale of the policy in rollout and training (Flow-GRPO: 4.5)")
    init_from: str | None = knob(None, "checkpoint of an earlier run: generator, ref_policy, ema ← its ema")
    optim: OptimConfig = knob(
        help="AdamW of the generator (Flow-GRPO LoRA: lr 3e-4)",
        factory=lambda: OptimConfig(lr=3e-4, adam_betas=[0.9, 0.999], weight_decay=1e-4, grad_clip=1.0),
    )
    ppo_clip: float = knob(1e-4, "PPO clip ε")
    adv_clip: float = knob(5.0, "advantage clip")
    kl_coef: float = knob(0.04, "β_KL of the mean-space KL to the reference policy (0 = off; regime tilt uses beta)")
    opt_steps_per_epoch: int = knob(2, "optimiser steps per epoch (rollout chunks)")
    train_steps: int | None = knob(None, "stochastic steps trained per epoch, random and rank-synchronised (None: all)")
    shared_init_noise: bool = knob(False, "one initial noise per prompt group (DanceGRPO); Flow-GRPO: independent")
    ema_decay: float = knob(0.9, "parameter-EMA decay (with warm-up)")
    ema_every: int = knob(8, "EMA every this many optimiser steps")

    def __post_init__(self) -> None:
        if self.batch_size < 1 or self.group_size < 2 or self.num_steps < 2:
            raise ValueError("need batch_size >= 1, group_size >= 2 (GRPO groups) and num_steps >= 2")
        if not self.beta > 0:
            raise ValueError(f"beta must be > 0, got {self.beta}")
        tr = Transition.parse(self.transition)
        if tr.kind == "euler" or tr.eta == 0:
            raise ValueError(f"transition {self.transition!r} is deterministic; GRPO needs a stochastic one")
        total = self.batch_size * self.group_size
        if self.opt_steps_per_epoch < 1 or total % self.opt_steps_per_epoch:
            raise ValueError(
                f"opt_steps_per_epoch ({self.opt_steps_per_epoch}) must divide batch_size·group_size ({total})"
            )
        if self.train_steps is not None and self.train_steps < 1:
            raise ValueError(f"train_steps must be >= 1 or null, got {self.train_steps}")
        if self.ppo_clip <= 0 or self.adv_clip <= 0 or self.kl_coef < 0:
            raise ValueError("ppo_clip and adv_clip must be > 0 and kl_coef >= 0")
        if self.ema_every < 1 or not 0 <= self.ema_decay <= 1:
            raise ValueError("ema_decay must lie in [0, 1] and ema_every must be >= 1")


class FlowGRPO(FewStepMethod):
    """Flow-GRPO: stochastic rollouts, GRPO advantages, PPO-clip + mean-space KL to the reference policy."""

    name = "flow_grpo"
    paper = "Liu et al. 2025, Flow-GRPO: Training Flow Matching Models via Online RL (arXiv 2505.05470)"
    Config = FlowGRPOConfig
    trainable_roles = ROLES
    snapshot_roles = {"ema": "generator", "ref_policy": "generator"}
    reward_driven = True

    def __init__(self, cfg: FlowGRPOConfig, world: Any, rewards: Any = None, seed: int = 0,
                 run_config: dict | None = None):
        super().__init__(cfg, world, rewards, seed, run_config)
        self.chain = Transition.parse(cfg.transition)
        self.ema = EMA("ema", "generator", cfg.ema_decay, every=cfg.ema_every, warmup=True)

    def configure_model(self) -> None:
        fresh = self.backbone is None
        super().configure_model()
        if fresh and self.cfg.init_from:
            load_roles(self.backbone, self.cfg.init_from, {"generator": "ema", "ref_policy": "ema", "ema": "ema"})

    def sampling_transition(self) -> Transition:
        return self.chain

    # ------------------------------------------------------------------ pieces
    def rollout(self, prompts: list[str], conds: list[Any], scores: RolloutScores | None = None) -> list[Trajectory]:
        """Stochastic rollouts with Gaussian log-probs, one trajectory per optimisation chunk (each handed to
        ``scores`` when done, so black-box rewards score it while the next chunk rolls out)."""
        cfg = self.cfg
        g = self.rng("rollout")
        sigmas = self.sampling_sigmas().to(self.device)
        chunk = len(prompts) // cfg.opt_steps_per_epoch
        trajs = []
        for c in range(cfg.opt_steps_per_epoch):
            p = prompts[c * chunk:(c + 1) * chunk]
            if cfg.shared_init_noise:
                x_T = group_noise(p, -1, self.iteration, self.backbone.sample_shape, self.seed, self.dtype, self.device)
            else:
                x_T = self.randn(self.sample_shape(len(p)), g)
            with torch.no_grad():
                trajs.append(sample(self.velocity_fn("generator", conds[c], cfg.guidance), x_T, sigmas, self.chain,
                                    noise_source=NoiseSource(g), log_prob_mode="gaussian"))
            if scores is not None:
                scores.add(trajs[-1].final, p)
        return trajs

    def trained_steps(self, traj: Trajectory) -> tuple[int, ...]:
        """The stochastic steps (std > 0), or a rank-synchronised random subset of ``train_steps`` of them."""
        stochastic = [j for j in range(traj.stop) if bool((traj.std[j] > 0).all())]
        k = self.cfg.train_steps
        if k is None or k >= len(stochastic):
            return tuple(stochastic)
        return step_subset(stochastic, k, self.rng("train_steps", per_rank=False))

    def step_loss(self, traj: Trajectory, j: int, cond: Any, adv: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """PPO-clip on step ``j`` plus ``kl_coef`` (``regime: tilt``: β) × the mean-space KL to the reference policy."""
        cfg = self.cfg
        lp, mean, _ = recompute_log_prob(self.velocity_fn("generator", cond, cfg.guidance), traj, j)
        loss, m = ppo_clip_loss(lp, traj.log_prob[j], adv, cfg.ppo_clip)
        m["log_ratio_max_abs"] = (lp.detach() - traj.log_prob[j]).abs().max()
        kl_coef = cfg.beta if cfg.regime == "tilt" else cfg.kl_coef
        if kl_coef > 0:
            x, sigma = traj.x_in[j], traj.sigma[j]
            with torch.no_grad():
                v_ref = self.backbone.velocity(x, sigma, cond, "ref_policy", cfg.guidance)
                mean_ref, _ = transition_mean_std(self.chain, x, sigma, traj.sigma_next[j], v_ref, traj.sigma_max)
            kl = mean_kl(mean, mean_ref, traj.std[j])
            m["kl"] = kl.detach()
            loss = loss + kl_coef * kl
        return loss, m

    # ------------------------------------------------------------------ the recipe
    def training_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        cfg = self.cfg
        prompts = list(batch["prompts"])
        chunk = len(prompts) // cfg.opt_steps_per_epoch
        conds = [self.backbone.encode_prompts(prompts[c * chunk:(c + 1) * chunk]) for c in range(cfg.opt_steps_per_epoch)]
        # 1. rollouts, each chunk submitted to the rewards when done
        scores = RolloutScores(self.rewards, self.backbone.decode, self.reward_overlap)
        trajs = self.rollout(prompts, conds, scores)
        # 2. rewards → GRPO advantages
        reward = scores.combined()
        # GRPO advantages, per-group means and the global std over every rank (§1.5); tilt: leave-one-out, raw
        adv = over_ranks(self, lambda r, g: regime_advantages(r, g, cfg.regime, cfg.adv_clip),
                         reward.detach().float(), batch["group"].to(self.device))
        metrics: dict[str, Any] = {"reward": reward.mean()}
        # 3. PPO + KL, one optimiser step per chunk
        opt = self.opt("generator")
        for c, tr in enumerate(trajs):
            steps = self.trained_steps(tr)
            opt.zero_grad(set_to_none=True)
            for j in steps:
                loss, m = self.step_loss(tr, j, conds[c], adv[c * chunk:(c + 1) * chunk])
                self.manual_backward(loss / len(steps))
                metrics[f"generator/loss_chunk{c}"] = loss.detach()
                metrics[f"ppo/log_ratio_max_abs_chunk{c}"] = m["log_ratio_max_abs"]
                metrics["ppo/clip_frac"] = m["clip_frac"]
                if "kl" in m:
                    metrics["kl"] = m["kl"]
            metrics["generator/grad_norm"] = self.step_role("generator", self.cfg.optim.grad_clip)
            # 4. parameter EMA
            self.ema_update(self.ema)
        metrics["generator/loss"] = metrics.get(f"generator/loss_chunk{len(trajs) - 1}")
        self.log_metrics(metrics)

