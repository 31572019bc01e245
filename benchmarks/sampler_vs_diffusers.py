"""4-step sampling time: the framework's sampler vs ``diffusers.StableDiffusion3Pipeline`` on the same weights.

    python benchmarks/sampler_vs_diffusers.py [--batch 4] [--steps 4] [--guidance 4.5] [--reps 7] [--threads 1]

A tiny SD3 pipeline (two CLIPs, T5, VAE, shift 3; :func:`fewstep_rl.backbones.tiny.sd3_pipeline_components`) is
written with ``save_pretrained`` and loaded by both sides: ``StableDiffusion3Pipeline.from_pretrained`` and
``SD3Backbone.from_pretrained`` (the ``sd3`` world's loader). Both sample the same prompts from the same initial
noise on the same σ-grid (shift-3, ``sigmas=`` given to the pipeline with a shift-1 scheduler, so the grids are
identical), with CFG, and decode to images in [0, 1]:

* pipeline: ``pipe(prompt=..., latents=noise, sigmas=..., guidance_scale=..., output_type="pt")``;
* ours: :func:`fewstep_rl.eval.generate.generate` (Euler transition = the pipeline's scheduler step), timed once
  with a cold prompt cache (prompts encoded as the pipeline does every call) and once warm (the backbone's LRU
  prompt cache: training and evaluation re-use prompts).

The outputs are checked equal (max |Δ| ≤ 1e-4) before timing. Times are medians of ``--reps`` interleaved runs
after one warm-up, one intra-op thread.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

PROMPTS = ["a red cube on a blue ball", "two balls", "a blue cube", "a red ball on a table"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--guidance", type=float, default=4.5)
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--resolution", type=int, default=64, help="image side (latent side = resolution / 8)")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline
    from diffusers.utils import logging as dlog

    from fewstep_rl.backbones import tiny
    from fewstep_rl.backbones.sd3 import SD3Backbone
    from fewstep_rl.eval.generate import generate
    from fewstep_rl.sampling import Transition, sigma_grid

    dlog.disable_progress_bar()
    d = Path(tempfile.mkdtemp(prefix="sd3-tiny-"))
    StableDiffusion3Pipeline(**tiny.sd3_pipeline_components()).save_pretrained(d)
    pipe = StableDiffusion3Pipeline.from_pretrained(d, local_files_only=True)
    pipe.scheduler = FlowMatchEulerDiscreteScheduler(shift=1.0)  # custom sigmas used exactly as given
    pipe.set_progress_bar_config(disable=True)
    side = a.resolution // 8
    bb = SD3Backbone.from_pretrained(d, resolution=side)
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(a.batch)]
    sig = sigma_grid(a.steps, shift=3.0)
    seed = 0
    noise = torch.randn((a.batch, *bb.sample_shape), generator=torch.Generator().manual_seed(seed))

    def run_pipe() -> torch.Tensor:
        with torch.no_grad():
            return pipe(prompt=prompts, latents=noise.clone(), sigmas=sig[:-1].tolist(), guidance_scale=a.guidance,
                        height=a.resolution, width=a.resolution, output_type="pt").images

    def run_ours(cold: bool) -> torch.Tensor:
        if cold:
            bb._cache.clear()
            bb._null = None
        return generate(bb, "teacher", prompts, torch.Generator().manual_seed(seed), sig, Transition("euler"),
                        guidance=a.guidance)

    ref, ours = run_pipe(), run_ours(True)
    diff = (ref - ours).abs().max().item()
    if diff > 1e-4:
        raise SystemExit(f"outputs differ: max |Δ| = {diff:.2e}")
    times: dict[str, list[float]] = {"pipeline": [], "ours (cold prompt cache)": [], "ours (warm prompt cache)": []}
    for _ in range(a.reps):  # interleaved
        for name, fn in (("pipeline", run_pipe), ("ours (cold prompt cache)", lambda: run_ours(True)),
                         ("ours (warm prompt cache)", lambda: run_ours(False))):
            t = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t)
    base = statistics.median(times["pipeline"])
    print(f"4-step sampling, batch {a.batch}, CFG {a.guidance}, {a.resolution} px, {a.threads} thread(s); "
          f"outputs equal (max |Δ| = {diff:.1e})")
    print("| sampler | median s | × pipeline |\n|---|---|---|")
    for name, ts in times.items():
        m = statistics.median(ts)
        print(f"| {name} | {m:.4f} | {m / base:.2f} |")


if __name__ == "__main__":
    main()
