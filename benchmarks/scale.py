"""Every method at the scale users run: a family's real architecture (random bf16 weights, nothing downloaded).

    python benchmarks/scale.py                                  # CUDA: SD3.5-M, 512 px, every method, LoRA roles
    python benchmarks/scale.py --device cpu                     # the CPU test (tiny width, seconds per row)
    python benchmarks/scale.py --methods dmd2 --roles full      # full-copy roles
    python benchmarks/scale.py --world flux --arch flux.1-dev   # another family (flux, flux2, zimage, qwen_image)

``--world`` picks the family (default ``sd3``) and ``--arch`` one of its architectures (:mod:`fewstep_rl.perf.arch`;
default: the world's real one on CUDA, its ``tiny`` twin on CPU). A method without a ``configs/<method>/<world>.yaml``
preset runs with its defaults (the resolver's note says so), capped as below.

For every row (method × roles mode), in a fresh subprocess (so peak memory is the row's own):

1. resolve the method's ``configs/<method>/<world>.yaml`` preset through the real config code (``world.path`` and
   ``world.prompts`` point at a scratch directory; the world's ``backbone_factory`` hook hands it the family's
   backbone over the architecture built in memory by :mod:`fewstep_rl.perf.arch`, with precomputed random prompt
   embeddings of the real shapes, e.g. 333 tokens × 4096 + pooled 2048 for SD3.5), with the batch and group sizes capped by ``--max-batch``/``--max-group`` (and the micro-batch
   counts scaled to keep the preset's micro-batch size where it can) so a row fits the time budget;
2. train it with the real Trainer for ``--warmup`` iterations, then time ``--iters`` iterations (fewer when the
   row would pass ``--time-cap`` seconds), recording every transformer pass (role, shape, grad on/off);
3. count the FLOPs of each distinct pass once under ``FlopCounterMode`` (forward, + backward for grad passes) and
   report: s/iteration, images/s (the iteration's samples, batch × group, per second), counted TFLOP/iteration,
   achieved TFLOP/s, **MFU** = counted FLOPs / elapsed / ``--peak-tflops`` (default 989: H100/H200 dense bf16;
   on CPU only with an explicit ``--peak-tflops``), the peak accelerator memory (``max_memory_allocated`` after
   the model is built; on CPU the peak RSS) and the measured weights/optimiser-state sizes used by
   ``fewstep-rl plan``.

The reward is :class:`fewstep_rl.perf.bench_reward.MeanPixelReward` (differentiable, ~free): real reward models
need checkpoints. The VAE decode runs (SD3.5's VAE config, random weights) but its FLOPs are not in the MFU, which
counts transformer passes only. ``rtdmd`` is stage 1 (cold start) and ``rtdmd@rl`` stage 2 (``stage1_iterations 0``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

T0 = time.perf_counter()
VARIANTS = {"rtdmd@rl": ("rtdmd", {"method.stage1_iterations": 0})}
PROMPTS = [f"a photograph of object {i} on a table, studio light" for i in range(16)]


def default_rows() -> list[str]:
    from fewstep_rl import registry

    out = []
    for m in registry.names("methods"):
        out.append(m)
        out += [v for v, (base, _) in VARIANTS.items() if base == m]
    return out


def scaled_overrides(cfg: object, method: str, max_batch: int, max_group: int) -> dict:
    """Batch/group caps, with the counts that must divide them adjusted (micro-batch size kept where possible)."""
    over: dict = {}
    b0 = int(cfg.batch_size)
    k0 = int(getattr(cfg, "group_size", 1) or 1)
    b = min(b0, max_batch)
    k = min(k0, max(max_group, 2)) if hasattr(cfg, "group_size") else 1
    over["method.batch_size"] = b
    if hasattr(cfg, "group_size"):
        over["method.group_size"] = k
    for key in ("opt_steps_per_epoch", "stage2_epochs_per_batch"):
        if hasattr(cfg, key):
            over[f"method.{key}"] = math.gcd(int(getattr(cfg, key)), b)
    if hasattr(cfg, "micro_batches"):
        m0 = int(cfg.micro_batches)
        if method == "tdm_r1":  # micro-batches hold whole prompt groups: they divide batch_size
            over["method.micro_batches"] = math.gcd(m0, b)
        else:  # rtdmd: micro-batches divide the samples of one stage-2 epoch; keep the preset's micro-batch size
            e0 = int(getattr(cfg, "stage2_epochs_per_batch", 1))
            e = over.get("method.stage2_epochs_per_batch", 1)
            size0 = max(1, b0 * k0 // e0 // m0)
            total = b * k // e
            mb = max(1, total // size0)
            while total % mb:
                mb -= 1
            over["method.micro_batches"] = mb
    if getattr(cfg, "forward_batch", None):
        over["method.forward_batch"] = min(int(cfg.forward_batch), b * k)
    return over


class SavedBytes:
    """Bytes autograd really keeps (distinct storages, parameters excluded) between two ``backward`` calls, the
    largest such group over the timed iterations: the measured counterpart of ``fewstep-rl plan``'s activation line
    (``--saved-bytes``; on the CPU, where there is no allocator peak to compare with)."""

    def __init__(self) -> None:
        self.peak = 0
        self.group: dict[int, int] = {}
        self.ctx = None
        self.orig_backward = None

    def enter(self, backbone) -> None:  # noqa: ANN001
        import torch

        if self.ctx is not None:
            return
        params = {q.untyped_storage().data_ptr() for q in backbone.parameters()}

        def pack(t):  # noqa: ANN001
            st = t.untyped_storage()
            if st.data_ptr() not in params:
                self.group[st.data_ptr()] = max(self.group.get(st.data_ptr(), 0), st.nbytes())
            return t

        self.ctx = torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t)
        self.ctx.__enter__()
        self.orig_backward = orig = torch.Tensor.backward

        def backward(t, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003
            self.close_group()
            return orig(t, *args, **kwargs)

        torch.Tensor.backward = backward

    def close_group(self) -> None:
        self.peak = max(self.peak, sum(self.group.values()))
        self.group = {}

    def exit(self) -> None:
        import torch

        if self.ctx is None:
            return
        self.close_group()
        self.ctx.__exit__(None, None, None)
        torch.Tensor.backward = self.orig_backward
        self.ctx = None


def _sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def bench_row(row: str, a: argparse.Namespace) -> dict:
    import lightning as L
    import torch

    from fewstep_rl.perf.arch import build_backbone, get_arch
    from fewstep_rl.perf.flops import PassRecorder, total_flops
    from fewstep_rl.run import assemble, resolve

    method, extra = VARIANTS.get(row, (row, {}))
    arch = get_arch(a.arch, a.world)
    scratch = Path(tempfile.mkdtemp(prefix="scale-"))
    (scratch / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    base = {
        "world.path": str(scratch), "world.prompts": str(scratch / "prompts.txt"), "world.resolution": a.resolution,
        "roles.mode": a.roles, "world.dtype": a.dtype,
        "rewards": [{"name": "fewstep_rl.perf.bench_reward:MeanPixelReward"}],
        "trainer.accelerator": "cuda" if a.device.startswith("cuda") else "cpu", "trainer.precision": a.precision,
        "trainer.max_steps": 10**6, "trainer.run_dir": str(scratch / "run"), "trainer.progress_bar": False,
        "trainer.log_every": 10**6, "world.attention_backend": a.attention_backend,
        "world.grad_checkpointing": a.grad_checkpointing, "world.compile": a.compile, **extra,
    }
    probe = resolve(method, a.world, (), base)
    over = {**base, **scaled_overrides(probe.method, method, a.max_batch, a.max_group)}
    if a.plan_only:
        return plan_row(row, method, a, {k_: v for k_, v in over.items() if k_.startswith("method.")})
    resolved = resolve(method, a.world, (), over)
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[a.dtype]
    wc = resolved.world
    times: list[float] = []
    state: dict = {"saved": SavedBytes()}

    class Timer(L.Callback):
        def on_train_start(self, trainer, pl_module):  # noqa: ANN001
            state["rec"] = PassRecorder(pl_module.backbone)
            state["t0"] = time.perf_counter()
            if a.device.startswith("cuda"):
                torch.cuda.reset_peak_memory_stats()

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):  # noqa: ANN001
            _sync(a.device)
            state["rec"].on = int(batch["pos"]) >= a.warmup
            if a.saved_bytes and state["rec"].on:
                state["saved"].enter(pl_module.backbone)
            self.t = time.perf_counter()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):  # noqa: ANN001
            _sync(a.device)
            dt = time.perf_counter() - self.t
            pos = int(batch["pos"])
            state["rec"].on = False
            state["saved"].exit()
            if pos < a.warmup:
                state["warm_s"] = state.get("warm_s", 0.0) + dt
            else:
                times.append(dt)
            elapsed = time.perf_counter() - state["t0"]
            capped = bool(times) and elapsed + (times[-1] if times else 0.0) > a.time_cap
            if len(times) >= a.iters or capped:
                trainer.should_stop = True

    module, dm, trainer = assemble(resolved, scratch / "run", [Timer()], run_callback=False)
    module.world.backbone_factory = lambda: build_backbone(
        arch, PROMPTS, device=a.device, dtype=dtype, resolution=wc.resolution, roles=resolved.roles, seed=0)
    t_fit = time.perf_counter()
    trainer.fit(module, datamodule=dm)
    fit_s = time.perf_counter() - t_fit
    peak = torch.cuda.max_memory_allocated() if a.device.startswith("cuda") else None
    bb = module.backbone
    bb.to(a.device)
    rec = state["rec"]
    rec.remove()
    n = len(times)
    ac = torch.bfloat16 if a.precision.startswith("bf16") else (torch.float16 if a.precision.startswith("16") else None)
    try:
        flops, per = total_flops(bb, rec.calls, PROMPTS, ac)
        flop_error = None
    except Exception as e:  # noqa: BLE001 - keep the timing when the FLOP count fails
        flops, per, flop_error = None, {}, f"{type(e).__name__}: {e}"[:300]
    step = sum(times) / n
    b, k = module.batch_spec()
    images = b * k
    base_bytes = sum(p.numel() * p.element_size() for n_, p in bb.transformer.named_parameters()
                     if ".lora_" not in n_)
    role_bytes = {r: sum(p.numel() * p.element_size() for p in bb.role_parameters(r)) for r in bb.roles}
    opts = module.optimizers()
    opts = opts if isinstance(opts, list) else [opts]
    opt_bytes = sum(t.numel() * t.element_size() for o in opts for s in o.optimizer.state.values()
                    for t in s.values() if torch.is_tensor(t))
    vae_bytes = sum(p.numel() * p.element_size() for p in bb.vae.parameters()) if bb.vae is not None else 0
    emb_bytes = sum(t.numel() * t.element_size() for t in bb.text_embedder.buffers())
    res = {
        "row": row, "method": method, "world": a.world, "arch": a.arch, "roles": a.roles, "device": a.device,
        "precision": a.precision, "resolution": a.resolution, "batch": b, "group": k, "images_per_iter": images,
        "iters": n, "warmup_s": state.get("warm_s", 0.0), "fit_s": fit_s, "s_per_iter": step,
        "images_per_s": images / step, "passes_per_iter": sum(rec.calls.values()) / n,
        "grad_passes_per_iter": sum(c for (_, _, g), c in rec.calls.items() if g) / n,
        "tflop_per_iter": flops / n / 1e12 if flops is not None else None,
        "tflops": flops / n / step / 1e12 if flops is not None else None,
        "mfu": (flops / n / step / (a.peak_tflops * 1e12)) if a.peak_tflops and flops is not None else None,
        "flop_error": flop_error,
        "peak_mem_gb": peak / 2**30 if peak is not None else None,
        "saved_peak_gb": state["saved"].peak / 2**30 if a.saved_bytes else None,
        "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
        "base_gb": base_bytes / 2**30, "vae_gb": vae_bytes / 2**30, "embed_gb": emb_bytes / 2**30,
        "roles_gb": {r: v / 2**30 for r, v in role_bytes.items()},
        "trainable_roles": [r for r in bb.roles if bb.trainable[r]], "opt_state_gb": opt_bytes / 2**30,
        "pass_kinds": {key: {"count": rec.calls[c] / n, "tflop": per[key] / 1e12}
                       for key, c in zip(per, rec.calls, strict=False)},
        "overrides": {k_: v for k_, v in over.items() if k_.startswith("method.")},
    }
    return res


_PLAN_CACHE: dict = {}


def plan_row(row: str, method: str, a: argparse.Namespace, over: dict) -> dict:
    """``fewstep-rl plan``'s estimate for the row's configuration (precomputed text, the bench's prompt table)."""
    from fewstep_rl.plan import make_plan

    prec = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}[a.dtype]
    res = make_plan(method, a.arch, a.roles, prec, resolution=a.resolution, overrides=over, precomputed_text=True,
                    prompt_cache=len(PROMPTS) + 1, world=a.world)
    return {"row": row, "roles": a.roles, "plan_gb": res.total_gb, "static_gb": res.static_gb,
            "activations_gb": res.activations_gb, "lines": res.lines, "passes": res.passes}


