"""Train a method for a few iterations under DDP or FSDP2 on CPU (or on one process) and write what every rank holds.

Run as a script (Lightning's subprocess launcher re-executes it for every rank)::

    python -m fewstep_rl.testing.dist_check --strategy ddp|fsdp2|single --out DIR [--method dmd2] [--steps 4]
        [--world toy2d] [--no-preset] [--replicate | --split-groups] [--set KEY=VALUE ...] [--interrupt-after K]
        [--save-at K] [--ckpt-path CKPT]

Each rank writes ``DIR/rank<r>.json`` (per role: sum and sum of squares of the *full* parameters — gathered from
shards under FSDP2 — and the tensor type of the first local parameter) and ``DIR/rank<r>.pt`` (the full role
tensors, the trace of every :func:`fewstep_rl.distributed.over_ranks` call: local inputs, gathered inputs and
whole-batch result, and ``synced``: every rank-synchronised draw of the method, in order — the tag of each
``rng(tag, per_rank=False)``, the result of each :func:`~fewstep_rl.sampling.subsets.step_subset` (SubGRPO subsets)
and, per sample, each :func:`~fewstep_rl.sampling.noise.group_noise` (group-shared noise) with its key).

``--interrupt-after K`` stops after K iterations as if killed (the run length, and so every schedule, stays
``--steps``); ``DIR/last.ckpt`` is written at the end of every run (a sharded directory under FSDP2), ``--save-at K``
also writes ``DIR/k.ckpt`` after iteration K of an uninterrupted run (the run goes on), and ``--ckpt-path`` resumes
from either.

``--replicate`` gives every rank the batch and the noise streams of rank 0 of a one-process run (prompt stream at
rank 0 of world 1, :meth:`FewStepMethod.rng` keyed on rank 0). The global batch is then rank 0's batch twice, and a
method whose update depends on the batch only through means and population statistics must end where the
one-process run (``--strategy single``) ends: this is how :mod:`fewstep_rl.testing.dist_contract` compares 2
processes with 1 (with per-rank streams the two runs draw different prompts and noise, so they cannot be compared).

``--split-groups`` splits every prompt group over the ranks: the prompt stream draws the one-process batch with
``group_size × world_size`` samples per prompt (rank 0 of world 1) and rank ``r`` keeps rows ``r::world_size`` (each
rank holds ``group_size`` members of every group; the per-rank noise streams stay). A one-process run with
``method.group_size`` multiplied by the world size has the same global batch up to the row order, and its
rank-synchronised draws (step subsets, group-shared noise) must be the ones every rank of the split run made.
"""

from __future__ import annotations

import argparse
import functools
import inspect
import json
import sys
import types
from pathlib import Path
from typing import Any

import lightning as L
import torch

from fewstep_rl import distributed
from fewstep_rl.run import assemble, resolve
from fewstep_rl.sampling.noise import stable_hash
from fewstep_rl.testing.contract import TINY_BY_WORLD


def full_roles(module: Any) -> dict[str, list[torch.Tensor]]:
    """Full (unsharded) CPU float64 copies of every role's parameters; a collective under FSDP2 (call on every rank)."""
    out = {}
    for role in module.backbone.roles:
        params = module.backbone.role_parameters(role)
        out[role] = [(p.full_tensor() if hasattr(p, "full_tensor") else p).detach().cpu().double().clone()
                     for p in params]
    return out


def optimizer_shards(trainer: L.Trainer) -> list[list[dict[str, Any]]]:
    """This rank's optimiser state (local shards), per optimiser and parameter."""
    out = []
    for opt in trainer.optimizers:
        out.append([{k: (v.to_local() if hasattr(v, "to_local") else v).detach().cpu().clone()
                     for k, v in opt.state.get(p, {}).items()} for g in opt.param_groups for p in g["params"]])
    return out


def groups(trainer: L.Trainer) -> list[list[dict[str, Any]]]:
    """Every optimiser's param-group hyperparameters (without the parameters)."""
    return [[{k: repr(v) for k, v in g.items() if k != "params"} for g in opt.param_groups]
            for opt in trainer.optimizers]


class Checksums(L.Callback):
    def __init__(self, out: Path) -> None:
        self.out, self.start = out, None

    def on_train_start(self, trainer: L.Trainer, module: Any) -> None:
        self.start = full_roles(module)  # after a resume: the weights as loaded
        self.start_opt, self.start_groups = optimizer_shards(trainer), groups(trainer)


    def on_train_end(self, trainer: L.Trainer, module: Any) -> None:
        full = full_roles(module)
        roles: dict[str, Any] = {}
        for role, tensors in full.items():
            params = module.backbone.role_parameters(role)
            flat = torch.cat([f.reshape(-1) for f in tensors])
            roles[role] = {"sum": float(flat.sum()), "sumsq": float((flat**2).sum()), "numel": int(tensors[0].numel()),
                           "type": type(params[0].data).__name__, "local_numel": int(params[0].to_local().numel())
                           if hasattr(params[0], "to_local") else int(params[0].numel())}
        record = {"rank": trainer.global_rank, "world_size": trainer.world_size, "roles": roles,
                  "iteration": module.iteration, "updates": module.updates}
        (self.out / f"rank{trainer.global_rank}.json").write_text(json.dumps(record, indent=1))
        torch.save({**record, "weights": full, "start_weights": self.start,
                    "start_opt": self.start_opt, "opt": optimizer_shards(trainer),
                    "start_groups": self.start_groups, "groups": groups(trainer), "trace": distributed.TRACE or [],
                    "synced": SYNCED, **SAVED},
                   self.out / f"rank{trainer.global_rank}.pt")


