"""The ``flux`` backbone: a diffusers ``FluxTransformer2DModel`` (FLUX.1-dev style) with CLIP (pooled) + T5.

World directory (diffusers format, always local; ``local_files_only=True`` everywhere), as ``FluxPipeline``::

    transformer/                     FluxTransformer2DModel     required
    text_encoder/  + tokenizer/      CLIPTextModel              required (pooled prompt embedding)
    text_encoder_2/ + tokenizer_2/   T5EncoderModel             required (token embeddings)
    vae/                             AutoencoderKL (16 ch.)     required
    scheduler/scheduler_config.json  the dynamic-shift constants (base/max_shift, base/max_image_seq_len)

Every problem with that directory raises one :class:`BackboneLoadError` naming the file (``loading.load_model``).

Space. The sampler works in unpacked scaled latents ``z = (E(img) − shift)·scale`` of shape ``(C, H, W)`` (H, W
even). ``_predict`` packs them as ``FluxPipeline._pack_latents`` does (2×2 patches → a sequence of ``4C``-wide
tokens, image RoPE ids ``(0, row, col)`` of the patch grid, text ids zero) and unpacks the velocity: packing is a
permutation, so Euler steps in either layout are identical. ``decode`` = ``D(z/scale + shift)/2 + 0.5``, clamped.

Prediction (``FluxPipeline.__call__``): ``v = transformer(x, timestep = (1000σ)/1000, guidance, T5 seq, CLIP
pooled)``; the velocity is in the convention of methods.md §1.1. ``guidance`` is the *distilled guidance
embedding* (``guidance_embeds=True``; the world's ``guidance``, FLUX.1-dev 3.5) fed to every pass and every role;
it is not CFG. True CFG against the empty prompt (the pipeline's ``true_cfg_scale`` with ``negative_prompt=""``)
is the base class's batched form (``velocity(guidance=w)``).

Schedule (methods.md §1.1): the pipeline's grid ``linspace(1, 1/K, K)`` under the dynamic exponential shift with
``μ`` linear in the image tokens (:func:`fewstep_rl.sampling.sigmas.flux_mu`, constants from ``scheduler/``);
:meth:`FluxBackbone.sigmas`. At a fixed resolution that is the static shift ``γ = e^μ``
(:meth:`FluxBackbone.schedule_shift`), the value methods' ``shift`` takes for this world.

Roles: a LoRA or full-copy store over the transformer (:func:`fewstep_rl.roles.build_store`), LoRA on the attention
projections of the double-stream blocks (image and context) and the single-stream blocks' q/k/v
(:data:`DEFAULT_LORA_TARGETS`).
"""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from fewstep_rl.backbones.base import Backbone, BackboneLoadError
from fewstep_rl.backbones.loading import dtype_of, load_model, load_tokenizer
from fewstep_rl.backbones.varlen import PromptRows, clean_base
from fewstep_rl.roles import RolesConfig, build_store
from fewstep_rl.sampling.sigmas import flux_mu, sigma_grid

#: LoRA targets of FLUX attention (double blocks: image + context projections; single blocks: q/k/v).
DEFAULT_LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")


def read_scheduler(root: Path) -> dict[str, Any]:
    """``scheduler/scheduler_config.json`` (``{}`` without one)."""
    f = root / "scheduler" / "scheduler_config.json"
    if not f.exists():
        return {}
    try:
        return dict(json.loads(f.read_text()))
    except (OSError, ValueError) as e:
        raise BackboneLoadError(f"cannot read {f}: {e}") from None