def fmt_compare(rows: list[dict], plans: list[dict]) -> str:
    """Measured peak vs ``fewstep-rl plan``'s estimate, per row, with the relative error."""
    by = {(p["row"], p["roles"]): p for p in plans if "error" not in p}
    lines = ["| method | roles | measured peak GiB | plan GiB (static + activations) | error |", "|---|---|---|---|---|"]
    errs = []
    for r in rows:
        p = by.get((r["row"], r.get("roles")))
        if "error" in r or p is None:
            continue
        meas = r["peak_mem_gb"]
        if meas is None and r.get("saved_peak_gb") is not None:
            plan_act = next(v for k, v in p["lines"] if k.startswith("activations"))
            err = (plan_act - r["saved_peak_gb"]) / r["saved_peak_gb"] if r["saved_peak_gb"] else float("nan")
            errs.append(abs(err))
            lines.append(f"| {r['row']} | {r['roles']} | activations kept for backward: {1024 * r['saved_peak_gb']:.3g} MiB "
                         f"(CPU) | {1024 * plan_act:.3g} MiB (activation line) | {100 * err:+.1f}% |")
            continue
        if meas is None:
            lines.append(f"| {r['row']} | {r['roles']} | n/a (CPU) | {p['plan_gb']:.3g} ({p['static_gb']:.3g} + "
                         f"{p['activations_gb']:.3g}) | n/a |")
            continue
        err = (p["plan_gb"] - meas) / meas
        errs.append(abs(err))
        lines.append(f"| {r['row']} | {r['roles']} | {meas:.2f} | {p['plan_gb']:.2f} ({p['static_gb']:.2f} + "
                     f"{p['activations_gb']:.2f}) | {100 * err:+.1f}% |")
    if errs:
        lines.append(f"\nmean |error| {100 * sum(errs) / len(errs):.1f}%, max {100 * max(errs):.1f}% "
                     f"over {len(errs)} rows")
    return "\n".join(lines)


