"""The ``sd3`` backbone: a diffusers ``SD3Transformer2DModel`` (SD3 / SD3.5 MMDiT) with its text encoders.

World directory (diffusers format, always local; ``local_files_only=True`` everywhere)::

    transformer/                     SD3Transformer2DModel                 required
    text_encoder/  + tokenizer/      CLIPTextModelWithProjection + tok.    required
    text_encoder_2/ + tokenizer_2/   second CLIP                           optional
    text_encoder_3/ + tokenizer_3/   T5EncoderModel                        optional
    vae/                             AutoencoderKL                         optional (absent: pixel space)
    scheduler/scheduler_config.json  only ``shift`` is read (``default_shift``)

Every problem with that directory (missing folder or file, a config that does not fit its weights, components
that do not fit together) raises one :class:`BackboneLoadError` naming the file or folder and the reason.

Prediction. ``v = transformer(x, t = 1000·σ, seq, pooled)``: SD3 is trained with rectified flow in exactly the
convention of methods.md §1.1, so no conversion is needed. Prompt encoding follows
``StableDiffusion3Pipeline.encode_prompt`` via :mod:`fewstep_rl.backbones.sd3_text` (see its departure for worlds
without T5); encodings are cached per prompt string (LRU), the null prompt permanently. Guidance (CFG against the
null prompt) is the base class's batched form; it equals the pipeline's (tested).

Space. With a VAE the sampler works in scaled latents ``z = (E(img) − shift)·scale``, and
``decode(z) = (D(z/scale + shift)/2 + 0.5).clamp(0, 1)`` as the pipeline's post-processing. Without a VAE the
sampler works in pixels in [-1, 1] and ``decode(x) = (x/2 + 0.5).clamp(0, 1)``. Both are differentiable.

Roles (architecture.md §3).

* ``roles_mode="lora"`` (default): one peft LoRA adapter per role on the shared frozen transformer
  (``init_lora_weights=True``: B = 0, so every role starts exactly equal to the teacher). Only the adapter of the
  role being evaluated is active (``role=None`` disables all). peft's ``set_adapter``/``enable_adapters`` reset
  ``requires_grad`` of every adapter; after each switch the flags are restored from ``self.trainable``.
  ``lora_A`` is (re-)initialised from a generator seeded by (role, reset count, layer), never the global RNG.
  :meth:`merge_role` folds ``scale·B·A`` into the base weights and records the factors in ``merged`` (persistent
  buffers, part of the checkpoint); loading a state dict replays records the backbone has not applied yet.
  :meth:`fold_role` adds a frozen peft adapter ``fold<k>__<roles>`` holding a copy of the role's ``A``/``B``; it is
  activated together with each member role's own adapter (peft sums active adapters), so those roles keep their
  function on a private base while the teacher and the other roles are untouched. Loading a state dict creates
  the fold adapters it names.
* ``roles_mode="full"``: each role is a full copy of the transformer in ``copies``; a merge copies the role into
  the base, which from then on is part of the checkpoint (``base_merges > 0``); a fold copies the role into the
  other member roles (a full copy has no adapter to freeze).

Not supported under FSDP2 sharding: :meth:`reset_role`, :meth:`merge_role`, :meth:`fold_role` and loading merge records (they write
whole tensors into possibly sharded parameters). Gradient checkpointing would recompute a forward with whatever
adapter is active at backward time, so keep it off when roles are interleaved.
"""

from __future__ import annotations

import copy
import json
import math
import warnings
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from fewstep_rl.backbones.base import Backbone, BackboneLoadError, parse_fold
from fewstep_rl.backbones.sd3_text import sd3_prompt_embeds
from fewstep_rl.sampling.noise import stable_hash

#: LoRA target modules of SD3 attention (filtered to those the transformer has).
DEFAULT_LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")

_UNSET = object()
_DIFFUSERS_WEIGHTS = ("diffusion_pytorch_model*.safetensors", "diffusion_pytorch_model*.bin")
_TRANSFORMERS_WEIGHTS = ("model*.safetensors", "pytorch_model*.bin")




class _Delta(nn.Module):
    """One merged LoRA delta of one layer: ``ΔW = up @ down`` (``up = scale·B``, ``down = A``), as buffers."""

    def __init__(self, up: Tensor, down: Tensor) -> None:
        super().__init__()
        self.register_buffer("up", up)
        self.register_buffer("down", down)


def _safe(path: str) -> str:
    """Module path → ModuleDict key (``.`` is not allowed there; SD3 module names never contain ``__``)."""
    return path.replace(".", "__")


