"""``fewstep-rl plan``: accelerator memory of a method at a real architecture, per role, and the largest batch.

    fewstep-rl plan --method rtdmd --world sd3 --arch sd3.5-medium [--roles lora|full] [--precision bf16]
                    [--devices N --strategy fsdp2] [--memory GB]

Worlds and architectures (:mod:`fewstep_rl.perf.arch`): ``sd3`` (``sd3.5-medium``), ``flux`` (``flux.1-dev``),
``flux2`` (``flux.2-klein-4b``), ``zimage`` (``z-image-turbo``), ``qwen_image`` (``qwen-image``); ``--arch``
defaults to the world's real one, and each world has a ``tiny[-<world>]`` twin for tests.

The estimate is built from counts, not from a fit:

* **weights** — parameter counts of the architecture built on the meta device (:mod:`fewstep_rl.perf.arch`): the
  frozen base transformer and VAE, the text encoders (counted from their configs, e.g. CLIP-L + CLIP-G + T5-XXL,
  5.6 B parameters for SD3.5; ``--precomputed-text`` drops them as ``benchmarks/scale.py`` does), each role's LoRA
  adapter (r·(in+out) per target linear of the family's default targets) or full copy;
* **gradients and optimiser state** — every trainable role: one gradient + AdamW's two moments, in the role's dtype;
* **activations** — the grad passes the method makes are *counted*: the method runs a few iterations at the
  world's tiny width on the CPU (the real code path, the preset's batch structure) with every transformer pass and every
  ``backward`` recorded; passes between two backward calls are alive together. Each such pass is then replayed at
  the real width on the meta device through the backbone's own ``_predict`` / ``decode`` (packing, ids and
conditioning as in training; no memory, no FLOPs) under ``saved_tensors_hooks``, which sums the bytes of the
  distinct tensors autograd keeps for backward (parameters excluded). The peak activation memory is the largest
  sum over one backward group. A no-grad pass adds its largest live intermediate, the backward twice the largest
  per-layer saving (the gradient buffers autograd allocates while it walks back); the prompt-embedding cache
  (``--prompt-cache``) is added too.

``--devices N --strategy fsdp2`` divides weights, gradients and optimiser state by N (FSDP2 shards every unit of
``Backbone.fsdp_units``) and adds one gathered transformer block; activations are per device. The largest batch
that fits ``--memory`` GB scales the activations linearly in ``batch_size`` (for micro-batched RL methods the
grad passes are micro-batches, so the bound is on the micro-batch; the line says so).

Departure: the activation replay uses the math attention of the meta device with attention probabilities
(``B × heads × L × L`` tensors) excluded, i.e. the flash / memory-efficient SDPA backends the GPU uses.
"""

from __future__ import annotations

import dataclasses
import logging
from collections import Counter
from typing import Any

import torch

GiB = 2**30
_META: dict = {}
_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}


