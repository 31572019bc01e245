"""``fewstep-rl export --ckpt C --out DIR [--merge] [--role ema|generator]``: a trained generator as diffusers files.

Two forms (issue 16, item 4), for the ``sd3`` (``StableDiffusion3Pipeline``) and ``flux`` (FLUX.1,
``FluxPipeline``) worlds; what differs between them is one :class:`Family` row of :data:`FAMILIES`:

* **LoRA** (default): ``DIR/pytorch_lora_weights.safetensors``, written by diffusers' own
  ``<Pipeline>.save_lora_weights``, so ``pipe.load_lora_weights(DIR)`` on the world's base pipeline reads it. The file holds the role's *whole* difference from the world's base: its adapter, plus the frozen fold
  adapters under it and the merge records folded into the base during training, stacked along the rank axis
  (``ΔW = Σ_k up_k·down_k`` exactly; rank = sum of the parts' ranks). peft's scale ``alpha/r`` is baked into
  ``lora_B`` and the file says ``lora_alpha = r`` (scale 1), so no alpha convention can differ. Both forms are
  relative to ``world.path`` as it is at export time: it must still hold the base training started from.
* **Merged** (``--merge``): a complete pipeline directory that ``DiffusionPipeline.from_pretrained(DIR)`` loads:
  the world's components copied byte for byte, with ``transformer/`` = base + ΔW (computed in float64, written in
  the world's ``dtype``), or the role's own transformer when roles are full copies (``roles.mode: full``;
  then this is the only form: a full copy has no LoRA).

Both write ``DIR/scheduler/`` (a ``FlowMatchEulerDiscreteScheduler`` with ``shift = 1`` and, for FLUX, dynamic
shifting off, so the ``sigmas=`` passed to the pipeline are used as given, and ``stochastic_sampling`` for a
``cps(1)`` chain), ``DIR/fewstep.json`` (steps, sigmas, timesteps = 1000·σ, the pipeline's ``guidance_scale``, the
chain, the role) and ``DIR/README.md`` with a plain-diffusers snippet. ``guidance_scale`` is 1 for sd3 (no CFG,
``fewstep-rl sample``'s default) and ``world.guidance`` for flux: FLUX.1-dev's distilled guidance *embedding*, which
fewstep-rl feeds to every pass (``FluxPipeline``'s ``true_cfg_scale`` stays 1: no CFG).
With the world's dtype, on CPU and after ``torch.manual_seed(S)`` the snippet draws the noise ``fewstep-rl sample
--seed S`` draws: the initial latents (``FluxPipeline`` draws ``(B, C, h, w)`` and packs them, as our sampler draws
``(C, h, w)`` per sample and packs inside the transformer call: the same numbers), then one re-noising draw per step,
from one generator in the same order. The exception (``"same_noise": false``): ``FluxPipeline``'s
``stochastic_sampling`` draws its re-noising noise in the packed token layout, ours is unpacked, so a flux
``cps(1)`` export runs the same chain with differently arranged (equally distributed) noise.

The sampler chain maps onto diffusers' ``FlowMatchEulerDiscreteScheduler`` exactly for ``euler``/``cps(0)``
(deterministic) and ``cps(1)`` (``stochastic_sampling``: predict x̂0, re-noise with fresh noise). Other chains
(``cps(η)`` with 0 < η < 1, ``flow_sde``, ``dance_sde``) have no diffusers scheduler: the export uses the nearest
(``cps(η ≥ 0.5)`` → ``stochastic_sampling``, otherwise the deterministic Euler ODE with the same marginals), says so
in ``fewstep.json`` (``"exact": false``), README.md and on stderr.

Refused, one line, exit 2: toy2d (no diffusers model), shapes (one CLIP, no T5, no VAE:
``StableDiffusion3Pipeline`` cannot encode its prompts or decode its samples), the other worlds (``flux2``,
``zimage``, ``qwen_image``: not yet), a world directory without the components its pipeline needs (:attr:`Family.need`;
the pipeline would encode or decode differently from fewstep-rl), full-copy roles without ``--merge``, a role other
than ``generator``/``ema``, a non-empty ``DIR``.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from fewstep_rl.cli import UsageError, _parse, load_checkpoint

EXPORT_FLAGS = {"ckpt": "value", "out": "value", "merge": "bool", "role": "value", "help": "bool"}
ROLES = ("generator", "ema")
LORA_FILE = "pytorch_lora_weights.safetensors"
HELP = """usage: fewstep-rl export --ckpt C --out DIR [--merge] [--role ema|generator]