class SD3Backbone(Backbone):
    """Frozen SD3 MMDiT + CLIP(/CLIP/T5) text encoders + optional VAE, with LoRA or full-copy roles.

    Args:
        transformer: a ``diffusers.SD3Transformer2DModel`` (frozen here).
        clips: one or two ``(tokenizer, CLIPTextModelWithProjection)`` pairs.
        t5: optional ``(tokenizer, T5EncoderModel)``.
        vae: optional ``AutoencoderKL``; ``None`` = pixel space (``in_channels`` must be 3).
        roles_mode: ``"lora"`` (peft adapters on the shared base) or ``"full"`` (a transformer copy per role).
        lora_rank: LoRA rank r.
        lora_alpha: LoRA alpha (scale = alpha / r).
        lora_targets: module names to adapt (default :data:`DEFAULT_LORA_TARGETS`, filtered to existing ones).
        guidance_null_prompt: the prompt of the unconditional branch of CFG (``""``).
        resolution: sample side in transformer (latent) pixels; default ``transformer.config.sample_size``.
        max_sequence_length: T5 token count (the pipeline's ``max_sequence_length``).
        prompt_cache_size: how many prompt encodings to keep (LRU; 0 disables; the null prompt is always kept).
        default_shift: the world's scheduler shift (``None`` when the directory has no scheduler config).
        text_embedder: optional module ``prompts -> (seq, pooled)`` used instead of the text encoders (then
            ``clips`` may be empty): precomputed embeddings for benchmarks (:mod:`fewstep_rl.perf.arch`).

    Attributes:
        transformer: the frozen base (with LoRA layers injected in ``lora`` mode).
        clip_encoders: the CLIP text encoders; ``clip_tokenizers`` their tokenizers.
        t5_encoder: the T5 encoder or ``None``; ``t5_tokenizer`` its tokenizer.
        vae: the VAE or ``None``.
        copies: full-mode role copies.
        merged: LoRA-mode merge records (one ``ModuleDict`` of :class:`_Delta` per merge, keyed by layer).
        base_merges: number of merges folded into the base so far (a persistent buffer).
        sample_shape: ``(C, H, W)`` of one sample.
    """

    def __init__(
        self,
        transformer: nn.Module,
        clips: Sequence[tuple[Any, nn.Module]],
        t5: tuple[Any, nn.Module] | None = None,
        vae: nn.Module | None = None,
        *,
        roles_mode: str = "lora",
        lora_rank: int = 32,
        lora_alpha: float = 64,
        lora_targets: Sequence[str] | None = None,
        guidance_null_prompt: str = "",
        resolution: int | None = None,
        max_sequence_length: int = 256,
        prompt_cache_size: int = 256,
        default_shift: float | None = None,
        text_embedder: nn.Module | None = None,
    ) -> None:
        super().__init__()
        if roles_mode not in ("lora", "full"):
            raise ValueError(f"roles_mode must be 'lora' or 'full', got {roles_mode!r}")
        if not (0 if text_embedder is not None else 1) <= len(clips) <= 2:
            raise BackboneLoadError(f"sd3 needs one or two CLIP (tokenizer, encoder) pairs, got {len(clips)}")
        if clips:
            _check_fit(transformer, clips, t5, vae)
        self.text_embedder = text_embedder
        self.roles_mode = roles_mode
        self.lora_rank, self.lora_alpha = int(lora_rank), float(lora_alpha)
        self.transformer = transformer
        self.clip_tokenizers = [tok for tok, _ in clips]
        self.clip_encoders = nn.ModuleList([enc for _, enc in clips])
        self.t5_tokenizer = t5[0] if t5 is not None else None
        self.t5_encoder = t5[1] if t5 is not None else None
        self.vae = vae
        for m in self._frozen_modules():
            m.requires_grad_(False).eval()
        cfg = transformer.config
        side = int(resolution or cfg.sample_size)
        self.sample_shape = (int(cfg.in_channels), side, side)
        self.joint_dim = int(cfg.joint_attention_dim)
        self.max_sequence_length = int(max_sequence_length)
        self.guidance_null_prompt = guidance_null_prompt
        self.default_shift = default_shift
        self.prompt_cache_size = int(prompt_cache_size)
        self._cache: OrderedDict[str, tuple[Tensor, Tensor]] = OrderedDict()
        self._null: tuple[Tensor, Tensor] | None = None
        self.lora_targets = self._resolve_targets(lora_targets) if roles_mode == "lora" else []
        self.copies = nn.ModuleDict()
        self.merged = nn.ModuleList()
        self.register_buffer("base_merges", torch.zeros((), dtype=torch.long))
        self._resets: dict[str, int] = {}
        self._active: Any = _UNSET
        self._layers: list[tuple[str, nn.Module]] | None = None
        self.register_load_state_dict_pre_hook(self._replay_merges)
        self.register_load_state_dict_pre_hook(self._grow_folds)

    # ---------------------------------------------------------------- construction / export
    @classmethod
    def from_components(
        cls, transformer: nn.Module, clips: Sequence[tuple[Any, nn.Module]], t5: tuple[Any, nn.Module] | None = None,
        vae: nn.Module | None = None, **kwargs: Any,
    ) -> SD3Backbone:
        """In-memory construction (same arguments as the constructor)."""
        return cls(transformer, clips, t5, vae, **kwargs)

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        *,
        roles_mode: str = "lora",
        lora_rank: int = 32,
        lora_alpha: float = 64,
        lora_targets: Sequence[str] | None = None,
        dtype: torch.dtype = torch.float32,
        guidance_null_prompt: str = "",
        resolution: int | None = None,
        max_sequence_length: int = 256,
        prompt_cache_size: int = 256,
    ) -> SD3Backbone:
        """Load a local diffusers-format world directory (layout in the module docstring).

        Args:
            path: the directory.
            dtype: dtype every component is loaded in (fp16 files load to fp32 by default).
            roles_mode, lora_rank, lora_alpha, lora_targets, guidance_null_prompt, resolution, max_sequence_length,
                prompt_cache_size: as in the constructor. ``default_shift`` comes from ``scheduler/``.

        Raises:
            BackboneLoadError: on a missing/unreadable component or components that do not fit, naming the file.
        """
        from diffusers import AutoencoderKL, SD3Transformer2DModel
        from transformers import CLIPTextModelWithProjection, T5EncoderModel

        root = Path(path)
        if not root.is_dir():
            raise BackboneLoadError(f"sd3 world directory {root} does not exist (or is not a directory)")
        transformer = _load_model(SD3Transformer2DModel, root, "transformer", dtype, diffusers=True)
        clips = [(_load_tokenizer(root, "tokenizer"), _load_model(CLIPTextModelWithProjection, root, "text_encoder",
                                                                   dtype, diffusers=False))]
        if _present(root, "text_encoder_2", "tokenizer_2"):
            clips.append((_load_tokenizer(root, "tokenizer_2"),
                          _load_model(CLIPTextModelWithProjection, root, "text_encoder_2", dtype, diffusers=False)))
        t5 = None
        if _present(root, "text_encoder_3", "tokenizer_3"):
            t5 = (_load_tokenizer(root, "tokenizer_3"),
                  _load_model(T5EncoderModel, root, "text_encoder_3", dtype, diffusers=False))
        vae = _load_model(AutoencoderKL, root, "vae", dtype, diffusers=True) if (root / "vae").exists() else None
        try:
            return cls(
                transformer, clips, t5, vae, roles_mode=roles_mode, lora_rank=lora_rank, lora_alpha=lora_alpha,
                lora_targets=lora_targets, guidance_null_prompt=guidance_null_prompt, resolution=resolution,
                max_sequence_length=max_sequence_length, prompt_cache_size=prompt_cache_size,
                default_shift=_read_shift(root),
            )
        except BackboneLoadError as e:
            raise BackboneLoadError(f"sd3 world {root}: {e}") from None

    def save_pretrained(self, path: str | Path, dtype: torch.dtype | None = None) -> None:
        """Write the frozen base (with any merges folded in; roles are not saved) in the layout above.

        Args:
            path: target directory (created).
            dtype: dtype of the written weights (e.g. ``torch.float16`` for small files); default as loaded.
        """
        from diffusers import FlowMatchEulerDiscreteScheduler

        root = Path(path)
        root.mkdir(parents=True, exist_ok=True)

        def cast(m: nn.Module) -> nn.Module:
            return copy.deepcopy(m).to(dtype) if dtype is not None and _dtype(m) != dtype else m

        base = self._clean_base()
        base = cast(base) if base is self.transformer else base.to(dtype or _dtype(base))
        base.save_pretrained(root / "transformer")
        index: dict[str, Any] = {"_class_name": "StableDiffusion3Pipeline", "_diffusers_version": _version()}
        index["transformer"] = ["diffusers", type(base).__name__]
        parts = [(self.clip_tokenizers[i], self.clip_encoders[i], "" if i == 0 else f"_{i + 1}")
                 for i in range(len(self.clip_encoders))]
        if self.t5_encoder is not None:
            parts.append((self.t5_tokenizer, self.t5_encoder, "_3"))
        for tok, enc, sub in parts:
            cast(enc).save_pretrained(root / f"text_encoder{sub}")
            tok.save_pretrained(root / f"tokenizer{sub}")
            index[f"text_encoder{sub}"] = ["transformers", type(enc).__name__]
            index[f"tokenizer{sub}"] = ["transformers", type(tok).__name__]
        for sub in ("_2", "_3"):
            index.setdefault(f"text_encoder{sub}", [None, None])
            index.setdefault(f"tokenizer{sub}", [None, None])
        if self.vae is not None:
            cast(self.vae).save_pretrained(root / "vae")
        index["vae"] = ["diffusers", type(self.vae).__name__] if self.vae is not None else [None, None]
        sched = FlowMatchEulerDiscreteScheduler(shift=self.default_shift or 1.0)
        sched.save_pretrained(root / "scheduler")
        index["scheduler"] = ["diffusers", type(sched).__name__]
        index["image_encoder"] = index["feature_extractor"] = [None, None]
        (root / "model_index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")

    def _clean_base(self) -> nn.Module:
        """The base transformer without LoRA layers (a fresh module holding the current base weights)."""
        if not self._lora_layers():
            return self.transformer
        sd = {k.replace(".base_layer.", "."): v for k, v in self.transformer.state_dict().items() if ".lora_" not in k}
        with torch.random.fork_rng(devices=[]):
            base = type(self.transformer).from_config(self.transformer.config)
        base.load_state_dict(sd, strict=True)
        return base.to(_dtype(self.transformer)).eval()

    def _frozen_modules(self) -> list[nn.Module]:
        mods = [self.transformer, *self.clip_encoders]
        return mods + [m for m in (self.t5_encoder, self.vae) if m is not None]

    def _apply(self, fn, recurse=True):  # type: ignore[no-untyped-def]
        """Device/dtype moves invalidate the cached prompt encodings."""
        self._cache.clear()
        self._null = None
        return super()._apply(fn, recurse)

    # ---------------------------------------------------------------- conditioning
    @torch.no_grad()
    def encode_prompts(self, prompts: Sequence[str]) -> dict[str, Tensor]:
        """``{"seq": (B, L, D), "pooled": (B, P)}`` as ``StableDiffusion3Pipeline.encode_prompt`` (cached)."""
        prompts = list(prompts)
        if not prompts:
            raise ValueError("encode_prompts needs at least one prompt")
        todo = list(dict.fromkeys(p for p in prompts if p not in self._cache))
        fresh: dict[str, tuple[Tensor, Tensor]] = {}
        if todo:
            seq, pooled = self._encode(todo)
            fresh = {p: (seq[i : i + 1].clone(), pooled[i : i + 1].clone()) for i, p in enumerate(todo)}
        rows = [fresh[p] if p in fresh else self._cache[p] for p in prompts]
        for p in prompts:
            if p in self._cache:
                self._cache.move_to_end(p)
        if self.prompt_cache_size > 0:
            self._cache.update(fresh)
            while len(self._cache) > self.prompt_cache_size:
                self._cache.popitem(last=False)
        return {"seq": torch.cat([r[0] for r in rows]), "pooled": torch.cat([r[1] for r in rows])}

    def _encode(self, prompts: list[str]) -> tuple[Tensor, Tensor]:
        if self.text_embedder is not None:
            return self.text_embedder(prompts)
        clips = list(zip(self.clip_tokenizers, self.clip_encoders))
        t5 = (self.t5_tokenizer, self.t5_encoder) if self.t5_encoder is not None else None
        return sd3_prompt_embeds(clips, t5, prompts, self.joint_dim, self.max_sequence_length)

    def null_cond(self, n: int) -> dict[str, Tensor]:
        """The encoding of ``guidance_null_prompt`` (``""``) expanded to ``n`` samples (computed once)."""
        if self._null is None:
            with torch.no_grad():
                seq, pooled = self._encode([self.guidance_null_prompt])
            self._null = (seq, pooled)
        seq, pooled = self._null
        return {"seq": seq.expand(n, -1, -1), "pooled": pooled.expand(n, -1)}

    # ---------------------------------------------------------------- decoding
    def decode(self, x: Tensor) -> Tensor:
        """Sampler space → images in [0, 1] (differentiable; the pipeline's decode + post-processing)."""
        if self.vae is None:
            return (x / 2 + 0.5).clamp(0, 1)
        self._register_vae_methods()
        cfg = self.vae.config
        z = x.to(_dtype(self.vae)) / cfg.scaling_factor + (cfg.shift_factor or 0.0)
        img = self.vae.decode(z, return_dict=False)[0]
        return (img / 2 + 0.5).clamp(0, 1).to(x.dtype)

    def encode(self, images: Tensor) -> Tensor:
        """Images in [0, 1] → sampler space (VAE posterior mean, shifted and scaled; or ``2·img − 1``)."""
        x = 2 * images - 1
        if self.vae is None:
            return x
        self._register_vae_methods()
        cfg = self.vae.config
        mean = self.vae.encode(x.to(_dtype(self.vae))).latent_dist.mean
        return ((mean - (cfg.shift_factor or 0.0)) * cfg.scaling_factor).to(images.dtype)

    def _register_vae_methods(self) -> None:
        """Under FSDP2, make ``vae.encode``/``vae.decode`` gather the VAE's parameters like ``forward`` does."""
        if getattr(self.vae, "_fewstep_fsdp_methods", False) or not torch.distributed.is_available():
            return
        from torch.distributed.fsdp import FSDPModule, register_fsdp_forward_method

        if isinstance(self.vae, FSDPModule):
            register_fsdp_forward_method(self.vae, "encode")
            register_fsdp_forward_method(self.vae, "decode")
            self.vae._fewstep_fsdp_methods = True

    # ---------------------------------------------------------------- prediction
    def _predict(self, x: Tensor, sigma: Tensor, cond: dict[str, Tensor], role: str | None) -> Tensor:
        if self.roles_mode == "full":
            model = self.transformer if role is None else self.copies[role]
        else:
            model = self.transformer
            self._activate(role)
        dt = _dtype(model)
        out = model(
            hidden_states=x.to(dt), timestep=1000 * sigma.float(), encoder_hidden_states=cond["seq"].to(dt),
            pooled_projections=cond["pooled"].to(dt), return_dict=False,
        )[0]
        return out.to(x.dtype)

    # ---------------------------------------------------------------- LoRA mechanics
    def _resolve_targets(self, targets: Sequence[str] | None) -> list[str]:
        names = [n for n, _ in self.transformer.named_modules()]

        def exists(t: str) -> bool:
            return any(n == t or n.endswith("." + t) for n in names)

        if targets is None:
            found = [t for t in DEFAULT_LORA_TARGETS if exists(t)]
        else:
            missing = [t for t in targets if not exists(t)]
            if missing:
                raise ValueError(f"LoRA target modules {missing} do not exist in the SD3 transformer")
            found = list(targets)
        if not found:
            raise ValueError("no LoRA target module exists in the SD3 transformer")
        return found

    def _lora_layers(self) -> list[tuple[str, nn.Module]]:
        """``(path, layer)`` of every peft LoRA layer of the transformer (cached; reset when roles are added)."""
        if self._layers is None:
            if self.roles_mode != "lora" or not self.roles:
                return []
            from peft.tuners.lora import LoraLayer

            self._layers = [(n, m) for n, m in self.transformer.named_modules() if isinstance(m, LoraLayer)]
        return self._layers

    def _activate(self, role: str | None) -> None:
        """Make only ``role``'s adapter active (``None``: all off), then restore every adapter's requires_grad."""
        if role == self._active or not self.roles:
            return
        active = None if role is None else [role, *self.folds_of(role)]
        for _, layer in self._lora_layers():
            if active is None:
                layer.enable_adapters(False)
            else:
                layer.set_adapter(active if len(active) > 1 else role)
                if layer.disable_adapters:
                    layer.enable_adapters(True)
        self._active = role
        self._restore_grad()

    def _restore_grad(self) -> None:
        for _, layer in self._lora_layers():
            for r in self.roles:
                flag = self.trainable[r]
                layer.lora_A[r].requires_grad_(flag)
                layer.lora_B[r].requires_grad_(flag)
            for f in self.folds:
                layer.lora_A[f].requires_grad_(False)
                layer.lora_B[f].requires_grad_(False)

    @torch.no_grad()
    def _init_lora(self, name: str) -> None:
        """``A ~ U(±1/√fan_in)`` (peft's kaiming-uniform law) from a seeded generator, ``B = 0``."""
        for path, layer in self._lora_layers():
            a, b = layer.lora_A[name].weight, layer.lora_B[name].weight
            gen = torch.Generator().manual_seed(stable_hash("sd3-lora", name, self._resets[name], path))
            u = torch.rand(a.shape, generator=gen, dtype=torch.float64, device="cpu")
            a.copy_(((2 * u - 1) / math.sqrt(a.shape[1])).to(a))
            b.zero_()

    # ---------------------------------------------------------------- roles
    def add_role(self, name: str, trainable: bool = True) -> None:
        """Create role ``name`` equal to the current base: a zero-output LoRA adapter, or a full copy."""
        if "." in name:
            raise ValueError(f"role names cannot contain '.', got {name!r}")
        self._register(name, trainable)
        self._resets[name] = 0
        if self.roles_mode == "full":
            self.copies[name] = copy.deepcopy(self.transformer).requires_grad_(trainable)
            return
        self._add_adapter(name)
        self._init_lora(name)
        self._restore_grad()

    def _add_adapter(self, name: str) -> None:
        """A peft LoRA adapter ``name`` on every target layer (weights set by the caller)."""
        from peft import LoraConfig

        cfg = LoraConfig(r=self.lora_rank, lora_alpha=self.lora_alpha, target_modules=list(self.lora_targets),
                         init_lora_weights=True)
        dev = next(self.transformer.parameters()).device
        with torch.random.fork_rng(devices=[dev] if dev.type != "cpu" else [], device_type=dev.type), \
                warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Already found a `peft_config`")  # several adapters: intended
            self.transformer.add_adapter(cfg, adapter_name=name)  # peft's own init draws from the global RNG
        self._layers = None
        self._active = _UNSET

    def _check_role(self, name: str) -> None:
        if name not in self.roles:
            raise KeyError(f"unknown role {name!r}; this backbone has roles {self.roles}")

    def role_parameters(self, name: str) -> list[nn.Parameter]:
        """The role's LoRA ``A``/``B`` weights (module order), or every parameter of its full copy."""
        self._check_role(name)
        if self.roles_mode == "full":
            return list(self.copies[name].parameters())
        keys = (f".lora_A.{name}.", f".lora_B.{name}.")
        return [p for n, p in self.transformer.named_parameters() if any(k in n for k in keys)]

    def reset_role(self, name: str) -> None:
        """Role ``name`` equal to the base again (fresh ``A`` seeded by (name, reset count), ``B = 0``; or a copy)."""
        self._check_role(name)
        self._resets[name] += 1
        if self.roles_mode == "full":
            with torch.no_grad():
                for d, s in zip(self.copies[name].parameters(), self.transformer.parameters(), strict=True):
                    d.copy_(s)
            return
        self._init_lora(name)

    @torch.no_grad()
    def _fold(self, name: str, members: tuple[str, ...], fold_name: str) -> None:
        """LoRA: frozen adapter ``fold_name`` = copy of ``name``'s, members reset. Full: members ← copy of ``name``."""
        if self.roles_mode == "full":
            for r in members:
                if r != name:
                    for d, s in zip(self.copies[r].parameters(), self.copies[name].parameters(), strict=True):
                        d.copy_(s)
            return
        self._add_adapter(fold_name)
        for _, layer in self._lora_layers():
            layer.lora_A[fold_name].weight.copy_(layer.lora_A[name].weight)
            layer.lora_B[fold_name].weight.copy_(layer.lora_B[name].weight)
        self._register_fold(fold_name)
        for r in members:
            self.reset_role(r)
        self._active = _UNSET
        self._restore_grad()

    def _grow_folds(self, module: nn.Module, state_dict: dict, prefix: str, *args: Any) -> None:
        """Load pre-hook: create the (frozen) fold adapters the incoming state dict names and this backbone lacks."""
        if self.roles_mode != "lora":
            return
        found = set()
        for k in state_dict:
            if k.startswith(prefix) and ".lora_A." in k:
                name = k.split(".lora_A.", 1)[1].split(".", 1)[0]
                if parse_fold(name) is not None:
                    found.add(name)
        for name in sorted(found - set(self.folds), key=lambda f: parse_fold(f)[0]):  # type: ignore[index]
            missing = [r for r in parse_fold(name)[1] if r not in self.roles]  # type: ignore[index]
            if missing:
                raise RuntimeError(f"state dict has fold {name!r} for role(s) {missing} this backbone lacks "
                                   f"(roles here: {self.roles})")
            self._add_adapter(name)
            self._register_fold(name)
            self._restore_grad()

    @torch.no_grad()
    def merge_role(self, name: str) -> None:
        """Fold role ``name`` into the base (``W += scale·B·A``, or base ← copy), record it, reset the role."""
        self._check_role(name)
        if self.folds_of(name):
            raise ValueError(f"merge_role: role {name!r} sits on folds {self.folds_of(name)}; merging it is not "
                             "supported")
        if self.roles_mode == "full":
            for d, s in zip(self.transformer.parameters(), self.copies[name].parameters(), strict=True):
                d.copy_(s)
        else:
            record = nn.ModuleDict()
            for path, layer in self._lora_layers():
                up = (layer.lora_B[name].weight * layer.scaling[name]).detach().clone()
                down = layer.lora_A[name].weight.detach().clone()
                _fold(layer.get_base_layer().weight, up, down)
                record[_safe(path)] = _Delta(up, down)
            self.merged.append(record)
        self.base_merges += 1
        self.reset_role(name)

    def _replay_merges(self, module: nn.Module, state_dict: dict, prefix: str, *args: Any) -> None:
        """Load pre-hook: fold the incoming merge records this backbone has not applied yet into its base.

        Runs before the sub-modules load, so a full state dict (base weights included) still wins.
        """
        head = prefix + "merged."
        incoming: dict[int, dict[str, dict[str, Tensor]]] = {}
        for k, v in state_dict.items():
            if k.startswith(head):
                idx, layer, which = k[len(head):].split(".")
                incoming.setdefault(int(idx), {}).setdefault(layer, {})[which] = v
        if not incoming:
            return
        if sorted(incoming) != list(range(len(incoming))) or len(incoming) < len(self.merged):
            raise RuntimeError(f"state dict has merge records {sorted(incoming)}; this backbone has "
                               f"{len(self.merged)} (load merges into a fresh backbone)")
        for i, rec in enumerate(self.merged):
            same = set(rec.keys()) == set(incoming[i]) and all(
                torch.equal(rec[k].up.cpu(), incoming[i][k]["up"].cpu()) for k in rec)
            if not same:
                raise RuntimeError(f"merge record {i} of the state dict differs from the one already applied here "
                                   "(load merges into a fresh backbone)")
        with torch.no_grad():
            for i in range(len(self.merged), len(incoming)):
                record = nn.ModuleDict()
                for key, t in incoming[i].items():
                    path = key.replace("__", ".")
                    try:
                        layer = self.transformer.get_submodule(path)
                    except AttributeError:
                        raise RuntimeError(f"merge record {i} has a delta for {path}, which this transformer lacks") \
                            from None
                    w = layer.get_base_layer().weight if hasattr(layer, "get_base_layer") else layer.weight
                    up = t["up"].to(device=w.device)
                    down = t["down"].to(device=w.device, dtype=up.dtype)
                    _fold(w, up, down)
                    record[key] = _Delta(up.clone(), down.clone())
                self.merged.append(record)

    def is_role_key(self, key: str) -> bool:
        """LoRA weights, full copies, merge records and the merge count; the base only after a full-mode merge."""
        if ".lora_A." in key or ".lora_B." in key or key.startswith(("copies.", "merged.")) or key == "base_merges":
            return True
        return self.roles_mode == "full" and bool(self.base_merges > 0) and key.startswith("transformer.")

    def fsdp_units(self) -> Iterator[nn.Module]:
        """Transformer blocks then each transformer (base and full-mode copies), each text encoder and the VAE.

        Every module with parameters is its own unit: FSDP2 gathers a unit's parameters around ``forward``, and
        the backbone root is never called through ``forward`` (``velocity``, ``encode_prompts``, ``decode``).
        The VAE's ``encode``/``decode`` are registered as forward methods on first use.
        """
        for t in (self.transformer, *self.copies.values()):
            yield from t.transformer_blocks
            yield t
        yield from self.clip_encoders
        yield from (m for m in (self.t5_encoder, self.vae) if m is not None)


