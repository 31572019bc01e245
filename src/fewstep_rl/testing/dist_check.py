"""Train a method for a few iterations under DDP or FSDP2 on CPU and write per-rank role checksums.

Run as a script (Lightning's subprocess launcher re-executes it for every rank)::

    python -m fewstep_rl.testing.dist_check --strategy ddp --out DIR [--method dmd2] [--steps 4]

Each rank writes ``DIR/rank<r>.json`` with, per role, the sum and sum of squares of the *full* parameters
(gathered from shards under FSDP2) and the tensor type of the first local parameter.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import lightning as L
import torch

from fewstep_rl.run import assemble, resolve
from fewstep_rl.testing.contract import TINY


class Checksums(L.Callback):
    def __init__(self, out: Path) -> None:
        self.out = out

    def on_train_end(self, trainer: L.Trainer, module: Any) -> None:
        roles: dict[str, Any] = {}
        for role in module.backbone.roles:
            params = module.backbone.role_parameters(role)
            full = [p.full_tensor() if hasattr(p, "full_tensor") else p for p in params]
            flat = torch.cat([f.detach().reshape(-1).double() for f in full])
            roles[role] = {"sum": float(flat.sum()), "sumsq": float((flat**2).sum()), "numel": int(full[0].numel()),
                           "type": type(params[0].data).__name__, "local_numel": int(params[0].to_local().numel())
                           if hasattr(params[0], "to_local") else int(params[0].numel())}
        record = {"rank": trainer.global_rank, "world_size": trainer.world_size, "roles": roles,
                  "iteration": module.iteration, "updates": module.updates}
        (self.out / f"rank{trainer.global_rank}.json").write_text(json.dumps(record, indent=1))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--strategy", choices=["ddp", "fsdp2"], required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--method", default="dmd2")
    ap.add_argument("--steps", type=int, default=4)
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    over = {**TINY, "trainer.devices": 2, "trainer.strategy": args.strategy, "trainer.accelerator": "cpu",
            "trainer.max_steps": args.steps, "trainer.run_dir": str(out)}
    module, dm, trainer = assemble(resolve(args.method, "toy2d", (), over), out, [Checksums(out)], run_callback=False)
    trainer.fit(module, datamodule=dm)
    trainer.save_checkpoint(out / "last.ckpt", weights_only=False)


if __name__ == "__main__":
    main()