Writes the checkpoint's generator (default: the role `fewstep-rl sample` uses, the EMA when the method keeps one)
for plain diffusers: a LoRA (DIR/pytorch_lora_weights.safetensors, for pipe.load_lora_weights on the world's base)
or, with --merge, a whole pipeline directory (DiffusionPipeline.from_pretrained(DIR)); plus DIR/scheduler/,
DIR/fewstep.json (steps, sigmas, guidance) and DIR/README.md (a snippet that generates with diffusers alone).
Worlds: sd3, flux."""


@dataclass(frozen=True)
class Family:
    """What one world's export needs from diffusers (a row of :data:`FAMILIES`).

    Attributes:
        pipeline: the diffusers pipeline class (its ``save_lora_weights`` writes the LoRA, the snippet loads it).
        transformer: the diffusers transformer class (``--merge`` loads the base, adds ΔW, saves).
        need: the world directory's entries the pipeline needs to encode and decode as fewstep-rl does.
        scheduler: ``FlowMatchEulerDiscreteScheduler`` kwargs beyond ``shift = 1`` that make ``sigmas=`` exact.
        embedded_guidance: the pipeline's ``guidance_scale`` is a distilled guidance *embedding* (``world.guidance``,
            fed to every pass), not CFG; otherwise it is CFG and the export uses 1 (no CFG).
        packed_renoise: the pipeline's ``stochastic_sampling`` re-noise draws come in the packed token layout.
    """

    pipeline: str
    transformer: str
    need: tuple[str, ...]
    scheduler: dict[str, Any] = field(default_factory=dict)
    embedded_guidance: bool = False
    packed_renoise: bool = False


#: The exportable worlds.
FAMILIES: dict[str, Family] = {
    "sd3": Family("StableDiffusion3Pipeline", "SD3Transformer2DModel",
                  ("model_index.json", "text_encoder_2", "tokenizer_2", "text_encoder_3", "tokenizer_3", "vae")),
    "flux": Family("FluxPipeline", "FluxTransformer2DModel",
                   ("model_index.json", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2", "vae"),
                   scheduler={"use_dynamic_shifting": False}, embedded_guidance=True, packed_renoise=True),
}


def family_of(method: Any) -> Family:
    """The :class:`Family` of the method's world (one-line error for the others)."""
    name = getattr(method.world, "name", "?")
    if name not in FAMILIES:
        raise UsageError(f"export: world {name!r} is not supported (export supports the worlds "
                         f"{', '.join(FAMILIES)})")
    return FAMILIES[name]


def _diffusers(name: str) -> Any:
    import diffusers

    return getattr(diffusers, name)