# -------------------------------------------------------------------- helpers
def _fold(w: Tensor, up: Tensor, down: Tensor) -> None:
    """``W += up @ down`` in place, in ``W``'s dtype (computed in float32 or better)."""
    ct = torch.promote_types(w.dtype, torch.float32)
    w.copy_((w.to(ct) + up.to(ct) @ down.to(ct)).to(w.dtype))


def _dtype(m: nn.Module) -> torch.dtype:
    return next(m.parameters()).dtype


def _version() -> str:
    import diffusers

    return diffusers.__version__


def _present(root: Path, encoder: str, tokenizer: str) -> bool:
    """Whether an optional encoder/tokenizer pair is there; one without the other is an error."""
    a, b = (root / encoder).exists(), (root / tokenizer).exists()
    if a != b:
        have, lack = (encoder, tokenizer) if a else (tokenizer, encoder)
        raise BackboneLoadError(f"sd3 world {root}: {root / have} exists but {root / lack} is missing")
    return a


def _read_shift(root: Path) -> float | None:
    f = root / "scheduler" / "scheduler_config.json"
    if not f.exists():
        return None
    try:
        shift = json.loads(f.read_text()).get("shift")
    except (OSError, ValueError) as e:
        raise BackboneLoadError(f"cannot read {f}: {e}") from None
    return float(shift) if shift is not None else None