@dataclasses.dataclass
class PlanResult:
    method: str
    arch: str
    roles: str
    precision: str
    devices: int
    strategy: str
    lines: list[tuple[str, float]]          # (item, GiB per device)
    batch_size: int
    group_size: int
    activations_gb: float
    static_gb: float
    passes: dict[str, Any]
    micro_batched: bool

    @property
    def total_gb(self) -> float:
        return sum(v for _, v in self.lines)

    def max_batch(self, memory_gb: float) -> int:
        """Largest ``batch_size`` with ``static + activations·b/batch_size ≤ memory`` (0: the static part alone
        does not fit)."""
        free = memory_gb - (self.total_gb - self.activations_gb)
        if free <= 0:
            return 0
        per = self.activations_gb / self.batch_size if self.activations_gb > 0 else 0.0
        return 10**6 if per == 0 else int(free // per)

    def format(self, memory_gb: float | None = None) -> str:
        head = (f"plan: {self.method} on {self.arch}, {self.roles} roles, {self.precision}, "
                f"{self.devices} device(s){' fsdp2' if self.strategy == 'fsdp2' else ''}, "
                f"batch_size {self.batch_size} × group {self.group_size}")
        rows = [head, f"  {'item':<58} {'GiB/device':>10}"]
        rows += [f"  {k:<58} {v:>10.2f}" for k, v in self.lines]
        rows.append(f"  {'total (estimated peak)':<58} {self.total_gb:>10.2f}")
        if memory_gb is not None:
            b = self.max_batch(memory_gb)
            what = "micro-batch-equivalent batch_size" if self.micro_batched else "batch_size"
            rows.append(f"  largest {what} that fits {memory_gb:g} GiB: {b if b < 10**6 else 'unbounded'}"
                        + ("" if b else " (the weights and optimiser state alone do not fit)"))
        return "\n".join(rows)


# ---------------------------------------------------------------------------------------------------- counting
def lora_params(transformer: torch.nn.Module, targets: list[str], rank: int) -> int:
    """Σ r·(in + out) over the linear layers a LoRA adapter wraps (peft's A: r×in, B: out×r)."""
    n = 0
    for name, mod in transformer.named_modules():
        if isinstance(mod, torch.nn.Linear) and any(name == t or name.endswith("." + t) for t in targets):
            n += rank * (mod.in_features + mod.out_features)
    return n


def role_lines(role: str, params: int, what: str, trainable: bool, wbytes: int, shard: int
               ) -> list[tuple[str, float]]:
    """The plan lines of one role holding ``params`` parameters (its LoRA adapter or full copy, ``what``): the
    weights, and for a trainable role one gradient + AdamW's two moments, all in the role's dtype (``wbytes``),
    sharded over ``shard`` devices. A snapshot role (``trainable`` false) holds its weights only."""
    gib = params * wbytes / GiB / shard
    if not trainable:
        return [(f"role {role}: {what} weights (snapshot)", gib)]
    return [(f"role {role}: {what} weights", gib), (f"role {role}: gradients", gib),
            (f"role {role}: AdamW moments (2)", 2 * gib)]


def _replay(run: Any, params: set[int], blocks: list[torch.nn.Module], n: int) -> tuple[int, int, int]:
    """Run ``run()`` (a meta-device forward of batch ``n``) under ``saved_tensors_hooks`` and return (bytes of the
    distinct tensors autograd keeps for backward, parameters excluded; the largest per-block saving; the largest
    batch-sized intermediate), attention as the flash SDPA kernel (saves q, k, v, out, logsumexp), as on the GPU."""
    seen: dict[int, int] = {}
    largest = [0]
    per_block: list[int] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        st = t.untyped_storage()
        if st._cdata not in params:
            seen[st._cdata] = max(seen.get(st._cdata, 0), st.nbytes())
        return t

    def pre(mod: Any, args: Any) -> None:
        per_block.append(sum(seen.values()))

    class Peak(torch.utils._python_dispatch.TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
            out = func(*args, **(kwargs or {}))
            for o in out if isinstance(out, (tuple, list)) else (out,):
                if isinstance(o, torch.Tensor) and o.dim() and o.shape[0] == n:
                    largest[0] = max(largest[0], o.numel() * o.element_size())
            return out

    sdpa = torch.nn.functional.scaled_dot_product_attention

    def flash(*args: Any, **kwargs: Any) -> torch.Tensor:  # SDPA's signature, positional or by keyword
        a = dict(zip(("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale"), args), **kwargs)
        q, k, v = a.pop("query"), a.pop("key"), a.pop("value")
        if a.get("attn_mask") is not None or a.get("enable_gqa"):
            return sdpa(q, k, v, **a)
        return torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, a.get("dropout_p", 0.0),
                                                                  a.get("is_causal", False), scale=a.get("scale"))[0]

    import torch.fx.experimental._config as fx_config

    hooks = [b.register_forward_pre_hook(pre) for b in blocks]
    try:
        torch.nn.functional.scaled_dot_product_attention = flash
        # every prompt row has its full length: a mask's nonzero() is all of it (Z-Image's caption selection)
        with fx_config.patch(meta_nonzero_assume_all_nonzero=True), \
                torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), Peak():
            run()
    finally:
        torch.nn.functional.scaled_dot_product_attention = sdpa
        for h in hooks:
            h.remove()
    total = sum(seen.values())
    marks = [*per_block, total]
    block = max((b - a for a, b in zip(marks, marks[1:])), default=total)
    return total, block, largest[0]