@dataclass
class FewStep:
    """How the exported generator samples (``DIR/fewstep.json``).

    Attributes:
        num_inference_steps: K.
        sigmas: the K levels the pipeline gets as ``sigmas=`` (the σ grid without its final 0).
        timesteps: ``1000·σ``, what the transformer sees.
        guidance_scale: the pipeline's ``guidance_scale``: 1 where it is CFG (few-step generators sample without CFG;
            ``fewstep-rl sample``'s default), ``world.guidance`` where it is a guidance embedding (FLUX.1).
        transition: the chain fewstep-rl samples with (``euler``, ``cps(1)`` …).
        stochastic_sampling: the scheduler flag that reproduces it (re-noise with fresh noise at each step).
        exact: whether the diffusers scheduler runs the same chain.
        same_noise: whether, after ``torch.manual_seed(S)``, the pipeline draws the noise ``fewstep-rl sample --seed
            S`` draws (false for FLUX's packed ``stochastic_sampling`` re-noising).
        pipeline: the diffusers pipeline class.
        height, width: image side in pixels (``world.resolution``).
        max_sequence_length: T5 tokens per prompt (``world.max_sequence_length``).
        dtype: the dtype fewstep-rl ran the world in (``world.dtype``).
    """

    num_inference_steps: int
    sigmas: list[float]
    timesteps: list[float]
    guidance_scale: float
    transition: str
    stochastic_sampling: bool
    exact: bool
    same_noise: bool
    pipeline: str
    height: int
    width: int
    max_sequence_length: int
    dtype: str


def scheduler_flags(transition: Any) -> tuple[bool, bool]:
    """``(stochastic_sampling, exact)`` of diffusers' ``FlowMatchEulerDiscreteScheduler`` for a fewstep-rl chain.

    ``cps(η)`` has mean ``(1-σ')x̂0 + σ' cos(ηπ/2) ε̂`` and std ``σ' sin(ηπ/2)`` (methods.md §1.2): η = 1 is the
    scheduler's ``stochastic_sampling`` step ``(1-σ')x̂0 + σ'·z``, η = 0 is the Euler step.
    """
    kind, eta = transition.kind, float(transition.eta)
    if kind == "euler" or (kind == "cps" and eta == 0.0):
        return False, True
    if kind == "cps":
        return eta >= 0.5, eta == 1.0
    return False, False


def few_step(method: Any, fam: Family) -> FewStep:
    """The sampling recipe ``fewstep-rl sample`` uses for this method and world (its defaults: no ``--steps``)."""
    sig = method.sampling_sigmas().float()
    if float(sig[-1]) != 0.0 or not bool((sig[1:] < sig[:-1]).all()):
        raise UsageError(f"export: the method's σ grid {sig.tolist()} is not decreasing to 0")
    tr = method.sampling_transition()
    stochastic, exact = scheduler_flags(tr)
    levels = [_short(x) for x in sig[:-1].tolist()]
    cfg = method.world.cfg
    return FewStep(
        num_inference_steps=len(levels), sigmas=levels, timesteps=[_short(1000 * x) for x in sig[:-1].tolist()],
        guidance_scale=float(cfg.guidance) if fam.embedded_guidance else 1.0, transition=str(tr),
        stochastic_sampling=stochastic, exact=exact, same_noise=not (stochastic and fam.packed_renoise),
        pipeline=fam.pipeline,
        height=int(cfg.resolution), width=int(cfg.resolution), max_sequence_length=int(cfg.max_sequence_length),
        dtype=str(cfg.dtype),
    )


def _short(x: float) -> float:
    """The shortest decimal that is the same float32 (``0.8999999761581421`` → ``0.9``): readable and exact."""
    import numpy as np

    return float(str(np.float32(x)))


# ------------------------------------------------------------------------------------------- role storage access
def role_weights(backbone: Any, role: str) -> dict[str, tuple[Tensor, Tensor]] | nn.Module:
    """The role as LoRA factors relative to the world's base, or (full-copy roles) its own transformer.

    Reads the backbone's role store (:mod:`fewstep_rl.roles`) only: ``FullCopyStore.activate(role)`` is the role's
    network; ``LoraStore.lora_delta(role, since_load=True)`` its whole difference from the base on disk (merges, then
    folds, then the role's adapter, stacked along the rank, the peft scale inside ``up``).

    Returns:
        ``{layer path: (up (out, R), down (R, in))}`` with ``ΔW = up @ down``, in float32; or the role's transformer.
    """
    store = backbone.store
    if store.kind == "full":
        return store.activate(role)
    parts = store.lora_delta(role, since_load=True)
    if not parts:
        raise UsageError(f"export: role {role!r} has no LoRA weights in this checkpoint")
    return parts


