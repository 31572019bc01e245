"""DIDR: Diff-Instruct with Diffused Reward (methods.md §3; reconstruction).

Paper: "Diff-Instruct with Diffused Reward" (DIDR). Only the abstract, the README results and the two-stage figure
caption were available; no public code. The algorithm here is the reconstruction of methods.md §3 ([RECON]), with the
derivation written out (the math lives in :mod:`fewstep_rl.objectives.diffused_reward`).

Roles: ``generator`` (trainable adapter; one-step or few-step), ``fake_score`` (trainable adapter, the "TA" score
s_ψ of the generator's diffused marginals), ``teacher`` (frozen base = reference s_ref, optionally CFG-guided),
``ema`` (snapshot).

Target distribution: the clean tilted reference ``p̃_0(x|c) ∝ p_ref(x|c)·exp(r(x,c)/β)`` (CFG-guided reference if
``guidance > 1``), reached through its diffusion ``p̃_t``, whose score is ``s_ref + s_r`` with the Diffused Reward
Score ``s_r(x_t) = ∇_{x_t} log E_{p_ref(x0|x_t)}[e^{r(x0)/β}]`` (methods.md §3.1).

Derivation (what is implemented). The generator minimises the integral KL ``J = ∫ w(t) KL(p_θ,t ‖ p̃_t) dt``.
J = 0 iff ``p_θ,t = p̃_t`` for all t iff ``p_θ,0 = p̃_0`` (Gaussian convolution is injective on distributions), so its
minimiser is exactly the clean tilted target at every noise level — which a terminal reward added to an integral
KL against the *untilted* reference (DI++/DI*-style, :mod:`methods.di_star`) does not have: its t > 0 terms are
minimised by p_ref, biasing the optimum toward the reference. With ``x_t = (1-t)x0 + t n`` the pathwise gradient with
respect to a clean sample is ``∇_{x0} KL_t = (1-t)(s_ψ - s̃_ref - s_r)(x_t)``; in clean-estimate units that is the DMD
direction with ``x̂0_ψ`` replaced by ``x̂0_ψ - t²/(1-t)·s_r`` (methods.md §3.3 "clean-space equivalent").

Each iteration (one prompt batch):

1. Generator chain (as :mod:`methods.dmd2`): K-step ``cps(1.0)`` x0-predict-and-renoise chain from noise (K = 1:
   one-step generator), gradient on the last executed step on generator iterations; x0 = x − σv of that step
   (optional DMD2 backward simulation: random stop; ``chain_grad: all``: gradient through every step).
2. Generator update every ``fake_updates_per_gen``-th iteration (TTUR): ``t ~ U[t_min, t_max]``,
   ``x_t = (1-t)x0 + t n``; without gradient the reference (CFG ω) and fake clean estimates; the reward score
   ``s_r(x_t)``, either
     * ``drs: drp`` — the Diffused Reward Proxy (methods.md §3.1): K_r = ``drp_steps`` differentiable Euler steps of
       the frozen reference from (x_t, t) to 0, decode, differentiable reward(s), ``∇_{x_t}`` by autograd with x_t
       detached from the generator, divided by β; or
     * ``drs: exact`` — the closed form for the toy2d Gaussian-mixture reference and linear rewards;
   then the DMD loss on ``x0`` with fake estimate ``x̂0_ψ - t²/(1-t)·s_r`` — ``dmd_weighting: kl`` keeps the exact KL
   scale (:func:`~fewstep_rl.objectives.kl_dmd.kl_dmd_loss`), ``sample``/``batch`` use the normalised DMD loss
   (methods.md §1.4; the [RECON] stability default) — a positive per-sample rescaling, so the same fixed point.
3. Fake-score update every iteration: flow-matching DSM on the detached generator samples (methods.md §3.3 Stage I).
4. EMA of the generator.

Deviations / choices ([RECON] knobs, all documented in methods.md §3.7 as unknown):
    * DRP denoiser = the frozen reference with the same CFG as s̃_ref (``drp_guidance`` overrides), uniform Euler
      grid from t to 0, the full network Jacobian kept; applied at every t of the generator update.
    * The DRP drops the posterior-variance part of the log-mean-exp (exact for a Gaussian reference with a linear
      reward at K = 1); with K > 1 it follows the ODE map instead of the posterior mean (costs measured in
      tests/test_didr.py and discussed in :mod:`fewstep_rl.objectives.diffused_reward`).
    * The fake score's t is uniform in σ (flow convention); no GAN term.
    * ``chain_grad: all`` (toy2d preset; methods.md §3.7 leaves open "which step outputs the IKL is applied to" for
      the few-step variant): the generator's output x0 carries the gradient through every step of the chain, as the
      IKL gradient ``∂x_t/∂θ`` of a generator ``x0 = g_θ(z)`` says. DMD2's last-step-only gradient (``last``) never
      trains the steps that choose a mode: the integral KL's large-t terms see the mode weights, but only the last
      step can respond, by dragging samples across the gap (a bridge between modes; issue 13, 100x the noise floor).
    * ``dmd_weighting: sample`` (toy2d preset since session 28; was ``batch``): the DMD paper's per-sample normaliser
      (each sample's direction divided by its own ``mean|x0 − x̂0_ref|``; methods.md §1.4). Under the batch mean
      some components of unseen worlds stayed too narrow: on 2d-linear-s1-3 (validate training seed 1, lr 2e-3)
      23× the noise floor, on 2d-linear-s1-6 18×, 8d-linear-s1-9 21.7×. The per-sample normaliser shrinks with t
      (``|x0 − x̂0_ref| ≈ t`` for t below a component's std), so it weights the small-t levels, where a component's
      width shows, roughly ``1/t`` more than the batch mean does — between ``batch`` (flat) and ``kl``
      (``(1−t)²/t²``, below) — while the large-t levels that set the mode masses keep their weight. Same fixed point
      (a positive per-sample rescaling). Those three worlds: 1.1×, 1.8×, 5.0×; the 20-world figures are in the
      README ("Validation"). Why it works where a ``((1−t)/t)`` time factor under the batch normaliser did not
      (below) is not established; the per-sample scale also down-weights the samples farthest from the reference's
      denoised estimate.
    * History of the width problem under ``dmd_weighting: batch`` (issue 13, sessions 26–27): ``kl`` (the KL's own
      ``(1−t)²/t²`` profile) fixes 2d-linear-s1-3 (1.6×, std 1.0×) but, weighting the large-t levels that set the
      mode masses ~100× less, misplaces masses elsewhere (2d-linear-s0-0: 114 % of the mode move; 2d-linear-s1-0:
      84 %, and switched on for the second half of the run only, 125 %). Neither a raised ``t_min`` (0.1: std
      0.71×), a faster fake score alone (lr 3e-3: 0.73–0.79×), a ``((1−t)/t)`` time weight under the batch
      normaliser (0.80×), a per-noise-band normaliser (trial, removed: 0.78×), larger adapters (256 wide, 4 layers:
      0.76–0.81×) nor 32 000 iterations (0.81×) fixed the width there (training seed 0, lr 1e-3).
    * ``optim.lr: 2e-3`` for generator and fake score (toy2d preset; was 1e-3; session 27, under ``batch``): on
      2d-linear-s1-3 (training seed 0) std 0.96–1.00×, 2.2× the floor, and lower unseen-seed medians.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Literal

from torch import Tensor

from fewstep_rl.config import knob
from fewstep_rl.method import FewStepMethod
from fewstep_rl.objectives import dmd_loss
from fewstep_rl.objectives.diffused_reward import (
    differentiable_reward_fn,
    drp_score,
    gmm_diffused_reward_score,
    linear_reward_direction,
    tilted_fake_x0,
)
from fewstep_rl.objectives.kl_dmd import kl_dmd_loss
from fewstep_rl.optim import OptimConfig, renamed_flat_keys
from fewstep_rl.roles import EMA
from fewstep_rl.sampling import Transition, x0_from_v
from fewstep_rl.steps import fake_score_flow_matching_step, generator_rollout, renoised_teacher_fake_x0

ROLES: tuple[str, ...] = ("generator", "fake_score")


@dataclass
class DIDRConfig:
    """Hyper-parameters of DIDR (placeholders of methods.md §3.5; presets in configs/didr/*.yaml)."""

    # old keys fail with the new name (config.build)
    RENAMED: ClassVar[dict[str, str]] = {"weighting": "dmd_weighting", **renamed_flat_keys("fake_score")}

    batch_size: int = knob(64, "prompts per batch per rank")
    num_steps: int = knob(1, "generator sampling steps K (1 = one-step generator)")
    shift: float = knob(1.0, "static schedule shift γ of the generator's σ-grid (SD3: 3.0)")
    transition: str = knob("cps(1.0)", "generator chain transition (cps(1.0) = predict x0 and re-noise)")
    backward_simulation: bool = knob(False, "random stop index in 1..K (DMD2); false: full chain, grad on last step")
    chain_grad: Literal["last", "all"] = knob(
        "last", "generator gradient through the last executed step only (DMD2) or through every step of the chain"
    )
    beta: float = knob(1.0, "tilt temperature β of the target p_ref·exp(r/β) (reward score = ∇r/β)")
    drs: Literal["drp", "exact"] = knob(
        "drp", "diffused reward score: drp = Diffused Reward Proxy; exact = closed form (toy2d, linear rewards)"
    )
    drp_steps: int = knob(1, "K_r: differentiable Euler steps of the frozen reference from x_t to 0 in the DRP")
    drp_guidance: float | None = knob(None, "CFG scale of the DRP denoiser (default: the reference's, `guidance`)")
    optim: OptimConfig = knob(
        help="AdamW of the roles generator, fake_score (a TTUR learning rate: roles.fake_score.lr)",
        factory=lambda: OptimConfig(lr=1e-3, adam_betas=[0.0, 0.99], weight_decay=0.0, grad_clip=10.0),
    )
    fake_updates_per_gen: int = knob(5, "TTUR: fake-score updates per generator update")
    guidance: float | None = knob(None, "reference CFG scale ω of s̃_ref (default: the world's)")
    dmd_weighting: Literal["sample", "batch", "kl"] = knob(
        "sample", "generator loss scale: normalised DMD per sample / per batch, or the exact KL scale (kl)"
    )
    t_min: float = knob(0.02, "lower bound of the re-noising level t")
    t_max: float = knob(0.98, "upper bound of the re-noising level t")
    ema_decay: float = knob(0.99, "generator EMA decay per generator update")
    ema_warmup: bool = knob(False, "EMA decay min((1+n)/(10+n), ema_decay) over the first updates (methods.md §1.6)")

    def __post_init__(self) -> None:
        if self.num_steps < 1 or self.fake_updates_per_gen < 1 or self.batch_size < 1 or self.drp_steps < 1:
            raise ValueError("num_steps, fake_updates_per_gen, batch_size and drp_steps must be >= 1")
        if not self.beta > 0:
            raise ValueError(f"beta must be > 0, got {self.beta}")
        if not 0.0 < self.t_min < self.t_max < 1.0:
            raise ValueError(
                f"need 0 < t_min < t_max < 1 (the reward score term has t²/(1-t)), got {self.t_min}, {self.t_max}"
            )
        if self.chain_grad not in ("last", "all"):
            raise ValueError(f"chain_grad must be 'last' or 'all', got {self.chain_grad!r}")
        if self.drs not in ("drp", "exact"):
            raise ValueError(f"drs must be 'drp' or 'exact', got {self.drs!r}")
        Transition.parse(self.transition)


class DIDR(FewStepMethod):
    """DIDR: integral-KL distillation toward the diffused reward-tilted reference (score s̃_ref + s_r), with TTUR DSM."""

    name = "didr"
    paper = "Diff-Instruct with Diffused Reward (DIDR), reconstruction of methods.md §3"
    Config = DIDRConfig
    trainable_roles = ROLES
    snapshot_roles = {"ema": "generator"}
    reward_driven = True

    def __init__(self, cfg: DIDRConfig, world: Any, rewards: Any = None, seed: int = 0, run_config: dict | None = None):
        super().__init__(cfg, world, rewards, seed, run_config)
        self.chain = Transition.parse(cfg.transition)
        self.ema = EMA("ema", "generator", cfg.ema_decay, warmup=cfg.ema_warmup)
        self.guidance = cfg.guidance if cfg.guidance is not None else float(world.teacher_guidance)
        self.drp_guidance = cfg.drp_guidance if cfg.drp_guidance is not None else self.guidance
        self.w_exact: Tensor | None = None
        if cfg.drs == "exact":
            if getattr(world, "name", "") != "toy2d":
                raise ValueError("drs: exact has a closed form only in the toy2d world; use drs: drp")
            if self.guidance != 1.0:
                raise ValueError("drs: exact is the DRS of the unguided toy2d mixture; it needs guidance 1")
            self.w_exact = linear_reward_direction(self.rewards, world.dim)
        else:
            differentiable_reward_fn(self.rewards, None, [])  # fail early without a differentiable reward

    def sampling_transition(self) -> Transition:
        return self.chain

    def reward_score(self, x_t: Tensor, t: Tensor, cond: Any, prompts: list[str]) -> tuple[Tensor, Tensor | None]:
        """``(s_r(x_t), reward of the DRP denoised sample or None)``, without graph."""
        if self.w_exact is not None:
            bb = self.backbone
            s_r = gmm_diffused_reward_score(x_t, t, bb.means, bb.stds, cond, self.w_exact.to(x_t.device), self.cfg.beta)
            return s_r, None
        return drp_score(
            self.velocity_fn("teacher", cond, self.drp_guidance),
            differentiable_reward_fn(self.rewards, self.backbone.decode, prompts),
            x_t,
            t,
            self.cfg.drp_steps,
            self.cfg.beta,
        )

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        cfg = self.cfg
        # 1. prompts, conditioning, generator chain (gradient on its last executed step on generator iterations)
        prompts = list(batch["prompts"])
        cond = self.backbone.encode_prompts(prompts)
        n = len(prompts)
        gen_step = self.iteration % cfg.fake_updates_per_gen == 0
        traj = generator_rollout(self, cond, n, num_steps=cfg.num_steps, backward_simulation=cfg.backward_simulation,
                                 grad=cfg.chain_grad if gen_step else "none")
        if cfg.chain_grad == "all" and gen_step:  # the chain's output with its graph through every step (σ_K = 0)
            x0 = traj.final
        else:
            x0 = x0_from_v(traj.x_in[-1], traj.sigma[-1], traj.v[-1])
        metrics: dict[str, Any] = {"stop": traj.stop}
        # 2. generator: integral-KL step toward the diffused tilted target (score s̃_ref + s_r)
        if gen_step:
            x_t, t, x0_ref, x0_fake = renoised_teacher_fake_x0(
                self, x0, cond, tag="ikl", t_min=cfg.t_min, t_max=cfg.t_max, guidance=self.guidance
            )
            s_r, r_drp = self.reward_score(x_t, t, cond, prompts)
            y_fake = tilted_fake_x0(x0_fake, s_r, t)
            if cfg.dmd_weighting == "kl":
                loss_g = kl_dmd_loss(x0, y_fake, x0_ref, t)
            else:
                loss_g = dmd_loss(x0, y_fake, x0_ref, cfg.dmd_weighting)
            metrics["generator/loss"] = loss_g.detach()
            metrics["generator/reward_score_norm"] = s_r.flatten(1).norm(dim=1).mean()
            if r_drp is not None:
                metrics["generator/drp_reward"] = r_drp.mean()
            metrics["generator/grad_norm"] = self.update("generator", loss_g, cfg.optim.grad_clip)
            self.ema_update(self.ema)
        # 3. fake score (TA): flow-matching DSM on the detached generator samples
        metrics.update(fake_score_flow_matching_step(self, x0, cond, grad_clip=cfg.optim.grad_clip))
        self.log_metrics(metrics)