def _meta_cond(backbone: Any, n: int) -> Any:
    """The prompt conditioning of ``n`` samples on the meta device (a padding mask, when the family has one, is a
    real all-true tensor: the code that reads it stays data-independent)."""
    cond = backbone.encode_prompts(["plan"] * n)
    if "mask" in cond:
        cond = {**cond, "mask": torch.ones(cond["mask"].shape, dtype=torch.bool)}
    return cond


def saved_bytes_per_sample(backbone: Any, dtype: torch.dtype, mode: str) -> tuple[int, int, int]:
    """(bytes autograd saves, largest per-block saving, largest batch-sized intermediate) per sample of one
    ``_predict`` pass of the meta-device ``backbone`` (its base transformer; two samples, halved). ``mode``:
    ``"full"`` the weights are trained (a full-copy role); ``"lora"`` the transformer carries a LoRA adapter
    ``bench`` that is trained (the base frozen); ``"input"`` the weights are frozen and the input is differentiated
    (a frozen role's grad pass)."""
    t = backbone.transformer
    n = 2
    has_lora = any(".lora_" in name for name, _ in t.named_parameters())
    for name, p in t.named_parameters():
        p.requires_grad_(mode == "full" or (mode == "lora" and ".lora_" in name))
    if has_lora:
        t.enable_adapters() if mode == "lora" else t.disable_adapters()
    x = torch.zeros((n, *backbone.sample_shape), device="meta", dtype=dtype, requires_grad=mode == "input")
    sigma = torch.full((n,), 0.5, device="meta")
    cond = _meta_cond(backbone, n)
    from fewstep_rl.perf.arch import transformer_blocks

    params = {p.untyped_storage()._cdata for p in t.parameters()}
    out = _replay(lambda: backbone._predict(x, sigma, cond, None), params, transformer_blocks(t), n)
    return out[0] // n, out[1] // n, out[2] // n


#: Role key of a VAE decode in the recorded passes.
VAE = "<vae decode>"


def vae_saved_bytes_per_sample(backbone: Any, dtype: torch.dtype) -> tuple[int, int]:
    """(bytes autograd saves, largest batch-sized intermediate) per sample of the meta-device ``backbone``'s
    ``decode`` whose input is differentiated (reward back-prop through the decoder); attention as flash SDPA."""
    n = 2
    backbone.vae.requires_grad_(False)
    z = torch.zeros((n, *backbone.sample_shape), device="meta", dtype=dtype, requires_grad=True)
    params = {p.untyped_storage()._cdata for p in backbone.vae.parameters()}
    total, _, largest = _replay(lambda: backbone.decode(z), params, [], n)
    return total // n, largest // n