def _first_line(e: BaseException, limit: int = 300) -> str:
    """``Type: first sentence`` of an exception (loader messages go on with generic advice)."""
    msg = " ".join(str(e).split()).split(". ")[0]
    return f"{type(e).__name__}: {msg[:limit]}{'…' if len(msg) > limit else ''}"


def _load_model(cls: Any, root: Path, sub: str, dtype: torch.dtype, diffusers: bool) -> Any:
    """``cls.from_pretrained(root/sub)`` with checks; every failure becomes a :class:`BackboneLoadError`."""
    d = root / sub
    if not d.is_dir():
        raise BackboneLoadError(f"sd3 world {root}: required folder {d} is missing")
    cfg = d / "config.json"
    if not cfg.is_file():
        raise BackboneLoadError(f"sd3 world {root}: {cfg} is missing")
    weights = sorted(f for pat in (_DIFFUSERS_WEIGHTS if diffusers else _TRANSFORMERS_WEIGHTS) for f in d.glob(pat))
    if not weights:
        expected = " or ".join(_DIFFUSERS_WEIGHTS if diffusers else _TRANSFORMERS_WEIGHTS)
        raise BackboneLoadError(f"sd3 world {root}: no weights file in {d} (expected {expected})")
    what = f"{cls.__name__} from {cfg} and {weights[0]}"
    dkw = {"torch_dtype": dtype} if diffusers else {"dtype": dtype}
    try:
        model, info = cls.from_pretrained(d, local_files_only=True, output_loading_info=True, **dkw)
    except Exception as e:  # noqa: BLE001 - any loader failure is reported the same way
        raise BackboneLoadError(f"sd3 world {root}: cannot load {what} (does the config fit the weights?): "
                                f"{_first_line(e)}") from e
    bad = {k: sorted(info.get(k) or ()) for k in ("missing_keys", "unexpected_keys", "mismatched_keys")}
    bad = {k: v for k, v in bad.items() if v}
    if bad or info.get("error_msgs"):
        detail = "; ".join(f"{k.replace('_', ' ')}: {v[:4]}{' …' if len(v) > 4 else ''}" for k, v in bad.items())
        detail = detail or str(info.get("error_msgs"))
        raise BackboneLoadError(f"sd3 world {root}: {cfg} does not fit the weights {weights[0]} ({detail})")
    return model.eval()