SAVED: dict[str, Any] = {}
"""The full weights and param groups ``--save-at`` wrote to ``k.ckpt`` (``saved_weights``, ``saved_groups``)."""
SYNCED: list[dict[str, Any]] = []
"""Every rank-synchronised draw of this process, in order (see the module doc)."""


def record_synced_draws(module: Any) -> None:
    """Record ``rng(tag, per_rank=False)`` tags, :func:`step_subset` results and :func:`group_noise` rows in
    :data:`SYNCED` (the functions are wrapped where the method's module and the sampling modules look them up)."""
    from fewstep_rl.sampling import noise, subsets

    def subset_rec(fn: Any) -> Any:
        @functools.wraps(fn)
        def f(*a: Any, **kw: Any) -> Any:
            out = fn(*a, **kw)
            SYNCED.append({"kind": "step_subset", "out": tuple(out)})
            return out
        return f

    def noise_rec(fn: Any) -> Any:
        sig = inspect.signature(fn)

        @functools.wraps(fn)
        def f(*a: Any, **kw: Any) -> Any:
            out = fn(*a, **kw)
            b = sig.bind(*a, **kw)
            b.apply_defaults()
            for key, row in zip(b.arguments["prompts"], out, strict=True):
                SYNCED.append({"kind": "group_noise", "key": (str(key), int(b.arguments["step"]),
                                                              int(b.arguments["epoch"]), int(b.arguments["seed"])),
                               "out": row.detach().cpu().clone()})
            return out
        return f

    for mod in {sys.modules[type(module).__module__], noise, subsets}:
        if callable(getattr(mod, "step_subset", None)):
            mod.step_subset = subset_rec(mod.step_subset)
        if callable(getattr(mod, "group_noise", None)):
            mod.group_noise = noise_rec(mod.group_noise)
    rng = module.rng

    def rng_rec(tag: str, per_rank: bool = True) -> torch.Generator:
        if not per_rank:
            SYNCED.append({"kind": "rng", "key": (tag, int(module.iteration))})
        return rng(tag, per_rank)

    module.rng = rng_rec


class SaveAt(L.Callback):
    """``DIR/k.ckpt`` after iteration K (a collective under FSDP2: every rank calls it)."""

    def __init__(self, out: Path, at: int | None) -> None:
        self.out, self.at = out, at

    def on_train_batch_end(self, trainer: L.Trainer, module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self.at is not None and int(batch["pos"]) + 1 == self.at:
            trainer.save_checkpoint(self.out / "k.ckpt", weights_only=False)
            SAVED.update(saved_weights=full_roles(module), saved_groups=groups(trainer))


class Interrupt(L.Callback):
    def __init__(self, after: int | None) -> None:
        self.after = after

    def on_train_batch_end(self, trainer: L.Trainer, module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self.after is not None and int(batch["pos"]) + 1 >= self.after:
            trainer.should_stop = True


def replicate_rank0(module: Any, dm: Any) -> None:
    """Make every rank draw the prompts and the per-rank noise of rank 0 of a one-process run (see module doc)."""

    def rng(self: Any, tag: str, per_rank: bool = True) -> torch.Generator:
        rank = 0 if per_rank else -1
        return torch.Generator(device=self.device).manual_seed(stable_hash(self.seed, tag, self.iteration, rank))

    module.rng = types.MethodType(rng, module)
    setup = dm.setup

    def setup_rank0(stage: str | None = None) -> None:
        setup(stage)
        dm.stream.rank, dm.stream.world_size = 0, 1

    dm.setup = setup_rank0


def split_groups(dm: Any) -> None:
    """Every rank keeps rows ``r::W`` of the one-process batch with ``W×`` larger groups (see module doc)."""
    setup = dm.setup
    stream = dm.stream
    batch, k = stream.batch, stream.k

    def setup_split(stage: str | None = None) -> None:
        setup(stage)
        rank, world = stream.rank, stream.world_size
        stream.rank, stream.world_size, stream.k = 0, 1, k * world

        def rows(pos: int) -> dict[str, Any]:
            b = batch(pos)
            return {"prompts": b["prompts"][rank::world], "group": b["group"][rank::world], "pos": b["pos"]}

        stream.batch = rows

    dm.setup = setup_split


def _value(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--strategy", choices=["ddp", "fsdp2", "single"], required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--method", default="dmd2")
    ap.add_argument("--world", default="toy2d")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--no-preset", action="store_true")
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("--replicate", action="store_true")
    mode.add_argument("--split-groups", action="store_true")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--interrupt-after", type=int, default=None)
    ap.add_argument("--save-at", type=int, default=None)
    ap.add_argument("--ckpt-path", default=None)
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    single = args.strategy == "single"
    extra = {k: _value(v) for k, v in (s.split("=", 1) for s in args.set)}
    over = {**TINY_BY_WORLD.get(args.world, {}), "trainer.devices": 1 if single else 2, "trainer.strategy": "auto" if single else args.strategy,
            "trainer.accelerator": "cpu", "trainer.max_steps": args.steps, "trainer.run_dir": str(out), **extra}
    distributed.TRACE = []
    module, dm, trainer = assemble(resolve(args.method, args.world, (), over, use_preset=not args.no_preset), out,
                                   [Interrupt(args.interrupt_after), SaveAt(out, args.save_at), Checksums(out)],
                                   run_callback=False)
    if args.replicate:
        replicate_rank0(module, dm)
    if args.split_groups:
        split_groups(dm)
    record_synced_draws(module)
    trainer.fit(module, datamodule=dm, ckpt_path=args.ckpt_path)
    trainer.save_checkpoint(out / "last.ckpt", weights_only=False)


if __name__ == "__main__":
    main()
