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

Roles (architecture.md §3) live in the store the ``roles`` section picks (:func:`fewstep_rl.roles.build_store`):
peft LoRA adapters on :data:`DEFAULT_LORA_TARGETS` of the shared frozen transformer (``roles.mode: lora``, the
default; seeds tagged ``"sd3-lora"``) or a full transformer copy per role (``full``). ``_predict`` runs whatever
network ``store.activate(role)`` returns; role state is everything under ``store.`` plus the LoRA layers inside
``transformer`` (see :mod:`fewstep_rl.roles.lora` and :mod:`fewstep_rl.roles.full`).
"""

from __future__ import annotations

import copy
import json
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from fewstep_rl.backbones.base import Backbone, BackboneLoadError
from fewstep_rl.backbones.loading import diffusers_version, dtype_of, load_model, load_tokenizer, present, read_shift
from fewstep_rl.backbones.sd3_text import sd3_prompt_embeds
from fewstep_rl.backbones.varlen import PromptRows, clean_base
from fewstep_rl.roles import RolesConfig, build_store

#: LoRA target modules of SD3 attention (filtered to those the transformer has).
DEFAULT_LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")
_FAMILY = "sd3"


class SD3Backbone(Backbone):
    """Frozen SD3 MMDiT + CLIP(/CLIP/T5) text encoders + optional VAE, with LoRA or full-copy roles.

    Args:
        transformer: a ``diffusers.SD3Transformer2DModel`` (frozen here).
        clips: one or two ``(tokenizer, CLIPTextModelWithProjection)`` pairs.
        t5: optional ``(tokenizer, T5EncoderModel)``.
        vae: optional ``AutoencoderKL``; ``None`` = pixel space (``in_channels`` must be 3).
        roles: the ``roles`` section (mode, LoRA rank/alpha/targets); default LoRA rank 32, alpha 64 on
            :data:`DEFAULT_LORA_TARGETS` (filtered to existing ones).
        guidance_null_prompt: the prompt of the unconditional branch of CFG (``""``).
        resolution: sample side in transformer (latent) pixels, or ``(height, width)`` for non-square samples;
            default ``transformer.config.sample_size`` (square).
        max_sequence_length: T5 token count (the pipeline's ``max_sequence_length``).
        prompt_cache_size: how many prompt encodings to keep (LRU; 0 disables; the null prompt is always kept).
        default_shift: the world's scheduler shift (``None`` when the directory has no scheduler config).
        text_embedder: optional module ``prompts -> (seq, pooled)`` used instead of the text encoders (then
            ``clips`` may be empty): precomputed embeddings for benchmarks (:mod:`fewstep_rl.perf.arch`).

    Attributes:
        transformer: the frozen base (with LoRA layers injected once LoRA roles exist).
        clip_encoders: the CLIP text encoders; ``clip_tokenizers`` their tokenizers.
        t5_encoder: the T5 encoder or ``None``; ``t5_tokenizer`` its tokenizer.
        vae: the VAE or ``None``.
        store: the roles (a ``LoraStore`` or ``FullCopyStore`` over ``transformer``).
        sample_shape: ``(C, H, W)`` of one sample.
    """

    def __init__(
        self,
        transformer: nn.Module,
        clips: Sequence[tuple[Any, nn.Module]],
        t5: tuple[Any, nn.Module] | None = None,
        vae: nn.Module | None = None,
        *,
        roles: RolesConfig | None = None,
        guidance_null_prompt: str = "",
        resolution: int | tuple[int, int] | None = None,
        max_sequence_length: int = 256,
        prompt_cache_size: int = 256,
        default_shift: float | None = None,
        text_embedder: nn.Module | None = None,
    ) -> None:
        super().__init__()
        if not (0 if text_embedder is not None else 1) <= len(clips) <= 2:
            raise BackboneLoadError(f"sd3 needs one or two CLIP (tokenizer, encoder) pairs, got {len(clips)}")
        if clips:
            _check_fit(transformer, clips, t5, vae)
        self.text_embedder = text_embedder
        self.transformer = transformer
        self.clip_tokenizers = [tok for tok, _ in clips]
        self.clip_encoders = nn.ModuleList([enc for _, enc in clips])
        self.t5_tokenizer = t5[0] if t5 is not None else None
        self.t5_encoder = t5[1] if t5 is not None else None
        self.vae = vae
        for m in self._frozen_modules():
            m.requires_grad_(False).eval()
        cfg = transformer.config
        h, w = resolution if isinstance(resolution, (tuple, list)) else (resolution or cfg.sample_size,) * 2
        self.sample_shape = (int(cfg.in_channels), int(h), int(w))
        self.joint_dim = int(cfg.joint_attention_dim)
        self.max_sequence_length = int(max_sequence_length)
        self.guidance_null_prompt = guidance_null_prompt
        self.default_shift = default_shift
        self.prompt_cache_size = int(prompt_cache_size)
        self._cache = PromptRows(self._encode_rows, self.prompt_cache_size)
        self._null: tuple[Tensor, Tensor] | None = None
        self.store = build_store(roles, transformer, default_targets=DEFAULT_LORA_TARGETS, family=_FAMILY)

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
        roles: RolesConfig | None = None,
        dtype: torch.dtype = torch.float32,
        guidance_null_prompt: str = "",
        resolution: int | tuple[int, int] | None = None,
        max_sequence_length: int = 256,
        prompt_cache_size: int = 256,
    ) -> SD3Backbone:
        """Load a local diffusers-format world directory (layout in the module docstring).

        Args:
            path: the directory.
            dtype: dtype every component is loaded in (fp16 files load to fp32 by default).
            roles, guidance_null_prompt, resolution, max_sequence_length, prompt_cache_size: as in the constructor. ``default_shift`` comes from ``scheduler/``.

        Raises:
            BackboneLoadError: on a missing/unreadable component or components that do not fit, naming the file.
        """
        from diffusers import AutoencoderKL, SD3Transformer2DModel
        from transformers import CLIPTextModelWithProjection, T5EncoderModel

        root = Path(path)
        if not root.is_dir():
            raise BackboneLoadError(f"sd3 world directory {root} does not exist (or is not a directory)")
        def model(cls_: Any, sub: str, diffusers: bool) -> Any:
            return load_model(cls_, root, sub, dtype, diffusers=diffusers, family=_FAMILY)

        transformer = model(SD3Transformer2DModel, "transformer", True)
        clips = [(load_tokenizer(root, "tokenizer", _FAMILY), model(CLIPTextModelWithProjection, "text_encoder", False))]
        if present(root, "text_encoder_2", "tokenizer_2", _FAMILY):
            clips.append((load_tokenizer(root, "tokenizer_2", _FAMILY),
                          model(CLIPTextModelWithProjection, "text_encoder_2", False)))
        t5 = None
        if present(root, "text_encoder_3", "tokenizer_3", _FAMILY):
            t5 = (load_tokenizer(root, "tokenizer_3", _FAMILY), model(T5EncoderModel, "text_encoder_3", False))
        vae = model(AutoencoderKL, "vae", True) if (root / "vae").exists() else None
        try:
            return cls(
                transformer, clips, t5, vae, roles=roles, guidance_null_prompt=guidance_null_prompt,
                resolution=resolution, max_sequence_length=max_sequence_length, prompt_cache_size=prompt_cache_size,
                default_shift=read_shift(root),
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
            return copy.deepcopy(m).to(dtype) if dtype is not None and dtype_of(m) != dtype else m

        base = clean_base(self.transformer, self.store)
        base = cast(base) if base is self.transformer else base.to(dtype or dtype_of(base))
        base.save_pretrained(root / "transformer")
        index: dict[str, Any] = {"_class_name": "StableDiffusion3Pipeline", "_diffusers_version": diffusers_version()}
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
        rows = self._cache(prompts)
        return {"seq": torch.cat([r[0] for r in rows]), "pooled": torch.cat([r[1] for r in rows])}

    def _encode_rows(self, prompts: list[str]) -> list[tuple[Tensor, Tensor]]:
        seq, pooled = self._encode(prompts)
        return [(seq[i : i + 1], pooled[i : i + 1]) for i in range(len(prompts))]

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
        z = x.to(dtype_of(self.vae)) / cfg.scaling_factor + (cfg.shift_factor or 0.0)
        img = self.vae.decode(z, return_dict=False)[0]
        return (img / 2 + 0.5).clamp(0, 1).to(x.dtype)

    def encode(self, images: Tensor) -> Tensor:
        """Images in [0, 1] → sampler space (VAE posterior mean, shifted and scaled; or ``2·img − 1``)."""
        x = 2 * images - 1
        if self.vae is None:
            return x
        self._register_vae_methods()
        cfg = self.vae.config
        mean = self.vae.encode(x.to(dtype_of(self.vae))).latent_dist.mean
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
        model = self.store.activate(role)
        dt = dtype_of(model)
        out = model(
            hidden_states=x.to(dt), timestep=1000 * sigma.float(), encoder_hidden_states=cond["seq"].to(dt),
            pooled_projections=cond["pooled"].to(dt), return_dict=False,
        )[0]
        return out.to(x.dtype)

    def fsdp_units(self) -> Iterator[nn.Module]:
        """Transformer blocks then each transformer (base and full copies), each text encoder and the VAE.

        Every module with parameters is its own unit: FSDP2 gathers a unit's parameters around ``forward``, and
        the backbone root is never called through ``forward`` (``velocity``, ``encode_prompts``, ``decode``).
        The VAE's ``encode``/``decode`` are registered as forward methods on first use.
        """
        for t in self.store.networks():
            yield from t.transformer_blocks
            yield t
        yield from self.clip_encoders
        yield from (m for m in (self.t5_encoder, self.vae) if m is not None)


# -------------------------------------------------------------------- helpers
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