class FluxFamily(Backbone):
    """What the FLUX families share: a frozen transformer in a role store, a VAE, cached prompt encodings, the
    pipeline-directory export. Subclasses implement ``_encode`` (prompts → dict of batched tensors), ``_pack`` /
    ``_unpack`` / ``_ids`` and ``_forward``, ``decode``/``encode`` and ``_mu``."""

    family = "flux"
    components: tuple[nn.Module, ...]

    def _setup(self, transformer: nn.Module, vae: nn.Module, roles: RolesConfig | None, targets: Sequence[str],
               sample_shape: tuple[int, int, int], source: Path | None, scheduler: dict[str, Any],
               prompt_cache_size: int) -> None:
        self.transformer, self.vae, self.source = transformer, vae, source
        for m in (transformer, vae, *self.components):
            m.requires_grad_(False).eval()
        self.sample_shape = sample_shape
        self.scheduler_config = dict(scheduler)
        self.prompt_cache_size = int(prompt_cache_size)
        self._cache = PromptRows(self._encode_rows, self.prompt_cache_size)
        self._null: dict[str, Tensor] | None = None
        self.store = build_store(roles, transformer, default_targets=targets, family=self.family)

    def _apply(self, fn, recurse=True):  # type: ignore[no-untyped-def]
        """Device/dtype moves invalidate the cached prompt encodings."""
        self._cache.clear()
        self._null = None
        return super()._apply(fn, recurse)

    # ---------------------------------------------------------------- conditioning
    def _encode(self, prompts: list[str]) -> dict[str, Tensor]:
        raise NotImplementedError

    @torch.no_grad()
    def encode_prompts(self, prompts: Sequence[str]) -> dict[str, Tensor]:
        """The pipeline's ``encode_prompt`` of each prompt (batched, LRU-cached per prompt string)."""
        rows = self._cache(prompts)
        return {k: torch.cat([r[k] for r in rows]) for k in rows[0]}

    def _encode_rows(self, prompts: list[str]) -> list[dict[str, Tensor]]:
        enc = self._encode(prompts)
        return [{k: v[i : i + 1] for k, v in enc.items()} for i in range(len(prompts))]

    def null_cond(self, n: int) -> dict[str, Tensor]:
        """The empty prompt's encoding (the pipeline's ``negative_prompt=""``) for ``n`` samples (computed once)."""
        if self._null is None:
            with torch.no_grad():
                self._null = self._encode([""])
        return {k: v.expand(n, *v.shape[1:]) for k, v in self._null.items()}

    # ---------------------------------------------------------------- schedule
    def _mu(self, num_steps: int) -> float:
        raise NotImplementedError

    def image_tokens(self) -> int:
        """Image sequence length of one sample (tokens the transformer sees)."""
        raise NotImplementedError

    def schedule_shift(self, num_steps: int) -> float:
        """The static shift ``γ = e^μ`` equal to the pipeline's dynamic shift at this resolution and step count."""
        return math.exp(self._mu(num_steps))

    def sigmas(self, num_steps: int) -> Tensor:
        """The pipeline's σ grid for ``num_steps`` (dynamic shift of ``linspace(1, 1/K, K)``, then 0)."""
        return sigma_grid(num_steps, mu=self._mu(num_steps))

    # ---------------------------------------------------------------- prediction
    def _predict(self, x: Tensor, sigma: Tensor, cond: dict[str, Tensor], role: str | None) -> Tensor:
        model = self.store.activate(role)
        dt = dtype_of(model)
        t = (1000 * sigma.float()) / 1000  # the pipeline's timesteps (σ·1000) / 1000
        out = self._forward(model, self._pack(x.to(dt)), t.to(dt), {k: v.to(dt) for k, v in cond.items()})
        return self._unpack(out).to(x.dtype)

    def _forward(self, model: nn.Module, tokens: Tensor, t: Tensor, cond: dict[str, Tensor]) -> Tensor:
        raise NotImplementedError

    def _pack(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    def _unpack(self, tokens: Tensor) -> Tensor:
        raise NotImplementedError

    # ---------------------------------------------------------------- export
    def save_pretrained(self, path: str | Path) -> None:
        """Write the loaded directory with the (merged) base transformer in ``transformer/`` (roles not saved)."""
        if self.source is None:
            raise ValueError(f"{self.family}: save_pretrained needs a backbone loaded from a directory")
        root = Path(path)
        root.mkdir(parents=True, exist_ok=True)
        for item in self.source.iterdir():
            if item.name != "transformer":
                (shutil.copytree(item, root / item.name, dirs_exist_ok=True) if item.is_dir()
                 else shutil.copy2(item, root / item.name))
        clean_base(self.transformer, self.store).save_pretrained(root / "transformer")

    def _vae(self) -> nn.Module:
        """The VAE; under FSDP2 its ``encode``/``decode`` are registered to gather parameters like ``forward``."""
        if not getattr(self.vae, "_fewstep_fsdp_methods", False) and torch.distributed.is_available():
            from torch.distributed.fsdp import FSDPModule, register_fsdp_forward_method

            if isinstance(self.vae, FSDPModule):
                register_fsdp_forward_method(self.vae, "encode")
                register_fsdp_forward_method(self.vae, "decode")
                self.vae._fewstep_fsdp_methods = True
        return self.vae

    def fsdp_units(self) -> Iterator[nn.Module]:
        """Transformer blocks, then each transformer (base and copies), the text encoders and the VAE."""
        for t in self.store.networks():
            yield from t.transformer_blocks
            yield from t.single_transformer_blocks
            yield t
        yield from self.components
        yield self.vae


def load_parts(root: Path, family: str, dtype: torch.dtype) -> Callable[[Any, str, bool], Any]:
    """``(class, subfolder, is_diffusers) -> model`` loader of ``root`` (checked: a missing root is an error)."""
    if not root.is_dir():
        raise BackboneLoadError(f"{family} world directory {root} does not exist (or is not a directory)")
    return lambda cls, sub, diffusers: load_model(cls, root, sub, dtype, diffusers=diffusers, family=family)


class FluxBackbone(FluxFamily):
    """Frozen FLUX.1 transformer + CLIP (pooled) + T5 + 16-channel VAE, with LoRA or full-copy roles.

    Args:
        transformer: a ``FluxTransformer2DModel``.
        clip: ``(CLIPTokenizer, CLIPTextModel)``; t5: ``(T5 tokenizer, T5EncoderModel)``; vae: ``AutoencoderKL``.
        roles: the ``roles`` section (default LoRA rank 32 / alpha 64 on :data:`DEFAULT_LORA_TARGETS`).
        guidance: the distilled guidance embedding value (ignored when ``guidance_embeds`` is false).
        resolution: image side in pixels (default 1024); the latent side is ``resolution / vae factor``, even.
        max_sequence_length: T5 tokens (the pipeline's default 512).
        scheduler: the scheduler config (dynamic-shift constants); source: the directory loaded (for export).
        text_embedder: optional module ``prompts -> (T5 seq, CLIP pooled)`` used instead of the text encoders
            (then ``clip`` and ``t5`` may be ``None``): precomputed embeddings for benchmarks (:mod:`fewstep_rl.perf.arch`).
    """

    family = "flux"

    def __init__(self, transformer: nn.Module, clip: tuple[Any, nn.Module] | None, t5: tuple[Any, nn.Module] | None,
                 vae: nn.Module, *, roles: RolesConfig | None = None, guidance: float = 3.5,
                 resolution: int = 1024, max_sequence_length: int = 512, prompt_cache_size: int = 256,
                 scheduler: dict[str, Any] | None = None, source: Path | None = None,
                 text_embedder: nn.Module | None = None) -> None:
        super().__init__()
        cfg = transformer.config
        if text_embedder is None and (clip is None or t5 is None):
            raise BackboneLoadError("flux needs CLIP and T5 (tokenizer, encoder) pairs (or a text_embedder)")
        self.text_embedder = text_embedder
        self.clip_tokenizer, self.clip_encoder = clip or (None, None)
        self.t5_tokenizer, self.t5_encoder = t5 or (None, None)
        self.components = tuple(m for m in (self.clip_encoder, self.t5_encoder) if m is not None)
        if vae.config.latent_channels * 4 != cfg.in_channels:
            raise BackboneLoadError(f"vae/config.json latent_channels={vae.config.latent_channels} packs to "
                                    f"{4 * vae.config.latent_channels} channels, transformer in_channels={cfg.in_channels}")
        if text_embedder is None:
            self._check_text(cfg)
        factor = 2 ** (len(vae.config.block_out_channels) - 1)
        side = int(resolution) // factor
        if side % 2 or int(resolution) % factor:
            raise BackboneLoadError(f"resolution {resolution} must be a multiple of 2x the VAE factor {factor}")
        self.guidance = float(guidance)
        self.max_sequence_length = int(max_sequence_length)
        self._setup(transformer, vae, roles, DEFAULT_LORA_TARGETS, (int(vae.config.latent_channels), side, side),
                    source, scheduler or {}, prompt_cache_size)

    def _check_text(self, cfg: Any) -> None:
        if int(self.t5_encoder.config.d_model) != cfg.joint_attention_dim:
            raise BackboneLoadError(f"text_encoder_2 (T5) width {self.t5_encoder.config.d_model} != transformer "
                                    f"joint_attention_dim={cfg.joint_attention_dim}")
        if int(self.clip_encoder.config.hidden_size) != cfg.pooled_projection_dim:
            raise BackboneLoadError(f"text_encoder (CLIP) width {self.clip_encoder.config.hidden_size} != "
                                    f"transformer pooled_projection_dim={cfg.pooled_projection_dim}")

    @classmethod
    def from_pretrained(cls, path: str | Path, *, roles: RolesConfig | None = None,
                        dtype: torch.dtype = torch.float32, **kwargs: Any) -> FluxBackbone:
        """Load a local ``FluxPipeline`` directory (layout in the module docstring); ``kwargs`` as the constructor."""
        from diffusers import AutoencoderKL, FluxTransformer2DModel
        from transformers import CLIPTextModel, T5EncoderModel

        root = Path(path)
        load = load_parts(root, cls.family, dtype)
        parts = dict(
            transformer=load(FluxTransformer2DModel, "transformer", True),
            clip=(load_tokenizer(root, "tokenizer", cls.family), load(CLIPTextModel, "text_encoder", False)),
            t5=(load_tokenizer(root, "tokenizer_2", cls.family), load(T5EncoderModel, "text_encoder_2", False)),
            vae=load(AutoencoderKL, "vae", True))
        try:
            return cls(**parts, roles=roles, scheduler=read_scheduler(root), source=root, **kwargs)
        except BackboneLoadError as e:
            raise BackboneLoadError(f"flux world {root}: {e}") from None

    def _encode(self, prompts: list[str]) -> dict[str, Tensor]:
        """``FluxPipeline.encode_prompt``: CLIP ``pooler_output`` and T5 ``last_hidden_state`` (padded)."""
        if self.text_embedder is not None:
            seq, pooled = self.text_embedder(prompts)
            return {"seq": seq, "pooled": pooled}

        def ids(tok: Any, n: int, dev: torch.device) -> Tensor:
            return tok(prompts, padding="max_length", max_length=n, truncation=True,
                       return_tensors="pt").input_ids.to(dev)

        clip, t5 = self.clip_encoder, self.t5_encoder
        pooled = clip(ids(self.clip_tokenizer, self.clip_tokenizer.model_max_length, clip.device),
                      output_hidden_states=False).pooler_output
        seq = t5(ids(self.t5_tokenizer, self.max_sequence_length, t5.device), output_hidden_states=False)[0]
        return {"seq": seq, "pooled": pooled}

    def image_tokens(self) -> int:
        return self.sample_shape[1] * self.sample_shape[2] // 4

    def _mu(self, num_steps: int) -> float:
        s = self.scheduler_config
        return flux_mu(self.image_tokens(), s.get("base_image_seq_len", 256), s.get("max_image_seq_len", 4096),
                       s.get("base_shift", 0.5), s.get("max_shift", 1.15))

    def _pack(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape  # FluxPipeline._pack_latents
        return x.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, h * w // 4, c * 4)

    def _unpack(self, tokens: Tensor) -> Tensor:
        c, h, w = self.sample_shape  # FluxPipeline._unpack_latents
        b = tokens.shape[0]
        return tokens.view(b, h // 2, w // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, c, h, w)

    def _forward(self, model: nn.Module, tokens: Tensor, t: Tensor, cond: dict[str, Tensor]) -> Tensor:
        _, h, w = self.sample_shape
        img_ids = torch.zeros(h // 2, w // 2, 3)  # FluxPipeline._prepare_latent_image_ids
        img_ids[..., 1] += torch.arange(h // 2)[:, None]
        img_ids[..., 2] += torch.arange(w // 2)[None, :]
        dev, dt = tokens.device, tokens.dtype
        seq = cond["seq"]
        guidance = None
        if model.config.guidance_embeds:
            guidance = torch.full((tokens.shape[0],), self.guidance, device=dev, dtype=torch.float32)
        return model(hidden_states=tokens, timestep=t, guidance=guidance, pooled_projections=cond["pooled"],
                     encoder_hidden_states=seq, txt_ids=torch.zeros(seq.shape[1], 3, device=dev, dtype=dt),
                     img_ids=img_ids.reshape(-1, 3).to(dev, dt), return_dict=False)[0]

    def decode(self, x: Tensor) -> Tensor:
        """Scaled latents → images in [0, 1] (differentiable; the pipeline's decode + post-processing)."""
        cfg = self.vae.config
        img = self._vae().decode(x.to(dtype_of(self.vae)) / cfg.scaling_factor + cfg.shift_factor, return_dict=False)[0]
        return (img / 2 + 0.5).clamp(0, 1).to(x.dtype)

    def encode(self, images: Tensor) -> Tensor:
        """Images in [0, 1] → scaled latents (VAE posterior mean)."""
        cfg = self.vae.config
        mean = self._vae().encode((2 * images - 1).to(dtype_of(self.vae))).latent_dist.mean
        return ((mean - cfg.shift_factor) * cfg.scaling_factor).to(images.dtype)
