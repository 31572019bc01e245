"""Wall time per iteration with ``trainer.reward_overlap`` off and on, under a deliberately slow black-box reward.

    python benchmarks/bench_overlap.py [--methods flow_grpo,crd,nft,tdm_r1,rtdmd] [--world shapes]
                                       [--ms-per-sample 40] [--chunks 2] [--iters 4] [--warmup 1] [--threads 1]

The reward is :class:`fewstep_rl.perf.bench_reward.SlowReward`: ``tanh(mean(x))`` after sleeping ``ms_per_sample``
per sample — a reward server's latency with no CPU work, so the figure isolates the overlap (a CPU-bound black box
such as OCR or JPEG competes with the rollout for the cores on a CPU-only machine, and overlaps fully only when the
rollout runs on an accelerator). Each (method, flag) runs in a fresh subprocess, off then on, through the real
assembly code with the world's preset (``--chunks N``: every method's rollout in N chunks instead of the preset's
count); ``iters`` iterations are timed after ``warmup``.

Columns: the samples scored per iteration and the rollout chunks they come in, the reward's own sleep per
iteration, the **reward wait** — the time the training loop spends blocked on rewards (inside
``RolloutScores.add`` and ``result``: decode + scoring when off, only what did not hide when on) — off and on with
their ratio, and the mean iteration time off and on. The wait is the clean figure (the reward sleeps, so it barely
moves with the machine's load; whole iterations on a loaded 2-core VM swing ±15 %). With ``C`` chunks the wait
falls at best to ``1/C`` of the scoring (when a chunk rolls out at least as long as it scores; in rtdmd more can
hide behind the reference-KL pass): the last chunk's scores are needed before the first optimiser step — scores
are collected within the iteration, so the algorithm stays on-policy and the trained weights are bit-identical
(``tests/test_reward_scoring.py``).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CHUNKS = {"flow_grpo": "opt_steps_per_epoch", "crd": "opt_steps_per_epoch", "nft": "opt_steps_per_epoch",
          "tdm_r1": "micro_batches", "rtdmd": "micro_batches"}
STAGE2 = {"rtdmd": {"method.stage1_iterations": 0}}  # rtdmd scores rewards in stage 2 only


def bench_one(method: str, world: str, overlap: bool, ms: float, iters: int, warmup: int, chunks: int | None) -> dict:
    import lightning as L

    from fewstep_rl.run import assemble, resolve

    over = {"trainer.max_steps": warmup + iters, "trainer.run_dir": tempfile.mkdtemp(prefix="bench-overlap-"),
            "trainer.progress_bar": False, "trainer.reward_overlap": overlap,
            "rewards": [{"name": "fewstep_rl.perf.bench_reward:SlowReward", "ms_per_sample": ms}],
            **STAGE2.get(method, {})}
    if chunks:
        over[f"method.{CHUNKS[method]}"] = chunks
    times: list[float] = []
    waits: list[float] = []

    class Timer(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):  # noqa: ANN001
            self.t = time.perf_counter()
            waited.clear()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):  # noqa: ANN001
            if int(batch["pos"]) >= warmup:
                times.append(time.perf_counter() - self.t)
                waits.append(sum(waited))

    from fewstep_rl.rewards.base import RolloutScores

    waited: list[float] = []  # seconds the training loop spent inside RolloutScores.add/result (blocked on rewards)

    def timed(fn):  # noqa: ANN001, ANN202
        def run(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
            t = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                waited.append(time.perf_counter() - t)
        return run

    RolloutScores.add, RolloutScores.result = timed(RolloutScores.add), timed(RolloutScores.result)
    resolved = resolve(method, world, (), over)
    module, dm, trainer = assemble(resolved, Path(over["trainer.run_dir"]), [Timer()], run_callback=False)
    trainer.fit(module, datamodule=dm)
    prompts, group = module.batch_spec()
    samples = prompts * group
    return {"method": method, "world": world, "overlap": overlap, "iter_s": statistics.mean(times),
            "wait_s": statistics.mean(waits),
            "samples": samples, "chunks": int(getattr(module.cfg, CHUNKS[method])),
            "sleep_s": ms * samples / 1000}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--methods", default=",".join(CHUNKS))
    ap.add_argument("--world", default="shapes")
    ap.add_argument("--ms-per-sample", type=float, default=40.0)
    ap.add_argument("--chunks", type=int, default=None, help="rollout chunks of every method (default: the preset's)")
    ap.add_argument("--iters", type=int, default=4)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--one", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--out", default=None, help="also write the JSON rows here")
    a = ap.parse_args()
    if a.one:
        import torch

        torch.set_num_threads(a.threads)
        method, flag = a.one.split(":")
        print(json.dumps(bench_one(method, a.world, flag == "on", a.ms_per_sample, a.iters, a.warmup, a.chunks)))
        return
    rows = []
    for m in a.methods.split(","):
        pair = {}
        for flag in ("off", "on"):
            cmd = [sys.executable, __file__, "--one", f"{m}:{flag}", "--world", a.world, "--iters", str(a.iters),
                   "--warmup", str(a.warmup), "--threads", str(a.threads), "--ms-per-sample", str(a.ms_per_sample)] + (["--chunks", str(a.chunks)] if a.chunks else [])
            p = subprocess.run(cmd, capture_output=True, text=True)
            if p.returncode != 0:
                print(f"{m} ({flag}): failed\n{p.stderr[-2000:]}", file=sys.stderr)
                break
            pair[flag] = json.loads(p.stdout.strip().splitlines()[-1])
        if len(pair) == 2:
            off, on = pair["off"], pair["on"]
            rows.append({**off, "off_s": off["iter_s"], "on_s": on["iter_s"], "ratio": on["iter_s"] / off["iter_s"],
                         "wait_off_s": off["wait_s"], "wait_on_s": on["wait_s"]})
    print(f"slow black-box reward: {a.ms_per_sample} ms/sample sleep, world {a.world}, {a.iters} timed iterations")
    print("| method | samples/iter (chunks) | reward sleep s/iter | reward wait off → on s/iter | wait on/off | "
          "iteration off → on s | iteration on/off |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['method']} | {r['samples']} ({r['chunks']}) | {r['sleep_s']:.2f} | {r['wait_off_s']:.2f} → "
              f"{r['wait_on_s']:.2f} | {r['wait_on_s'] / r['wait_off_s']:.2f} (≥ {1 / r['chunks']:.2f}) | "
              f"{r['off_s']:.2f} → {r['on_s']:.2f} | {r['ratio']:.2f} |")
    if a.out:
        Path(a.out).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
