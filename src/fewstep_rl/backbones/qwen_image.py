"""The ``qwen_image`` backbone: Qwen-Image — ``QwenImageTransformer2DModel`` (MMDiT), a Qwen2.5-VL text encoder
with Qwen-Image's prompt template, and the 3-D ``AutoencoderKLQwenImage``.

World directory (diffusers format, local only)::

    transformer/   QwenImageTransformer2DModel       text_encoder/ + tokenizer/   Qwen2_5_VLForConditionalGeneration
    vae/           AutoencoderKLQwenImage            scheduler/                   FlowMatchEulerDiscreteScheduler

Space. The sampler works in the VAE's normalised latents ``z = (E(img) − mean)/std`` laid out ``(C, H, W)``;
``_predict`` packs them into the pipeline's 2×2 patch tokens ``(H/2·W/2, 4C)`` (``QwenImagePipeline._pack_latents``;
a permutation, so Euler steps are the same in either layout), passes ``img_shapes = [(1, H/2, W/2)]`` per sample and
unpacks the output. ``decode(z) = (D(z·std + mean)[:, :, 0]/2 + 0.5).clamp(0, 1)``.

Prediction (``QwenImagePipeline.__call__``): ``v = transformer(x, timestep = 1000σ/1000, text, mask)`` directly
(no sign or time conversion); the text mask is passed only when some row is padded, as the pipeline does.

Prompts (``QwenImagePipeline._get_qwen_prompt_embeds``): the prompt inside Qwen-Image's system/user template,
the last hidden state of the text encoder kept where the attention mask is on, minus the template's first 34
tokens (the pipeline's ``prompt_template_encode_start_idx``), at most ``max_sequence_length`` (512) tokens; rows
cached per prompt, zero-padded with a mask in a batch.

Schedule. The directory's scheduler uses dynamic shifting: ``μ`` from the image token count
(``calculate_shift``), exponential time shift ``e^μ/(e^μ + 1/σ − 1)`` = a static shift of ``e^μ``
(``default_shift``), then ``shift_terminal`` stretching; :meth:`QwenImageBackbone.pipeline_sigmas` gives the
pipeline's exact grid.

CFG. By default the framework's ``v(∅) + ω (v(c) − v(∅))`` (methods.md §1.1; every method's guidance algebra
assumes it), which is the pipeline's ``true_cfg_scale`` combination *before* its per-token norm rescaling
``comb·‖v(c)‖/‖comb‖`` (norms over the 4C channels of each packed token). ``cfg_renorm=True`` applies that
rescaling too, as the pipeline does (a departure from §1.1: the guided velocity is no longer linear in ω).

Roles: :func:`fewstep_rl.roles.build_store` over the transformer, LoRA on :data:`DEFAULT_LORA_TARGETS` (image and
text attention projections, as SD3's MMDiT).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from fewstep_rl.backbones.base import Backbone, BackboneLoadError
from fewstep_rl.backbones.loading import dtype_of, load_model, load_tokenizer
from fewstep_rl.backbones.varlen import PromptRows, VarLenPrompts, clean_base, equivalent_shift, scheduler_sigmas
from fewstep_rl.roles import RolesConfig, build_store

DEFAULT_LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")
TEMPLATE = ("<|im_start|>system\nDescribe the image by detailing the color, shape, size, texture, quantity, text, "
            "spatial relationships of the objects and background:<|im_end|>\n<|im_start|>user\n{}<|im_end|>\n"
            "<|im_start|>assistant\n")
TEMPLATE_DROP = 34  # template tokens before the prompt (QwenImagePipeline.prompt_template_encode_start_idx)
TOKENIZER_MAX = 1024  # QwenImagePipeline.tokenizer_max_length
_FAMILY = "qwen_image"


def pack(x: Tensor) -> Tensor:
    """``(B, C, H, W) → (B, H/2·W/2, 4C)``: 2×2 patches, channel-major inside a patch (``_pack_latents``)."""
    b, c, h, w = x.shape
    return x.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), 4 * c)


def unpack(x: Tensor, h: int, w: int) -> Tensor:
    """Inverse of :func:`pack`: ``(B, H/2·W/2, 4C) → (B, C, H, W)``."""
    b, _, c4 = x.shape
    return x.view(b, h // 2, w // 2, c4 // 4, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, c4 // 4, h, w)


class QwenImageBackbone(VarLenPrompts, Backbone):
    """Frozen Qwen-Image MMDiT + Qwen2.5-VL text encoder + Qwen-Image VAE, with LoRA or full-copy roles.

    Args:
        transformer, text_encoder, tokenizer, vae, scheduler: the directory's components (scheduler optional).
        roles: the ``roles`` section (default LoRA on :data:`DEFAULT_LORA_TARGETS`).
        resolution: latent side (image side / VAE factor 8; even); default 128 (1024 px).
        max_sequence_length: text tokens kept per prompt (the pipeline's 512).
        prompt_cache_size: prompt encodings kept (LRU; the null prompt always).
        text_embedder: optional module ``prompts -> (seq (B, L, D), _)`` used instead of the text encoder (then
            ``text_encoder``/``tokenizer`` may be ``None``; every prompt keeps ``L`` tokens): precomputed embeddings
            for benchmarks (:mod:`fewstep_rl.perf.arch`).
        guidance_null_prompt: the unconditional prompt of CFG (``""``; the pipeline needs an explicit one).
        cfg_renorm: rescale the CFG combination per token to the conditional prediction's norm (the pipeline's
            true CFG); default off (linear CFG).
    """

    def __init__(
        self, transformer: nn.Module, text_encoder: nn.Module | None, tokenizer: Any, vae: nn.Module, scheduler: Any = None,
        *, roles: RolesConfig | None = None, resolution: int | None = None, max_sequence_length: int = 512,
        prompt_cache_size: int = 256, guidance_null_prompt: str = "", cfg_renorm: bool = False,
        text_embedder: nn.Module | None = None,
    ) -> None:
        super().__init__()
        cfg = transformer.config
        if text_embedder is None and (text_encoder is None or tokenizer is None):
            raise BackboneLoadError("qwen_image needs a text encoder and tokenizer (or a text_embedder)")
        if text_embedder is None:
            width = int(text_encoder.config.get_text_config().hidden_size)
            if width != int(cfg.joint_attention_dim):
                raise BackboneLoadError(f"text_encoder hidden_size={width} != transformer joint_attention_dim="
                                        f"{cfg.joint_attention_dim}")
        self.text_embedder = text_embedder
        if 4 * int(vae.config.z_dim) != int(cfg.in_channels):
            raise BackboneLoadError(f"transformer in_channels={cfg.in_channels} != 4 × vae z_dim={vae.config.z_dim}")
        self.transformer, self.text_encoder, self.tokenizer, self.vae = transformer, text_encoder, tokenizer, vae
        for m in (transformer, text_encoder, vae):
            if m is not None:
                m.requires_grad_(False).eval()
        self.scheduler = scheduler
        side = int(resolution or 128)
        if side % 2:
            raise BackboneLoadError(f"qwen_image latent side must be even (2×2 packing), got {side}")
        self.sample_shape = (int(vae.config.z_dim), side, side)
        self.default_shift = equivalent_shift(scheduler, self._tokens())
        self.max_sequence_length = int(max_sequence_length)
        self.guidance_null_prompt = guidance_null_prompt
        self.cfg_renorm = bool(cfg_renorm)
        self._rows = PromptRows(self._encode, prompt_cache_size)
        self._null: Tensor | None = None
        z = int(vae.config.z_dim)
        self.register_buffer("latents_mean", torch.tensor(vae.config.latents_mean).view(1, z, 1, 1), persistent=False)
        self.register_buffer("latents_std", torch.tensor(vae.config.latents_std).view(1, z, 1, 1), persistent=False)
        self.store = build_store(roles, transformer, default_targets=DEFAULT_LORA_TARGETS, family=_FAMILY)

    @classmethod
    def from_pretrained(cls, path: str | Path, *, roles: RolesConfig | None = None, dtype: torch.dtype = torch.float32,
                        **kwargs: Any) -> QwenImageBackbone:
        """Load a local diffusers Qwen-Image directory (layout in the module docstring); other keyword arguments as
        in the constructor. Raises :class:`BackboneLoadError` naming the file on any missing or mismatched part."""
        from diffusers import AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler, QwenImageTransformer2DModel
        from transformers import Qwen2_5_VLForConditionalGeneration

        root = Path(path)
        if not root.is_dir():
            raise BackboneLoadError(f"qwen_image world directory {root} does not exist (or is not a directory)")
        transformer = load_model(QwenImageTransformer2DModel, root, "transformer", dtype, True, _FAMILY)
        text_encoder = load_model(Qwen2_5_VLForConditionalGeneration, root, "text_encoder", dtype, False, _FAMILY)
        vae = load_model(AutoencoderKLQwenImage, root, "vae", dtype, True, _FAMILY)
        try:
            sched = (FlowMatchEulerDiscreteScheduler.from_pretrained(root / "scheduler", local_files_only=True)
                     if (root / "scheduler").is_dir() else None)
        except Exception as e:  # noqa: BLE001
            raise BackboneLoadError(f"qwen_image world {root}: cannot read {root / 'scheduler'}: {e}") from None
        try:
            return cls(transformer, text_encoder, load_tokenizer(root, "tokenizer", _FAMILY), vae, sched,
                       roles=roles, **kwargs)
        except BackboneLoadError as e:
            raise BackboneLoadError(f"qwen_image world {root}: {e}") from None

    def save_pretrained(self, path: str | Path) -> None:
        """Write the (merged) base as a ``QwenImagePipeline`` directory (roles are not saved)."""
        from diffusers import FlowMatchEulerDiscreteScheduler, QwenImagePipeline

        QwenImagePipeline(scheduler=self.scheduler or FlowMatchEulerDiscreteScheduler(), vae=self.vae,
                          text_encoder=self.text_encoder, tokenizer=self.tokenizer,
                          transformer=clean_base(self.transformer, self.store)).save_pretrained(Path(path))

    # ---------------------------------------------------------------- schedule
    def pipeline_sigmas(self, num_steps: int) -> Tensor:
        """The pipeline's σ grid for ``num_steps`` at this resolution (``np.linspace(1, 1/k, k)`` through the
        directory's scheduler with dynamic shift), final 0 included: ``(num_steps + 1,)``."""
        import numpy as np

        return scheduler_sigmas(self.scheduler, np.linspace(1.0, 1 / num_steps, num_steps), self._tokens())

    def _tokens(self) -> int:
        return (self.sample_shape[1] // 2) * (self.sample_shape[2] // 2)

    # ---------------------------------------------------------------- conditioning
    @torch.no_grad()
    def _encode(self, prompts: list[str]) -> list[Tensor]:
        """Per-prompt text features as ``QwenImagePipeline._get_qwen_prompt_embeds`` + ``encode_prompt``."""
        if self.text_embedder is not None:
            return list(self.text_embedder(prompts)[0].unbind(0))
        dev = self.text_encoder.device
        tok = self.tokenizer([TEMPLATE.format(p) for p in prompts], max_length=TOKENIZER_MAX + TEMPLATE_DROP,
                             padding=True, truncation=True, return_tensors="pt").to(dev)
        h = self.text_encoder(input_ids=tok.input_ids, attention_mask=tok.attention_mask,
                              output_hidden_states=True).hidden_states[-1]
        mask = tok.attention_mask.bool()
        return [h[i][mask[i]][TEMPLATE_DROP:][: self.max_sequence_length] for i in range(len(prompts))]

    # ---------------------------------------------------------------- decoding
    def decode(self, x: Tensor) -> Tensor:
        """Latents → images in [0, 1] (differentiable; the pipeline's decode and post-processing)."""
        z = (x * self.latents_std + self.latents_mean).to(dtype_of(self.vae)).unsqueeze(2)
        img = self.vae.decode(z, return_dict=False)[0][:, :, 0]
        return (img / 2 + 0.5).clamp(0, 1).to(x.dtype)

    def encode(self, images: Tensor) -> Tensor:
        """Images in [0, 1] → normalised latents (posterior mean)."""
        mean = self.vae.encode((2 * images - 1).to(dtype_of(self.vae)).unsqueeze(2)).latent_dist.mean[:, :, 0]
        return ((mean.to(images.dtype) - self.latents_mean) / self.latents_std).to(images.dtype)

    # ---------------------------------------------------------------- prediction
    def velocity(self, x: Tensor, sigma: Tensor | float, cond: Any, role: str | None = "generator",
                 guidance: float = 1.0) -> Tensor:
        """:meth:`Backbone.velocity`; with ``cfg_renorm`` and ``guidance ≠ 1`` the pipeline's true CFG (the
        combination rescaled per packed token to the norm of the conditional prediction)."""
        if not self.cfg_renorm or guidance == 1.0:
            return super().velocity(x, sigma, cond, role, guidance)
        s = self._sigma_batch(sigma, x)
        both = super().velocity(torch.cat([x, x]), torch.cat([s, s]), self.cat_cond(cond, self.null_cond(len(x))),
                                role)
        v_c, v_u = both.chunk(2)
        comb, cond_p = pack(v_u + guidance * (v_c - v_u)), pack(v_c)
        comb = comb * (torch.norm(cond_p, dim=-1, keepdim=True) / torch.norm(comb, dim=-1, keepdim=True))
        return unpack(comb, *x.shape[-2:])

    def _predict(self, x: Tensor, sigma: Tensor, cond: dict[str, Tensor], role: str | None) -> Tensor:
        model = self.store.activate(role)
        dt = dtype_of(model)
        b, _, h, w = x.shape
        mask = cond["mask"]
        out = model(hidden_states=pack(x).to(dt), timestep=(1000 * sigma.float()).to(dt) / 1000,
                    encoder_hidden_states=cond["seq"].to(dt), encoder_hidden_states_mask=None if mask.all() else mask,
                    img_shapes=[[(1, h // 2, w // 2)]] * b, return_dict=False)[0]
        return unpack(out, h, w).to(x.dtype)

    def fsdp_units(self) -> Iterator[nn.Module]:
        """Every transformer block and transformer (base and full copies), the text encoder and the VAE."""
        for t in self.store.networks():
            yield from t.transformer_blocks
            yield t
        yield from (m for m in (self.text_encoder, self.vae) if m is not None)
