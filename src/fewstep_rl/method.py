"""``FewStepMethod``: the thin LightningModule base every method in ``methods/`` uses.

It holds only what every method does identically (architecture.md §3): building the roles over the world's
backbone in ``configure_model`` (so DDP and FSDP2 work unchanged), one optimiser per trainable role with manual
optimisation, step-keyed random generators (exact resume), the EMA hook, logging helpers, few-step generation for
evaluation, and checkpoint slimming (frozen base weights and reward models never enter a checkpoint).

Counters: ``iteration`` counts training batches (not optimiser steps — in manual optimisation Lightning's
``global_step`` counts every ``optimizer.step()`` of every role, infra.md Q3); ``stream_pos`` is the position of
the next unconsumed prompt batch.
"""

from __future__ import annotations

import math
import os
import sys
from collections.abc import Sequence
from typing import Any, ClassVar

import lightning as L
import torch
from torch import Tensor

from fewstep_rl.eval.generate import generate
from fewstep_rl.optim import OptimConfig
from fewstep_rl.roles import EMA, add_roles
from fewstep_rl.sampling import Transition, sigma_grid
from fewstep_rl.sampling.noise import stable_hash

_CKPT_KEY = "fewstep"


class FewStepMethod(L.LightningModule):
    """Base class of every method.

    Subclasses set the class attributes, define a ``Config`` dataclass and implement ``training_step`` as a
    numbered recipe. Config fields every method is expected to have: ``batch_size`` (prompts per batch per
    rank), ``optim`` (a :class:`fewstep_rl.optim.OptimConfig`: learning rate, schedule, AdamW betas and weight decay,
    gradient clip, per-role overrides), ``num_steps`` (generator steps).

    Attributes:
        name: registry name.
        paper: citation shown in ``--help``.
        trainable_roles: roles with an optimiser, in optimiser order.
        snapshot_roles: ``{snapshot: source}`` parameter copies (EMA, old, sampler).
        planned_folds: ``(role, into)`` of every ``backbone.fold_role(role, into)`` the method may make, in order;
            under FSDP2 their (empty) fold adapters are reserved before sharding (:meth:`RoleStore.reserve_fold`).
        reward_driven: the method optimises rewards and needs ``beta`` and at least one reward.

    Rewards: ``self.rewards`` holds the rewards with a nonzero weight, the only ones training computes;
    ``self.eval_rewards`` holds every configured reward (weight-0 rewards are evaluation-only: evaluation scores and
    logs each of them, training never calls them).
    """

    name: ClassVar[str] = "method"
    paper: ClassVar[str] = ""
    Config: ClassVar[type]
    trainable_roles: ClassVar[tuple[str, ...]] = ("generator",)
    snapshot_roles: ClassVar[dict[str, str]] = {}
    planned_folds: tuple[tuple[str, tuple[str, ...]], ...] = ()
    reward_driven: ClassVar[bool] = False
    strict_loading = False

    def __init__(self, cfg: Any, world: Any, rewards: Any = None, seed: int = 0, run_config: dict | None = None):
        super().__init__()
        self.automatic_optimization = False
        self.cfg, self.world, self.seed = cfg, world, seed
        self.eval_rewards = rewards
        self.rewards = rewards.weighted() if rewards is not None else None
        self.run_config = run_config or {}
        self.backbone: Any = None
        self.iteration = 0
        self.stream_pos = 0
        self.max_iterations: int | None = None  # set from trainer.max_steps by run.assemble
        self.reward_overlap = True  # set from trainer.reward_overlap by run.assemble (rewards.RolloutScores)
        self.updates: dict[str, int] = dict.fromkeys(self.trainable_roles, 0)
        if self.eval_rewards is not None:
            self.eval_rewards.requires_grad_(False)
        if self.reward_driven and (self.rewards is None or len(self.rewards) == 0):
            raise ValueError(f"method {self.name!r} needs at least one reward with a nonzero weight (weight-0 rewards "
                             "are evaluation-only)")
        if not self.reward_driven and getattr(cfg, "beta", None) is not None:
            self.note(f"method {self.name!r} is distillation-only: method.beta={cfg.beta} is ignored by training "
                      "(evaluation still reports the β-tilted reference)")

    @staticmethod
    def note(message: str) -> None:
        """One informational line on stderr (rank 0 only): a setting that is accepted but has no effect."""
        if not any(int(os.environ.get(k, "0") or "0") for k in ("RANK", "SLURM_PROCID", "LOCAL_RANK", "NODE_RANK")):
            print(f"note: {message}", file=sys.stderr)

    # ------------------------------------------------------------------ model construction
    def configure_model(self) -> None:
        if self.backbone is not None:
            return
        self.backbone = self.world.build_backbone()
        add_roles(self.backbone, self.trainable_roles, self.snapshot_roles)
        strategy = getattr(self._trainer, "strategy", None) if self._trainer is not None else None
        if strategy is not None and type(strategy).__name__ == "ModelParallelStrategy":
            from torch.distributed.fsdp import fully_shard

            for role, into in self.planned_folds:  # empty folds now: a fold after sharding fills them in place
                self.backbone.reserve_fold(role, into)
            mesh = self.device_mesh["data_parallel"]
            for unit in self.backbone.fsdp_units():
                fully_shard(unit, mesh=mesh)
            fully_shard(self.backbone, mesh=mesh)

    def batch_spec(self) -> tuple[int, int]:
        """(prompts per batch per rank, samples per prompt)."""
        return int(self.cfg.batch_size), int(getattr(self.cfg, "group_size", 1))

    # ------------------------------------------------------------------ optimisation
    def optim_config(self) -> OptimConfig:
        """The optimiser settings in force: ``cfg.optim`` (a method with stages may return the current stage's)."""
        optim = getattr(self.cfg, "optim", None)
        if not isinstance(optim, OptimConfig):
            raise TypeError(f"method {self.name!r}: its Config needs a field 'optim: OptimConfig' (fewstep_rl.optim), "
                            f"got {type(optim).__name__}")
        return optim

    def configure_optimizers(self) -> list[torch.optim.Optimizer]:
        optim = self.optim_config()
        opts = []
        for role in self.trainable_roles:
            params = self.backbone.role_parameters(role)
            betas, wd = optim.betas_of(role), optim.weight_decay_of(role)
            # ``initial_lr`` (the base of :meth:`step_role`'s schedule) is set here, not at the first step: a sharded
            # FSDP2 checkpoint restores only the param-group keys a fresh optimiser already has
            lr = optim.lr_of(role)
            opts.append(torch.optim.AdamW([{"params": params, "initial_lr": lr}], lr=lr, betas=betas, weight_decay=wd))
        return opts

    def opt(self, role: str) -> Any:
        opts = self.optimizers()
        opts = opts if isinstance(opts, list) else [opts]
        return opts[self.trainable_roles.index(role)]

    def update(self, role: str, loss: Tensor, clip: float | None = None) -> float | None:
        """One optimiser step of ``role`` on ``loss``: zero → backward → clip → step. Returns the grad norm."""
        self.opt(role).zero_grad(set_to_none=True)
        self.manual_backward(loss)
        return self.step_role(role, clip)

    def step_role(self, role: str, clip: float | None = None) -> float | None:
        """Clip, step and count the gradient accumulated in ``role`` (learning rate × :meth:`lr_factor`); used by
        :meth:`update` and directly by methods that accumulate several backward passes. Returns the grad norm."""
        opt = self.opt(role)
        factor = self.lr_factor()
        for group in opt.optimizer.param_groups:
            group["lr"] = group.setdefault("initial_lr", group["lr"]) * factor
        norm = None
        if clip:
            norm = float(torch.nn.utils.clip_grad_norm_(self.backbone.role_parameters(role), clip))
        opt.step()
        opt.zero_grad(set_to_none=True)
        self.updates[role] += 1
        return norm

    def lr_factor(self) -> float:
        """Learning-rate multiplier at this iteration: ``optim.lr_schedule`` = ``constant`` or ``cosine`` (to 0 at
        ``max_iterations``, the run length set by the trainer section). Keyed on the iteration, so resume-exact."""
        if self.optim_config().lr_schedule != "cosine" or not self.max_iterations:
            return 1.0
        return 0.5 * (1.0 + math.cos(math.pi * min(self.iteration / self.max_iterations, 1.0)))

    def ema_update(self, ema: EMA) -> None:
        """EMA hook: blend ``ema.source`` into ``ema.target`` after ``ema.source``'s update."""
        ema.update(self.backbone, self.updates[ema.source] - 1)

    # ------------------------------------------------------------------ randomness (exact resume)
    def rng(self, tag: str, per_rank: bool = True) -> torch.Generator:
        """A generator keyed on (seed, tag, iteration[, rank]) — identical after a resume.

        ``per_rank=False`` gives the same stream on every rank (rank-synchronised choices such as stop indices).
        """
        rank = self.global_rank if per_rank else -1
        return torch.Generator(device=self.device).manual_seed(stable_hash(self.seed, tag, self.iteration, rank))

    def randn(self, shape: Sequence[int], generator: torch.Generator) -> Tensor:
        return torch.randn(tuple(shape), generator=generator, device=self.device, dtype=self.dtype)

    def rand(self, n: int, generator: torch.Generator) -> Tensor:
        return torch.rand(n, generator=generator, device=self.device, dtype=self.dtype)

    # ------------------------------------------------------------------ helpers for recipes
    def velocity_fn(self, role: str | None, cond: Any, guidance: float = 1.0):
        """``(x, σ) -> v`` for ``role`` under ``cond`` (the sampler's ``VelocityFn``)."""

        def fn(x: Tensor, sigma: Tensor) -> Tensor:
            return self.backbone.velocity(x, sigma, cond, role=role, guidance=guidance)

        return fn

    def sample_shape(self, n: int) -> tuple[int, ...]:
        return (n, *self.backbone.sample_shape)

    def log_metrics(self, metrics: dict[str, Any], prefix: str = "train") -> None:
        vals = {f"{prefix}/{k}": float(v) for k, v in metrics.items() if v is not None}
        if vals and self._trainer is not None:
            self.log_dict(vals, on_step=True, on_epoch=False, batch_size=1, sync_dist=False)

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        # The batch position is the iteration index (every rank's stream advances in step); by the time any
        # checkpoint is written this batch has been consumed, so the stream resumes at pos + 1.
        self.iteration = int(batch["pos"])
        self.stream_pos = self.iteration + 1

    # ------------------------------------------------------------------ generation
    def sampling_role(self) -> str:
        """Role used to generate at evaluation: the EMA snapshot when the method keeps one."""
        return "ema" if "ema" in self.snapshot_roles else "generator"

    def sampling_transition(self) -> Transition:
        return Transition("euler")

    def sampling_sigmas(self, steps: int | None = None) -> Tensor:
        return sigma_grid(steps or int(self.cfg.num_steps), shift=float(getattr(self.cfg, "shift", 1.0)))

    def generate(
        self, prompts: Sequence[str], generator: torch.Generator, steps: int | None = None, role: str | None = None,
        guidance: float = 1.0, transition: Transition | None = None,
    ) -> Tensor:
        """Decoded samples of ``role`` (default: :meth:`sampling_role`) for ``prompts``."""
        return generate(
            self.backbone, role or self.sampling_role(), prompts, generator, self.sampling_sigmas(steps),
            transition or self.sampling_transition(), guidance,
        )

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        """Trainable roles, snapshots and merged deltas only; frozen base and reward weights are dropped."""
        sd = super().state_dict(*args, **kwargs)
        prefix = kwargs.get("prefix", args[1] if len(args) > 1 else "") or ""
        keep = {}
        for k, v in sd.items():
            rel = k[len(prefix):]
            if rel.startswith(("rewards.", "eval_rewards.")):
                continue
            if rel.startswith("backbone.") and not self.backbone.is_role_key(rel[len("backbone."):]):
                continue
            keep[k] = v
        return keep

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint[_CKPT_KEY] = {
            "method": self.name, "iteration": self.iteration, "stream_pos": self.stream_pos,
            "updates": dict(self.updates), "config": self.run_config, "roles": list(self.backbone.roles),
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = checkpoint.get(_CKPT_KEY)
        if state is None:
            raise ValueError("not a fewstep-rl checkpoint (no 'fewstep' section)")
        if state["method"] != self.name:
            raise ValueError(f"checkpoint was written by method {state['method']!r}, not {self.name!r}")
        self.iteration, self.stream_pos = state["iteration"], state["stream_pos"]
        self.updates.update(state["updates"])
        if "state_dict" in checkpoint:  # a sharded FSDP2 checkpoint is loaded in place by DCP against our own keys
            self.backbone.upgrade_state_dict(checkpoint["state_dict"], "backbone.")  # keys of earlier versions
            self.check_role_keys(checkpoint["state_dict"])
        dm = getattr(self._trainer, "datamodule", None) if self._trainer is not None else None
        if dm is not None and hasattr(dm, "stream"):
            dm.stream.start = self.stream_pos

    def check_role_keys(self, state_dict: dict[str, Any]) -> None:
        """Strict loading for what a checkpoint must hold (every role key), lenient for the frozen base."""
        expected = {k for k in self.state_dict() if k.startswith("backbone.")}
        missing = sorted(expected - set(state_dict))
        if missing:
            raise ValueError(f"checkpoint lacks {len(missing)} role weight(s), e.g. {missing[:3]}")
