"""Train a method for a few iterations under DDP or FSDP2 on CPU (or on one process) and write what every rank holds.

Run as a script (Lightning's subprocess launcher re-executes it for every rank)::

    python -m fewstep_rl.testing.dist_check --strategy ddp|fsdp2|single --out DIR [--method dmd2] [--steps 4]
        [--replicate] [--set KEY=VALUE ...] [--interrupt-after K] [--ckpt-path CKPT]

Each rank writes ``DIR/rank<r>.json`` (per role: sum and sum of squares of the *full* parameters — gathered from
shards under FSDP2 — and the tensor type of the first local parameter) and ``DIR/rank<r>.pt`` (the full role
tensors, and the trace of every :func:`fewstep_rl.distributed.over_ranks` call: local inputs, gathered inputs and
whole-batch result).

``--interrupt-after K`` stops after K iterations as if killed (the run length, and so every schedule, stays
``--steps``); ``DIR/last.ckpt`` is written at the end of every run (a sharded directory under FSDP2) and
``--ckpt-path`` resumes from one.

``--replicate`` gives every rank the batch and the noise streams of rank 0 of a one-process run (prompt stream at
rank 0 of world 1, :meth:`FewStepMethod.rng` keyed on rank 0). The global batch is then rank 0's batch twice, and a
method whose update depends on the batch only through means and population statistics must end where the
one-process run (``--strategy single``) ends: this is how :mod:`fewstep_rl.testing.dist_contract` compares 2
processes with 1 (with per-rank streams the two runs draw different prompts and noise, so they cannot be compared).
"""

from __future__ import annotations

import argparse
import json
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
                    "start_groups": self.start_groups, "groups": groups(trainer), "trace": distributed.TRACE or []},
                   self.out / f"rank{trainer.global_rank}.pt")


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
    ap.add_argument("--replicate", action="store_true")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--interrupt-after", type=int, default=None)
    ap.add_argument("--ckpt-path", default=None)
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    single = args.strategy == "single"
    extra = {k: _value(v) for k, v in (s.split("=", 1) for s in args.set)}
    over = {**TINY_BY_WORLD.get(args.world, {}), "trainer.devices": 1 if single else 2, "trainer.strategy": "auto" if single else args.strategy,
            "trainer.accelerator": "cpu", "trainer.max_steps": args.steps, "trainer.run_dir": str(out), **extra}
    distributed.TRACE = []
    module, dm, trainer = assemble(resolve(args.method, args.world, (), over), out,
                                  [Interrupt(args.interrupt_after), Checksums(out)], run_callback=False)
    if args.replicate:
        replicate_rank0(module, dm)
    trainer.fit(module, datamodule=dm, ckpt_path=args.ckpt_path)
    trainer.save_checkpoint(out / "last.ckpt", weights_only=False)


if __name__ == "__main__":
    main()
