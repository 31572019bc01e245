"""Per-method step time against the same network passes timed alone, and peak memory.

    python benchmarks/bench_methods.py [--methods dmd2,...] [--world toy2d] [--iters 30] [--threads 1]

For every method, in a fresh subprocess (so peak memory is the method's own):

1. build the method from its preset through the real assembly code and train it with a Trainer for ``warmup``
   iterations, then time ``iters`` iterations (``time.perf_counter`` around each training batch);
2. record every backbone forward of the timed iterations (role, input shape, whether grad was on), then time each
   distinct pass alone in the same process (median of 5): a forward for no-grad calls, forward + backward of the
   output for grad calls (the step's backward passes run through the same networks);
3. report the mean iteration time, the network time per iteration, the overhead (iteration − network: sampling, loss
   functions, optimiser steps, EMA, Lightning), the number of passes, and the peak resident memory
   (``ru_maxrss``; on CUDA also ``torch.cuda.max_memory_allocated``).

One intra-op thread by default: on this kind of 2-core VM timings with 2 threads swing 2-4× (infra.md).

On CUDA the script synchronises around every timed region and adds a ``CUDA peak MB`` column. The passes are timed
on the device the training ran on (Lightning's teardown moves the module back to the CPU after ``fit``; timing them
there made the passes sum to 3.5–13× the iteration on an H100). Rows whose passes exceed the iteration are flagged on
stderr.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path


def bench_one(method: str, world: str, iters: int, warmup: int, overrides: dict) -> dict:
    import lightning as L
    import torch

    from fewstep_rl.run import assemble, resolve

    run_dir = Path(tempfile.mkdtemp(prefix="bench-"))
    over = {"trainer.max_steps": warmup + iters + 1, "trainer.run_dir": str(run_dir), "trainer.progress_bar": False,
            "trainer.eval_samples": 16, **overrides}
    resolved = resolve(method, world, (), over)
    calls: list[tuple[str | None, tuple, bool]] = []
    recording = [False]
    times: list[float] = []

    def sync() -> None:  # CUDA kernels run asynchronously: time only finished work
        if torch.cuda.is_available():
            torch.cuda.synchronize()

    train_device: list[torch.device] = []

    class Timer(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):  # noqa: ANN001
            if not train_device:
                train_device.append(pl_module.device)
            sync()
            self.t = time.perf_counter()
            if int(batch["pos"]) == warmup:  # record the passes of every timed iteration
                orig = pl_module.backbone._predict

                def rec(x, sigma, cond, role):  # noqa: ANN001
                    if recording[0]:
                        calls.append((role, tuple(x.shape), torch.is_grad_enabled()))
                    return orig(x, sigma, cond, role)

                pl_module.backbone._predict = rec
            recording[0] = warmup <= int(batch["pos"]) < warmup + iters

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):  # noqa: ANN001
            pos = int(batch["pos"])
            sync()
            if warmup <= pos < warmup + iters:
                times.append(time.perf_counter() - self.t)
            recording[0] = False

    module, dm, trainer = assemble(resolved, run_dir, [Timer()], run_callback=False)
    trainer.fit(module, datamodule=dm)
    dev = train_device[0]
    module.to(dev)  # Lightning's teardown moves the module back to the CPU: time the passes where they ran
    bb = module.backbone
    del bb._predict  # back to the class method
    # time the recorded passes alone
    prompts = module.world.train_prompts
    net = 0.0
    for (role, shape, grad), count in Counter(calls).items():  # each distinct pass timed alone, times its count
        cond = bb.encode_prompts([prompts[i % len(prompts)] for i in range(shape[0])])
        # grad passes of frozen roles (e.g. DIDR's DRP) differentiate x
        x = torch.randn(shape, device=dev, requires_grad=grad)
        sigma = torch.rand(shape[0], device=dev) * 0.9 + 0.05
        reps = []
        for _ in range(5):
            sync()
            t = time.perf_counter()
            with torch.set_grad_enabled(grad):
                out = bb._predict(x, sigma, cond, role)
                if grad:
                    out.float().sum().backward()
            sync()
            reps.append(time.perf_counter() - t)
        for p in bb.parameters():
            p.grad = None
        net += statistics.median(reps) * count / iters
    step = statistics.mean(times)  # mean: TTUR makes iterations unequal; passes are averaged the same way
    res = {
        "method": method, "world": world, "iter_ms": 1e3 * step, "network_ms": 1e3 * net,
        "overhead_ms": 1e3 * (step - net), "passes": len(calls) / iters, "grad_passes": sum(g for *_, g in calls) / iters,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "batch": module.batch_spec()[0] * module.batch_spec()[1],
    }
    if torch.cuda.is_available():
        res["cuda_peak_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return res


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--methods", default=None, help="comma-separated (default: every registered method)")
    ap.add_argument("--world", default="toy2d")
    ap.add_argument("--iters", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--override", action="append", default=[], help="KEY=VALUE (YAML value), repeatable")
    ap.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--out", default=None, help="also write the JSON rows here")
    a = ap.parse_args()
    import yaml

    overrides = {k: yaml.safe_load(v) for k, _, v in (o.partition("=") for o in a.override)}
    if a.one:
        import torch

        torch.set_num_threads(a.threads)
        print(json.dumps(bench_one(a.methods, a.world, a.iters, a.warmup, overrides)))
        return
    from fewstep_rl import registry

    methods = a.methods.split(",") if a.methods else registry.names("methods")
    rows = []
    for m in methods:
        cmd = [sys.executable, __file__, "--one", "--methods", m, "--world", a.world, "--iters", str(a.iters),
               "--warmup", str(a.warmup), "--threads", str(a.threads)] + [f"--override={o}" for o in a.override]
        p = subprocess.run(cmd, capture_output=True, text=True)
        if p.returncode != 0:
            print(f"{m}: failed\n{p.stderr[-2000:]}", file=sys.stderr)
            continue
        rows.append(json.loads(p.stdout.strip().splitlines()[-1]))
        if rows[-1]["overhead_ms"] < 0:
            print(f"{m}: the passes timed alone exceed the iteration; the network/overhead split is invalid here",
                  file=sys.stderr)
    cuda = any("cuda_peak_mb" in r for r in rows)
    print("| method | world | batch | iteration ms | network passes ms | overhead ms | passes/iter (grad) | peak RSS MB |"
          + (" CUDA peak MB |" if cuda else ""))
    print("|---|---|---|---|---|---|---|---|" + ("---|" if cuda else ""))
    for r in rows:
        print(f"| {r['method']} | {r['world']} | {r['batch']} | {r['iter_ms']:.1f} | {r['network_ms']:.1f} | "
              f"{r['overhead_ms']:.1f} | {r['passes']:.1f} ({r['grad_passes']:.1f}) | {r['peak_rss_mb']:.0f} |"
              + (f" {r.get('cuda_peak_mb', float('nan')):.0f} |" if cuda else ""))
    if a.out:
        Path(a.out).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