def lora_state_dict(factors: dict[str, tuple[Tensor, Tensor]]) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """peft-format LoRA weights (``<layer>.lora_A.weight`` = down, ``lora_B`` = up) and the ``LoraConfig`` kwargs.

    The scale is already inside ``up``, so ``lora_alpha = r`` (scale 1).
    """
    ranks = {d.shape[0] for _, d in factors.values()}
    if len(ranks) != 1:
        raise UsageError(f"export: layers have different LoRA ranks {sorted(ranks)}; a LoRA file needs one rank")
    rank = ranks.pop()
    sd: dict[str, Tensor] = {}
    for path, (up, down) in sorted(factors.items()):
        sd[f"{path}.lora_A.weight"] = down.contiguous()
        sd[f"{path}.lora_B.weight"] = up.contiguous()
    return sd, {"r": rank, "lora_alpha": rank, "target_modules": sorted(factors)}


# ------------------------------------------------------------------------------------------- checks
def check_world(method: Any) -> tuple[Path, Family]:
    """The world's diffusers directory and family, when its pipeline can run this world as fewstep-rl does."""
    name = getattr(method.world, "name", "?")
    if name == "toy2d":
        raise UsageError("export: the toy2d world is an analytic 2-D model with no diffusers counterpart; nothing to "
                         f"export (export supports the worlds {', '.join(FAMILIES)})")
    if name == "shapes":
        raise UsageError("export: the shapes world is a 16-pixel SD3 transformer with one CLIP text encoder, no T5 and "
                         "no VAE; StableDiffusion3Pipeline cannot encode its prompts or decode its samples, so plain "
                         f"diffusers cannot reproduce it (export supports the worlds {', '.join(FAMILIES)})")
    fam = family_of(method)
    root = Path(method.world.dir)
    missing = [n for n in fam.need if not (root / n).exists()]
    if missing:
        raise UsageError(f"export: the world directory {root} lacks {', '.join(missing)}; {fam.pipeline} needs "
                         f"{', '.join(fam.need)} to encode and decode as fewstep-rl does")
    return root, fam


def _role(method: Any, role: str | None) -> str:
    role = role or method.sampling_role()
    if role not in ROLES:
        raise UsageError(f"export: --role must be one of {', '.join(ROLES)}, got {role!r}")
    if role not in method.backbone.roles:
        raise UsageError(f"export: this {method.name} checkpoint has no {role!r} role (roles: "
                         f"{', '.join(r for r in method.backbone.roles if r in ROLES)})")
    return role


def _fresh_dir(out: Path) -> Path:
    """A scratch directory beside ``out``, renamed onto it when everything is written (no half exports)."""
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


# ------------------------------------------------------------------------------------------- writing
def write_scheduler(out: Path, fs: FewStep, fam: Family) -> None:
    """``out/scheduler``: Euler (or ``stochastic_sampling``) with ``shift = 1`` (and the family's kwargs, FLUX:
    dynamic shifting off) so ``sigmas=`` is used as given."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0, stochastic_sampling=fs.stochastic_sampling,
                                    **fam.scheduler).save_pretrained(out / "scheduler")


def write_lora(out: Path, factors: dict[str, tuple[Tensor, Tensor]], fam: Family) -> dict[str, Any]:
    """``out/pytorch_lora_weights.safetensors`` through the pipeline's ``save_lora_weights``; returns its LoraConfig."""
    sd, meta = lora_state_dict(factors)
    _diffusers(fam.pipeline).save_lora_weights(out, transformer_lora_layers=sd, weight_name=LORA_FILE,
                                               transformer_lora_adapter_metadata=meta)
    return meta


