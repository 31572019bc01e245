"""The ``zimage`` backbone: Z-Image (Tongyi-MAI; Z-Image, Z-Image-Turbo) — ``ZImageTransformer2DModel``, a Qwen3
text encoder with its chat template, and a FLUX-style ``AutoencoderKL``.

World directory (diffusers format, local only)::

    transformer/   ZImageTransformer2DModel          text_encoder/ + tokenizer/   Qwen3Model + its tokenizer
    vae/           AutoencoderKL                     scheduler/                   FlowMatchEulerDiscreteScheduler

Prediction (``ZImagePipeline.__call__``). The transformer takes a *list* of per-sample latents ``(C, 1, H, W)``,
a timestep in the reversed convention ``t = 1 − σ`` (computed as the pipeline does, ``(1000 − 1000σ)/1000``) and a
list of per-prompt caption features, and returns ``−v``; so ``v = −transformer([x_i], 1 − σ, [cap_i])``
(methods.md §1.1 convention, no other conversion). CFG: the pipeline's ``pos + g (pos − neg)`` is our
``v(∅) + ω (v(c) − v(∅))`` with ``ω = g + 1`` (its ``guidance_scale = 0`` is our 1, no CFG); its
``cfg_normalization``/``cfg_truncation`` options are off by default and not implemented.

Prompts (``ZImagePipeline._encode_prompt``): the user message through ``tokenizer.apply_chat_template(...,
add_generation_prompt=True, enable_thinking=True)``, tokens padded to ``max_sequence_length`` (512), the
second-to-last hidden state of the text encoder, kept only where the attention mask is on (variable length per
prompt; rows cached per prompt string, padded with a mask in a batch, the padding dropped again before the call).

Space: scaled latents ``z = (E(img) − shift)·scale`` (16 channels); ``decode(z) = (D(z/scale + shift)/2 + 0.5)
.clamp(0, 1)``. Schedule: the scheduler's static ``shift`` (Turbo: 3) is ``default_shift``;
:meth:`ZImageBackbone.pipeline_sigmas` gives the pipeline's exact default grid.
Roles: :func:`fewstep_rl.roles.build_store` over the transformer, LoRA on :data:`DEFAULT_LORA_TARGETS` (the
single-stream attention projections, as TDM-R1's Z-Image LoRA).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from fewstep_rl.backbones.base import Backbone, BackboneLoadError
from fewstep_rl.backbones.loading import dtype_of, load_model, load_tokenizer, read_shift
from fewstep_rl.backbones.varlen import PromptRows, VarLenPrompts, clean_base, equivalent_shift, scheduler_sigmas
from fewstep_rl.roles import RolesConfig, build_store

DEFAULT_LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
_FAMILY = "zimage"


class ZImageBackbone(VarLenPrompts, Backbone):
    """Frozen Z-Image DiT + Qwen3 text encoder + VAE, with LoRA or full-copy roles.

    Args:
        transformer: a ``diffusers.ZImageTransformer2DModel``.
        text_encoder, tokenizer: the Qwen3 text model and its tokenizer (with a chat template).
        vae: an ``AutoencoderKL``.
        scheduler: the directory's scheduler (kept for ``save_pretrained``; ``None``: a default one).
        roles: the ``roles`` section (default LoRA on :data:`DEFAULT_LORA_TARGETS`).
        resolution: latent side (image side / VAE factor); default 128 (1024 px).
        max_sequence_length: token count the prompt is padded/truncated to (the pipeline's 512).
        prompt_cache_size: prompt encodings kept (LRU; the null prompt always).
        text_embedder: optional module ``prompts -> (seq (B, L, D), _)`` used instead of the text encoder (then
            ``text_encoder``/``tokenizer`` may be ``None``; every prompt keeps ``L`` tokens): precomputed embeddings
            for benchmarks (:mod:`fewstep_rl.perf.arch`).
        guidance_null_prompt: the unconditional prompt of CFG (the pipeline's default negative prompt ``""``).
    """

    def __init__(
        self, transformer: nn.Module, text_encoder: nn.Module | None, tokenizer: Any, vae: nn.Module, scheduler: Any = None,
        *, roles: RolesConfig | None = None, resolution: int | None = None, max_sequence_length: int = 512,
        prompt_cache_size: int = 256, guidance_null_prompt: str = "",
        text_embedder: nn.Module | None = None,
    ) -> None:
        super().__init__()
        cfg = transformer.config
        if text_embedder is None and (text_encoder is None or tokenizer is None):
            raise BackboneLoadError("zimage needs a text encoder and tokenizer (or a text_embedder)")
        if text_embedder is None and int(text_encoder.config.hidden_size) != int(cfg.cap_feat_dim):
            raise BackboneLoadError(f"text_encoder hidden_size={text_encoder.config.hidden_size} != transformer "
                                    f"cap_feat_dim={cfg.cap_feat_dim}")
        self.text_embedder = text_embedder
        if int(vae.config.latent_channels) != int(cfg.in_channels):
            raise BackboneLoadError(f"vae latent_channels={vae.config.latent_channels} != transformer "
                                    f"in_channels={cfg.in_channels}")
        self.transformer, self.text_encoder, self.tokenizer, self.vae = transformer, text_encoder, tokenizer, vae
        for m in (transformer, text_encoder, vae):
            if m is not None:
                m.requires_grad_(False).eval()
        self.scheduler = scheduler
        side = int(resolution or 128)
        if side % 2:
            raise BackboneLoadError(f"zimage latent side must be even (2×2 patches), got {side}")
        self.sample_shape = (int(cfg.in_channels), side, side)
        self.default_shift = equivalent_shift(scheduler, self._tokens())
        self.max_sequence_length = int(max_sequence_length)
        self.guidance_null_prompt = guidance_null_prompt
        self._rows = PromptRows(self._encode, prompt_cache_size)
        self._null: Tensor | None = None
        self.store = build_store(roles, transformer, default_targets=DEFAULT_LORA_TARGETS, family=_FAMILY)

    @classmethod
    def from_pretrained(cls, path: str | Path, *, roles: RolesConfig | None = None, dtype: torch.dtype = torch.float32,
                        **kwargs: Any) -> ZImageBackbone:
        """Load a local diffusers Z-Image directory (layout in the module docstring); other keyword arguments as in
        the constructor. Raises :class:`BackboneLoadError` naming the file on any missing or mismatched part."""
        from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, ZImageTransformer2DModel
        from transformers import Qwen3Model

        root = Path(path)
        if not root.is_dir():
            raise BackboneLoadError(f"zimage world directory {root} does not exist (or is not a directory)")
        transformer = load_model(ZImageTransformer2DModel, root, "transformer", dtype, True, _FAMILY)
        text_encoder = load_model(Qwen3Model, root, "text_encoder", dtype, False, _FAMILY)
        vae = load_model(AutoencoderKL, root, "vae", dtype, True, _FAMILY)
        read_shift(root)  # (a readable scheduler config, or none)
        sched = (FlowMatchEulerDiscreteScheduler.from_pretrained(root / "scheduler", local_files_only=True)
                 if (root / "scheduler").is_dir() else None)
        try:
            return cls(transformer, text_encoder, load_tokenizer(root, "tokenizer", _FAMILY), vae, sched,
                       roles=roles, **kwargs)
        except BackboneLoadError as e:
            raise BackboneLoadError(f"zimage world {root}: {e}") from None

    def save_pretrained(self, path: str | Path) -> None:
        """Write the (merged) base as a ``ZImagePipeline`` directory (roles are not saved)."""
        from diffusers import FlowMatchEulerDiscreteScheduler, ZImagePipeline

        sched = self.scheduler or FlowMatchEulerDiscreteScheduler(shift=3.0)
        ZImagePipeline(scheduler=sched, vae=self.vae, text_encoder=self.text_encoder, tokenizer=self.tokenizer,
                       transformer=clean_base(self.transformer, self.store)).save_pretrained(Path(path))

    # ---------------------------------------------------------------- schedule
    def pipeline_sigmas(self, num_steps: int) -> Tensor:
        """The pipeline's default σ grid for ``num_steps`` (``get_default_z_image_sigmas`` through the directory's
        scheduler, ``μ`` of this resolution), final 0 included: ``(num_steps + 1,)``."""
        return scheduler_sigmas(self.scheduler, torch.linspace(1.0, 1 / num_steps, num_steps).tolist(), self._tokens())

    def _tokens(self) -> int:
        return (self.sample_shape[1] // 2) * (self.sample_shape[2] // 2)

    # ---------------------------------------------------------------- conditioning
    @torch.no_grad()
    def _encode(self, prompts: list[str]) -> list[Tensor]:
        """Per-prompt caption features as ``ZImagePipeline._encode_prompt``."""
        if self.text_embedder is not None:
            return list(self.text_embedder(prompts)[0].unbind(0))
        text = [self.tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                                   add_generation_prompt=True, enable_thinking=True) for p in prompts]
        dev = self.text_encoder.device
        tok = self.tokenizer(text, padding="max_length", max_length=self.max_sequence_length, truncation=True,
                             return_tensors="pt")
        mask = tok.attention_mask.to(dev).bool()
        h = self.text_encoder(input_ids=tok.input_ids.to(dev), attention_mask=mask,
                              output_hidden_states=True).hidden_states[-2]
        return [h[i][mask[i]] for i in range(len(prompts))]

    # ---------------------------------------------------------------- decoding
    def decode(self, x: Tensor) -> Tensor:
        """Latents → images in [0, 1] (differentiable; the pipeline's decode and post-processing)."""
        cfg = self.vae.config
        img = self.vae.decode(x.to(dtype_of(self.vae)) / cfg.scaling_factor + cfg.shift_factor, return_dict=False)[0]
        return (img / 2 + 0.5).clamp(0, 1).to(x.dtype)

    def encode(self, images: Tensor) -> Tensor:
        """Images in [0, 1] → latents (posterior mean, shifted and scaled)."""
        cfg = self.vae.config
        mean = self.vae.encode((2 * images - 1).to(dtype_of(self.vae))).latent_dist.mean
        return ((mean - cfg.shift_factor) * cfg.scaling_factor).to(images.dtype)

    # ---------------------------------------------------------------- prediction
    def _predict(self, x: Tensor, sigma: Tensor, cond: dict[str, Tensor], role: str | None) -> Tensor:
        model = self.store.activate(role)
        dt = dtype_of(model)
        t = (1000 - 1000 * sigma.float()) / 1000  # the pipeline's (1000 − timestep) / 1000, timestep = 1000σ
        caps = [s[m] for s, m in zip(cond["seq"].to(dt), cond["mask"])]
        out = model(list(x.to(dt).unsqueeze(2).unbind(0)), t, caps, return_dict=False)[0]  # t float32, as the pipeline
        return -torch.stack([o.float() for o in out]).squeeze(2).to(x.dtype)

    def fsdp_units(self) -> Iterator[nn.Module]:
        """Every block (refiners and main layers) and transformer (base and full copies), the text encoder, VAE."""
        for t in self.store.networks():
            yield from (*t.noise_refiner, *t.context_refiner, *t.layers)
            yield t
        yield from (m for m in (self.text_encoder, self.vae) if m is not None)