def _load_tokenizer(root: Path, sub: str) -> Any:
    from transformers import AutoTokenizer

    d = root / sub
    if not d.is_dir():
        raise BackboneLoadError(f"sd3 world {root}: required folder {d} is missing")
    try:
        return AutoTokenizer.from_pretrained(d, local_files_only=True)
    except Exception as e:  # noqa: BLE001
        raise BackboneLoadError(f"sd3 world {root}: cannot load the tokenizer in {d}: {_first_line(e)}") from e


def _check_fit(transformer: Any, clips: Sequence[tuple[Any, Any]], t5: tuple[Any, Any] | None, vae: Any) -> None:
    """Components that load one by one but cannot work together → :class:`BackboneLoadError`."""
    cfg = transformer.config
    widths = [int(enc.config.hidden_size) for _, enc in clips]
    pooled = sum(int(enc.config.projection_dim) for _, enc in clips)
    if pooled != cfg.pooled_projection_dim:
        raise BackboneLoadError(
            f"text_encoder projection dims {[int(e.config.projection_dim) for _, e in clips]} sum to {pooled}, but "
            f"transformer/config.json has pooled_projection_dim={cfg.pooled_projection_dim}")
    seq_width = int(t5[1].config.d_model) if t5 is not None else sum(widths)
    if t5 is not None and seq_width != cfg.joint_attention_dim:
        raise BackboneLoadError(f"text_encoder_3 (T5) width {seq_width} != transformer/config.json "
                                f"joint_attention_dim={cfg.joint_attention_dim}")
    if t5 is None and sum(widths) > cfg.joint_attention_dim:  # (with T5 the pipeline crops CLIP to T5's width)
        raise BackboneLoadError(f"CLIP widths {widths} exceed transformer/config.json joint_attention_dim="
                                f"{cfg.joint_attention_dim} and there is no T5")
    for i, (tok, enc) in enumerate(clips):
        if len(tok) > enc.config.vocab_size:
            sub = "" if i == 0 else f"_{i + 1}"
            raise BackboneLoadError(f"tokenizer{sub} has {len(tok)} tokens but text_encoder{sub}/config.json has "
                                    f"vocab_size={enc.config.vocab_size}")
    if t5 is not None and len(t5[0]) > t5[1].config.vocab_size:
        raise BackboneLoadError(f"tokenizer_3 has {len(t5[0])} tokens but text_encoder_3/config.json has "
                                f"vocab_size={t5[1].config.vocab_size}")
    if vae is not None and vae.config.latent_channels != cfg.in_channels:
        raise BackboneLoadError(f"vae/config.json latent_channels={vae.config.latent_channels} != transformer "
                                f"in_channels={cfg.in_channels}")
    if vae is None and cfg.in_channels != 3:
        raise BackboneLoadError(f"no vae/: pixel space needs transformer in_channels=3, got {cfg.in_channels} "
                                "(transformer/config.json)")