@torch.no_grad()
def write_merged(out: Path, world_dir: Path, weights: dict[str, tuple[Tensor, Tensor]] | nn.Module,
                 dtype: torch.dtype, fam: Family) -> None:
    """A pipeline directory: the world's components copied, ``transformer/`` = the role, scheduler set by the caller."""
    for entry in sorted(world_dir.iterdir()):
        if entry.name in ("transformer", "scheduler", "model_index.json"):
            continue
        if entry.is_dir():
            shutil.copytree(entry, out / entry.name)
        else:
            shutil.copy2(entry, out / entry.name)
    index = json.loads((world_dir / "model_index.json").read_text())
    index["scheduler"] = ["diffusers", "FlowMatchEulerDiscreteScheduler"]
    (out / "model_index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    if isinstance(weights, nn.Module):
        weights.save_pretrained(out / "transformer")
        return
    model = _diffusers(fam.transformer).from_pretrained(world_dir / "transformer", local_files_only=True)
    for path, (up, down) in weights.items():
        w = model.get_submodule(path).weight
        w.copy_((w.double() + up.double() @ down.double()).to(w.dtype))
    model.to(dtype).save_pretrained(out / "transformer")


def readme(fs: FewStep, meta: dict[str, Any], out: Path, world_dir: Path | None) -> str:
    """``DIR/README.md``: what was exported and a snippet that generates with plain diffusers."""
    dt = "" if fs.dtype == "float32" else f", torch_dtype=torch.{fs.dtype}"
    pipe_cls = fs.pipeline
    if world_dir is None:
        load = [f'pipe = DiffusionPipeline.from_pretrained("{out}"{dt})']
        imports = "from diffusers import DiffusionPipeline"
        what = f"a merged {pipe_cls} directory"
    else:
        load = [f'pipe = {pipe_cls}.from_pretrained("{world_dir}"{dt})',
                f'pipe.load_lora_weights("{out}")',
                f'pipe.scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained("{out}", subfolder="scheduler")']
        imports = f"from diffusers import FlowMatchEulerDiscreteScheduler, {pipe_cls}"
        what = f"a LoRA (rank {meta['lora']['r']}, scale 1) for the base pipeline in {world_dir}"
    chain = (f"fewstep-rl samples with the `{fs.transition}` chain, which diffusers' FlowMatchEulerDiscreteScheduler "
             "reproduces exactly" if fs.exact else
             f"fewstep-rl samples with the `{fs.transition}` chain, which no diffusers scheduler implements: this "
             f"scheduler uses the nearest ({'stochastic_sampling' if fs.stochastic_sampling else 'Euler'}), so "
             "samples differ from `fewstep-rl sample`")
    if pipe_cls == "FluxPipeline":
        guidance = (f"with FLUX.1's distilled guidance embedding {fs.guidance_scale} (`guidance_scale`, an input of "
                    "every pass, as in training) and no CFG (`true_cfg_scale` 1)")
    else:
        guidance = "without CFG (guidance 1)"
    seed = ("torch.manual_seed(0)  # on CPU: the noise of `fewstep-rl sample --seed 0`" if fs.same_noise else
            "torch.manual_seed(0)  # same initial latents as `fewstep-rl sample --seed 0`; re-noising differs (below)")
    noise = ("" if fs.same_noise else
             " The pipeline's stochastic_sampling draws its re-noising noise in the packed token layout (fewstep-rl "
             "draws it unpacked), so the same seed gives the same chain with differently arranged noise: samples are "
             "equally distributed, not identical to `fewstep-rl sample`'s.")
    lines = [
        f"# Few-step generator exported by fewstep-rl ({meta['method']}, role `{meta['role']}`)", "",
        f"From `{meta['checkpoint']}` ({meta['generator_updates']} generator updates): {what}. It samples in "
        f"{fs.num_inference_steps} steps at sigmas {fs.sigmas} (timesteps {fs.timesteps}) {guidance}; {chain}. "
        "`scheduler/` has shift 1" + (" and dynamic shifting off" if pipe_cls == "FluxPipeline" else "")
        + " (the sigmas are used as given)" + (" and stochastic_sampling" if fs.stochastic_sampling else "")
        + f"; `fewstep.json` holds these values.{noise}", "",
        "```python", "import torch", imports, "", *load, seed,
        f'image = pipe("a prompt", num_inference_steps={fs.num_inference_steps}, sigmas={fs.sigmas}, '
        f"guidance_scale={fs.guidance_scale},", f"             height={fs.height}, width={fs.width}, "
        f"max_sequence_length={fs.max_sequence_length}).images[0]", "```", "",
    ]
    return "\n".join(lines)


def export(ckpt: str, out: str | Path, merge: bool = False, role: str | None = None) -> dict[str, Any]:
    """Export ``role`` of checkpoint ``ckpt`` to ``out`` (see the module docstring); returns ``fewstep.json``."""
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UsageError(f"export: --out {out} exists and is not an empty directory")
    method = load_checkpoint(ckpt)
    world_dir, fam = check_world(method)
    role = _role(method, role)
    weights = role_weights(method.backbone, role)
    if isinstance(weights, nn.Module) and not merge:
        raise UsageError("export: the roles are full copies (roles.mode: full), so there is no LoRA to write; "
                         "add --merge to export the role's whole transformer as a pipeline directory")
    fs = few_step(method, fam)
    meta: dict[str, Any] = {"format": "merged" if merge else "lora", "method": method.name, "role": role,
                            "checkpoint": str(Path(ckpt).resolve()),
                            "generator_updates": int(method.updates.get("generator", 0)),
                            "base": None if merge else str(world_dir.resolve()), **asdict(fs)}
    tmp = _fresh_dir(out)
    try:
        if merge:
            write_merged(tmp, world_dir, weights, getattr(torch, fs.dtype), fam)
        else:
            cfg = write_lora(tmp, weights, fam)  # type: ignore[arg-type]
            meta["lora"] = {"r": cfg["r"], "lora_alpha": cfg["lora_alpha"], "weight_name": LORA_FILE}
        write_scheduler(tmp, fs, fam)
        final = out.resolve()
        (tmp / "fewstep.json").write_text(json.dumps(meta, indent=2) + "\n")
        (tmp / "README.md").write_text(readme(fs, meta, final, None if merge else world_dir.resolve()))
        if out.exists():
            out.rmdir()
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if not fs.exact:
        print(f"note: the {fs.transition} chain has no diffusers scheduler; {out}/scheduler uses the nearest "
              f"({'stochastic_sampling' if fs.stochastic_sampling else 'Euler'})", file=sys.stderr)
    if not fs.same_noise:
        print(f"note: {fs.pipeline}'s stochastic_sampling draws its re-noising noise in the packed token layout, so "
              f"{out} samples the same chain as `fewstep-rl sample` with differently arranged noise", file=sys.stderr)
    return meta


def cmd_export(argv: list[str]) -> int:
    opts, over = _parse(argv, EXPORT_FLAGS)
    if opts.get("help"):
        print(HELP)
        return 0
    if over:
        raise UsageError(f"export takes no overrides, got {sorted(over)}")
    if not opts.get("ckpt") or not opts.get("out"):
        raise UsageError("export needs --ckpt FILE and --out DIR")
    if opts.get("role") is not None and opts["role"] not in ROLES:
        raise UsageError(f"export: --role must be one of {', '.join(ROLES)}, got {opts['role']!r}")
    meta = export(opts["ckpt"], opts["out"], merge=bool(opts.get("merge")), role=opts.get("role"))
    from fewstep_rl.guards import dumps

    print(dumps({"out": str(opts["out"]), "format": meta["format"], "role": meta["role"],
                 "num_inference_steps": meta["num_inference_steps"], "sigmas": meta["sigmas"]}))
    return 0


__all__ = ["FAMILIES", "Family", "FewStep", "cmd_export", "export", "few_step", "lora_state_dict", "role_weights", "scheduler_flags"]
