"""Run RTDMD stage 2 under 2-process DDP (gloo, CPU) and record what must be identical across ranks.

Run as a script (Lightning's subprocess launcher re-executes it for every rank)::

    python -m fewstep_rl.testing.rollout_dist_check --out DIR [--steps 3]

Each rank writes ``DIR/rank<r>.json`` with, per iteration, the SubGRPO subset and, per prompt and stochastic step,
the injected noise ``z = (x_{j+1} − μ_j)/std_j`` of the first sample of that prompt recovered from the trajectory,
plus per-role parameter checksums at the end.
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

METHOD = "fewstep_rl.methods.rtdmd:RTDMD"


class Recorder(L.Callback):
    def __init__(self, out: Path) -> None:
        self.out, self.steps = out, []

    def on_train_batch_end(self, trainer: L.Trainer, module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        selected, prompts, trajs = module.last_rollout
        flat_prompts = list(prompts)
        noise: dict[str, dict[str, list[float]]] = {}
        chunk = len(flat_prompts) // len(trajs)
        for c, tr in enumerate(trajs):
            for i, p in enumerate(flat_prompts[c * chunk:(c + 1) * chunk]):
                for j in range(tr.stop - 1):
                    z = (tr.x_out[j][i] - tr.mean[j][i]) / tr.std[j][i]
                    noise.setdefault(p, {}).setdefault(str(j), [])
                    noise[p][str(j)].append(z.double().tolist())
        self.steps.append({"iteration": module.iteration, "selected": list(selected), "noise": noise})

    def on_train_end(self, trainer: L.Trainer, module: Any) -> None:
        sums = {}
        for role in module.backbone.roles:
            flat = torch.cat([p.detach().reshape(-1).double() for p in module.backbone.role_parameters(role)])
            sums[role] = [float(flat.sum()), float((flat**2).sum())]
        record = {"rank": trainer.global_rank, "world_size": trainer.world_size, "steps": self.steps, "roles": sums}
        (self.out / f"rank{trainer.global_rank}.json").write_text(json.dumps(record))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--steps", type=int, default=3)
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    over = {**TINY, "trainer.devices": 2, "trainer.strategy": "ddp", "trainer.accelerator": "cpu",
            "trainer.max_steps": args.steps, "trainer.run_dir": str(out), "method.stage1_iterations": 0,
            "method.batch_size": 4, "method.group_size": 4, "method.micro_batches": 2}
    module, dm, trainer = assemble(resolve(METHOD, "toy2d", (), over), out, [Recorder(out)], run_callback=False)
    module.keep_last_rollout = True
    trainer.fit(module, datamodule=dm)


if __name__ == "__main__":
    main()