def count_passes(method: str, overrides: dict, iterations: int = 6, world: str = "sd3"
                 ) -> tuple[list[list[tuple]], Counter, int, int]:
    """Run ``method`` on the ``world``'s tiny architecture (CPU) and return (backward groups of grad-pass shapes, no-grad
    pass shapes, batch_size, group_size). A backward group = the grad passes alive at one ``backward`` call."""
    import tempfile
    import warnings
    from pathlib import Path

    import lightning as L

    from fewstep_rl.perf.arch import TINY, build_backbone, get_arch
    from fewstep_rl.run import assemble, resolve

    scratch = Path(tempfile.mkdtemp(prefix="plan-"))
    prompts = [f"prompt {i}" for i in range(8)]
    (scratch / "p.txt").write_text("\n".join(prompts))
    over = {"world.path": str(scratch), "world.prompts": str(scratch / "p.txt"), "world.resolution": 64,
            "world.dtype": "float32", "rewards": [{"name": "fewstep_rl.perf.bench_reward:MeanPixelReward"}],
            "trainer.accelerator": "cpu", "trainer.precision": "32-true", "trainer.max_steps": iterations,
            "trainer.run_dir": str(scratch / "run"), "trainer.progress_bar": False, "trainer.log_every": 10**6,
            **overrides}
    resolved = resolve(method, world, (), over)
    groups: list[list[tuple]] = []
    live: list[tuple] = []
    nograd: Counter = Counter()
    arch = get_arch(TINY[world])

    class Rec(L.Callback):
        def on_train_start(self, trainer: Any, pl_module: Any) -> None:
            bb = pl_module.backbone
            orig = bb._predict

            def rec(x, sigma, cond, role):  # noqa: ANN001
                trainable = role is not None and bb.trainable.get(role, False)
                if torch.is_grad_enabled():
                    live.append((role, tuple(x.shape), trainable))
                else:
                    nograd[(role, tuple(x.shape))] += 1
                return orig(x, sigma, cond, role)

            bb._predict = rec
            decode = bb.decode

            def dec(x):  # noqa: ANN001 - VAE decodes (reward back-prop keeps the decoder's activations)
                if torch.is_grad_enabled() and x.requires_grad:
                    live.append((VAE, tuple(x.shape), False))
                else:
                    nograd[(VAE, tuple(x.shape))] += 1
                return decode(x)

            bb.decode = dec

    module, dm, trainer = assemble(resolved, scratch / "run", [Rec()], run_callback=False)
    module.world.backbone_factory = lambda: build_backbone(
        arch, prompts, device="cpu", dtype=torch.float32, resolution=64, roles=resolved.roles)
    orig_backward = torch.Tensor.backward

    def backward(self: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        if live:
            groups.append(list(live))
            live.clear()
        return orig_backward(self, *args, **kwargs)

    torch.Tensor.backward = backward  # type: ignore[method-assign]
    quiet = [logging.getLogger(n) for n in ("lightning.pytorch", "lightning.fabric", "lightning",
                                                "lightning.pytorch.utilities.rank_zero")]
    levels = [lg.level for lg in quiet]
    try:
        for lg in quiet:
            lg.setLevel(logging.ERROR)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            trainer.fit(module, datamodule=dm)
    finally:
        torch.Tensor.backward = orig_backward  # type: ignore[method-assign]
        for lg, lv in zip(quiet, levels, strict=True):
            lg.setLevel(lv)
    if live:
        groups.append(list(live))
    b, k = module.batch_spec()
    return groups, nograd, b, k


def make_plan(method: str, arch: str = "sd3.5-medium", roles: str = "lora", precision: str = "bf16",
              devices: int = 1, strategy: str = "auto", resolution: int = 512, overrides: dict | None = None,
              precomputed_text: bool = False, prompt_cache: int = 256, world: str | None = None) -> PlanResult:
    """The memory plan (see the module docstring). ``overrides``: extra ``method.*`` config keys (dotted);
    ``world``: the architecture's world (default: the one ``arch`` belongs to; another one is an error)."""
    from fewstep_rl.perf.arch import (
        build_backbone,
        default_lora_targets,
        get_arch,
        text_encoder_params,
        transformer_blocks,
    )
    from fewstep_rl.roles import RolesConfig
    from fewstep_rl.roles.lora import resolve_targets
    from fewstep_rl.run import resolve

    if precision not in _BYTES:
        raise ValueError(f"precision must be one of {', '.join(_BYTES)}, got {precision!r}")
    if roles not in ("lora", "full"):
        raise ValueError(f"roles must be 'lora' or 'full', got {roles!r}")
    if devices < 1:
        raise ValueError(f"devices must be >= 1, got {devices}")
    a = get_arch(arch, world)
    world = a.world
    wbytes = _BYTES[precision]
    dtype = {2: torch.bfloat16, 4: torch.float32}[wbytes]
    over = {"roles.mode": roles, **(overrides or {})}
    scratch_over = {"world.path": ".", "world.prompts": __file__}
    resolved = resolve(method, world, (), {**scratch_over, **over})
    rc, mcls = resolved.roles, resolved.method_cls
    key = (arch, precision, roles, rc.lora_rank, rc.lora_alpha, tuple(rc.targets or ()), resolution)
    if key not in _META:  # the meta-device backbone and its replays, shared by plans of the same configuration
        bb = build_backbone(a, ["plan"], device="meta", dtype=dtype, resolution=resolution,
                            roles=RolesConfig(mode="full")).to("meta")  # no copies: role None runs the base
        t = bb.transformer
        targets = resolve_targets(t, rc.targets, default_lora_targets(world, t), world)
        _META[key] = (bb, sum(p.numel() for p in t.parameters()), sum(p.numel() for p in bb.vae.parameters())
                      if bb.vae is not None else 0, {}, [False], targets)
    bb, base, vae_n, cache, adapted, targets = _META[key]
    t = bb.transformer
    role_n = lora_params(t, targets, rc.lora_rank) if roles == "lora" else base
    shard = devices if strategy == "fsdp2" else 1
    lines: list[tuple[str, float]] = [
        (f"base transformer ({base / 1e9:.2f} B params)", base * wbytes / GiB / shard),
        (f"VAE ({vae_n / 1e6:.0f} M params)", vae_n * wbytes / GiB / shard),
    ]
    text_n = 0 if precomputed_text else text_encoder_params(a)
    if text_n:
        lines.append((f"text encoders ({a.text_label}, {text_n / 1e9:.2f} B params)", text_n * wbytes / GiB / shard))
    lines.append((f"prompt-embedding cache ({prompt_cache} prompts)",
                  prompt_cache * (a.text_tokens * a.text_dim + a.pooled_dim) * wbytes / GiB))
    what = "LoRA adapter" if roles == "lora" else "full copy"
    for r in mcls.trainable_roles:
        lines += role_lines(r, role_n, what, True, wbytes, shard)
    for r in mcls.snapshot_roles:
        lines += role_lines(r, role_n, what, False, wbytes, shard)
    if shard > 1:
        blk = max(sum(p.numel() for p in b.parameters()) for b in transformer_blocks(t))
        lines.append(("one gathered transformer block (fsdp2)", blk * wbytes / GiB))
    # activations from the counted grad passes
    method_over = {k: v for k, v in over.items() if k.startswith("method.")}
    groups, nograd, b, k = count_passes(method, {"roles.mode": roles, **method_over}, world=world)

    if roles == "lora" and not adapted[0]:
        from fewstep_rl.roles.lora import add_lora_adapter

        add_lora_adapter(t, "bench", rc.lora_rank, rc.lora_alpha, targets)
        adapted[0] = True

    def per_sample(trainable: bool) -> tuple[int, int, int]:
        mode = roles if trainable else "input"
        if mode not in cache:
            cache[mode] = saved_bytes_per_sample(bb, dtype, mode)
        return cache[mode]

    def vae_sample() -> tuple[int, int]:
        if "vae" not in cache:
            cache["vae"] = vae_saved_bytes_per_sample(bb, dtype) + (0,)
        return cache["vae"][:2]

    has_vae = bb.vae is not None

    def saved(role: str, shape: tuple, tr: bool) -> int:
        if role == VAE:
            return shape[0] * vae_sample()[0] if has_vae else 0
        return shape[0] * per_sample(tr)[0]

    act = 0
    biggest_group: list = []
    for g in groups:
        s = sum(saved(*p) for p in g)
        if s > act:
            act, biggest_group = s, g
    block = max((shape[0] * per_sample(tr)[1] for g in groups for r, shape, tr in g if r != VAE), default=0)
    nograd_b = max((shape[0] for (r, shape) in nograd if r != VAE), default=0)
    dec_b = max((shape[0] for (r, shape) in nograd if r == VAE), default=0)
    transient = max(nograd_b * per_sample(False)[2], 2 * block,
                    3 * dec_b * vae_sample()[1] if has_vae and dec_b else 0)
    lines.append((f"activations: largest backward group ({len(biggest_group)} grad passes)", act / GiB))
    lines.append(("transient: backward / largest no-grad pass or decode working set", transient / GiB))
    static = sum(v for _, v in lines[:-2])
    micro = hasattr(resolved.method, "micro_batches") or hasattr(resolved.method, "opt_steps_per_epoch")
    passes = {"backward_groups": len(groups),
              "largest_group": [f"{r}|{'x'.join(map(str, s))}" for r, s, _ in biggest_group],
              "nograd_decode_max_batch": dec_b,
              "nograd_max_batch": nograd_b,
              "saved_gb_per_sample": {m: v[0] / GiB for m, v in cache.items()}}
    return PlanResult(method, arch, roles, precision, devices, strategy, lines, b, k, act / GiB + transient / GiB,
                      static, passes, micro)


def parse_args(argv: list[str]) -> Any:
    """``fewstep-rl plan`` flags; a bad flag raises :class:`~fewstep_rl.config.ConfigError` (one line, exit 2)."""
    import argparse

    from fewstep_rl.config import ConfigError

    class Parser(argparse.ArgumentParser):
        def error(self, message: str) -> Any:  # one clear line instead of usage + traceback
            raise ConfigError(f"plan: {message}")

    ap = Parser(prog="fewstep-rl plan", description="accelerator memory per role and the largest batch that fits")
    ap.add_argument("--method", required=True)
    ap.add_argument("--world", default="sd3")
    ap.add_argument("--arch", default=None, help="architecture of --world (default: its real one, e.g. sd3.5-medium)")
    ap.add_argument("--roles", default="lora", choices=["lora", "full"])
    ap.add_argument("--precision", default="bf16", choices=sorted(_BYTES))
    ap.add_argument("--devices", type=int, default=1)
    ap.add_argument("--strategy", default="auto", choices=["auto", "ddp", "fsdp2"])
    ap.add_argument("--memory", type=float, default=None, help="GiB per device: report the largest batch that fits")
    ap.add_argument("--resolution", type=int, default=512)
    ap.add_argument("--precomputed-text", action="store_true", help="no text encoders (as benchmarks/scale.py)")
    ap.add_argument("--prompt-cache", type=int, default=256, help="prompt encodings kept (the backbone's LRU)")
    ap.add_argument("--set", action="append", default=[], help="method.KEY=VALUE (YAML value), repeatable")
    return ap.parse_args(argv)


def cmd_plan(argv: list[str]) -> int:
    """CLI entry (``fewstep-rl plan``)."""
    import yaml

    from fewstep_rl.config import ConfigError
    from fewstep_rl.perf.arch import ARCHS, DEFAULT

    a = parse_args(argv)

    if a.world not in DEFAULT:
        raise ConfigError(f"plan: --world must be one with real-size architectures ({', '.join(DEFAULT)}), "
                          f"got {a.world!r}")
    arch = a.arch or DEFAULT[a.world]
    if arch not in ARCHS:
        raise ConfigError(f"plan: unknown --arch {arch!r}; known: {', '.join(ARCHS)}")
    if ARCHS[arch].world != a.world:
        raise ConfigError(f"plan: --arch {arch} belongs to --world {ARCHS[arch].world}, not {a.world}")
    if a.strategy == "fsdp2" and a.devices < 2:
        raise ConfigError("plan: --strategy fsdp2 needs --devices >= 2")
    over = {k: yaml.safe_load(v) for k, _, v in (o.partition("=") for o in a.set)}
    bad = [k for k in over if not k.startswith("method.")]
    if bad:
        raise ConfigError(f"plan: --set takes method.KEY=VALUE, got {bad}")
    try:
        res = make_plan(a.method, arch, a.roles, a.precision, a.devices, a.strategy, a.resolution, over,
                        a.precomputed_text, a.prompt_cache, a.world)
    except ValueError as e:
        raise ConfigError(f"plan: {e}") from None
    print(res.format(a.memory))
    return 0