def fmt_table(rows: list[dict]) -> str:
    lines = ["| method | roles | batch×group | s/iter | images/s | passes/iter (grad) | TFLOP/iter | TFLOP/s | MFU | "
             "peak mem GB |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['row']} | {r.get('roles', '')} | — | failed: {r['error'][:80]} | | | | | | |")
            continue
        mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "n/a"
        tf = (f"{r['tflop_per_iter']:.3g} | {r['tflops']:.3g}" if r["tflop_per_iter"] is not None
              else "count failed | —")
        mem = r["peak_mem_gb"] if r["peak_mem_gb"] is not None else r["peak_rss_gb"]
        unit = "" if r["peak_mem_gb"] is not None else " (RSS)"
        lines.append(
            f"| {r['row']} | {r['roles']} | {r['batch']}×{r['group']} | {r['s_per_iter']:.3f} | "
            f"{r['images_per_s']:.2f} | {r['passes_per_iter']:.1f} ({r['grad_passes_per_iter']:.1f}) | "
            f"{tf} | {mfu} | {mem:.2f}{unit} |")
    return "\n".join(lines)


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--world", default="sd3", help="sd3, flux, flux2, zimage or qwen_image (default sd3)")
    ap.add_argument("--arch", default=None,
                    help="an architecture of --world (default: its real one on CUDA, e.g. sd3.5-medium; on CPU its "
                         "tiny twin: the test)")
    ap.add_argument("--methods", default=None, help="comma-separated rows (default: every method + rtdmd@rl)")
    ap.add_argument("--roles", default="lora", help="lora, full, or lora,full")
    ap.add_argument("--full-methods", default=None, help="rows also run with full copies (with --roles lora)")
    ap.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    ap.add_argument("--precision", default=None, help="Lightning precision (default: bf16-mixed on CUDA, 32-true on CPU)")
    ap.add_argument("--dtype", default=None, help="weights dtype (default: bfloat16 on CUDA, float32 on CPU)")
    ap.add_argument("--resolution", type=int, default=None, help="image side (default 512; tiny: 64)")
    ap.add_argument("--max-batch", type=int, default=2, help="cap on prompts per batch (default 2)")
    ap.add_argument("--max-group", type=int, default=4, help="cap on samples per prompt (default 4)")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--iters", type=int, default=2)
    ap.add_argument("--time-cap", type=float, default=60.0, help="stop timing a row after this many seconds")
    ap.add_argument("--row-timeout", type=float, default=240.0, help="kill a row's subprocess after this many s")
    ap.add_argument("--peak-tflops", type=float, default=None,
                    help="device bf16 peak for MFU (default 989 on CUDA = H100/H200 dense bf16; none on CPU)")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads on CPU")
    ap.add_argument("--out", default=None, help="write the JSON rows here")
    ap.add_argument("--attention-backend", default="auto", help="world.attention_backend (auto, flash, ...)")
    ap.add_argument("--grad-checkpointing", action="store_true", help="world.grad_checkpointing")
    ap.add_argument("--compile", action="store_true", help="world.compile (torch.compile the transformer)")
    ap.add_argument("--saved-bytes", action="store_true",
                    help="also measure the bytes autograd keeps per backward group (the plan's activation line)")
    ap.add_argument("--deadline", type=float, default=None, help="skip the rows left after this many seconds")
    ap.add_argument("--plan-only", action="store_true",
                    help="no benchmark: write fewstep-rl plan's estimates of the same rows (JSON to --out)")
    ap.add_argument("--compare", nargs=2, metavar=("ROWS", "PLANS"), default=None,
                    help="print measured peaks (ROWS JSON) against plan estimates (PLANS JSON) and exit")
    ap.add_argument("--one", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.compare:
        return a
    import torch

    a.device = a.device or ("cuda" if torch.cuda.is_available() else "cpu")
    cuda = a.device.startswith("cuda")
    from fewstep_rl.perf.arch import DEFAULT, TINY, get_arch

    if a.world not in DEFAULT:
        ap.error(f"--world must be one of {', '.join(DEFAULT)}, got {a.world!r}")
    a.arch = a.arch or (DEFAULT[a.world] if cuda else TINY[a.world])
    try:
        get_arch(a.arch, a.world)
    except ValueError as e:
        ap.error(str(e))
    a.precision = a.precision or ("bf16-mixed" if cuda else "32-true")
    a.dtype = a.dtype or ("bfloat16" if cuda else "float32")
    a.resolution = a.resolution or (64 if a.arch.startswith("tiny") else 512)
    if a.peak_tflops is None and cuda:
        a.peak_tflops = 989.0
    return a


def job_list(a: argparse.Namespace) -> list[tuple[str, str]]:
    """(row, roles mode) pairs: each row in every ``--roles`` mode; a ``--full-methods`` row's full-copy job right
    after its LoRA one (so a deadline cuts the least important rows, at the end of ``--methods``)."""
    rows_spec = a.methods.split(",") if a.methods else default_rows()
    full = a.full_methods.split(",") if a.full_methods else []
    jobs: list[tuple[str, str]] = []
    for r in rows_spec:
        for mode in a.roles.split(","):
            jobs.append((r, mode))
        if r in full and (r, "full") not in jobs:
            jobs.append((r, "full"))
    jobs += [(r, "full") for r in full if (r, "full") not in jobs]
    return jobs


def main(argv: list[str] | None = None) -> int:
    a = parse(argv)
    if a.compare:
        missing = [f for f in a.compare if not Path(f).is_file()]
        if missing:
            print(f"no comparison: {', '.join(missing)} missing (that part did not finish)")
            return 1
        rows, plans = (json.loads(Path(f).read_text()) for f in a.compare)
        print(fmt_compare(rows, plans))
        return 0
    if a.plan_only and not a.one:  # in-process: the meta-device replays are shared between rows
        jobs = job_list(a)
        out = []
        for row, mode in jobs:
            a.roles = mode
            t = time.perf_counter()
            try:
                out.append(bench_row(row, a))
            except Exception as e:  # noqa: BLE001 - fail soft per row
                out.append({"row": row, "roles": mode, "error": f"{type(e).__name__}: {e}"[:300]})
            print(f"[plan] {row} ({mode}): {out[-1].get('plan_gb', out[-1].get('error'))} "
                  f"({time.perf_counter() - t:.0f} s)", file=sys.stderr, flush=True)
        if a.out:
            Path(a.out).write_text(json.dumps(out, indent=1))
        return 0
    if a.one:
        import torch

        torch.set_num_threads(a.threads)
        import warnings

        warnings.filterwarnings("ignore")
        print("ROW " + json.dumps(bench_row(a.one, a)))
        return 0
    jobs = job_list(a)
    passthru = ["--world", a.world, "--arch", a.arch, "--device", a.device, "--precision", a.precision, "--dtype", a.dtype,
                "--resolution", str(a.resolution), "--max-batch", str(a.max_batch), "--max-group", str(a.max_group),
                "--warmup", str(a.warmup), "--iters", str(a.iters), "--time-cap", str(a.time_cap),
                "--threads", str(a.threads), "--attention-backend", a.attention_backend] \
        + (["--saved-bytes"] if a.saved_bytes else []) \
        + (["--grad-checkpointing"] if a.grad_checkpointing else []) + (["--compile"] if a.compile else []) \
        + (["--peak-tflops", str(a.peak_tflops)] if a.peak_tflops else [])
    rows = []
    env = {**os.environ, "OMP_NUM_THREADS": str(a.threads), "HF_HUB_OFFLINE": "1"}
    t_start = T0  # the deadline counts from this process's start (imports included)
    for row, mode in jobs:
        t = time.perf_counter()
        left = a.deadline - (t - t_start) if a.deadline else a.row_timeout
        if left < 15:
            rows.append({"row": row, "roles": mode, "error": "skipped: out of time (--deadline)"})
            print(f"[scale] {row} ({mode}): skipped (deadline)", file=sys.stderr, flush=True)
            continue
        cmd = [sys.executable, os.path.abspath(__file__), "--one", row, "--roles", mode, *passthru]
        try:
            p = subprocess.run(cmd, capture_output=True, text=True, timeout=min(a.row_timeout, left), env=env)
            line = [ln for ln in p.stdout.splitlines() if ln.startswith("ROW ")]
            if p.returncode != 0 or not line:
                err = (p.stderr.strip().splitlines() or ["no output"])[-1]
                rows.append({"row": row, "roles": mode, "error": err, "stderr": p.stderr[-4000:]})
            else:
                rows.append(json.loads(line[-1][4:]))
        except subprocess.TimeoutExpired:
            rows.append({"row": row, "roles": mode, "error": f"timed out after {min(a.row_timeout, left):.0f} s"})
        r = rows[-1]
        status = "failed: " + r["error"] if "error" in r else f"{r['s_per_iter']:.3f} s/iter"
        print(f"[scale] {row} ({mode}): {status} ({time.perf_counter() - t:.0f} s)", file=sys.stderr, flush=True)
    print(fmt_table(rows))
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps(rows, indent=1))
    return 0 if all("error" not in r for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
