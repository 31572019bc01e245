"""The ``flux2`` backbone: FLUX.2-klein — a diffusers ``Flux2Transformer2DModel`` with a Qwen3 text encoder.

World directory (diffusers format, always local), as ``Flux2KleinPipeline``::

    transformer/                     Flux2Transformer2DModel            required
    text_encoder/ + tokenizer/       Qwen3ForCausalLM + Qwen2 tokenizer  required (chat template)
    vae/                             AutoencoderKLFlux2                 required (its batch-norm statistics)
    scheduler/                       (the klein shift is the pipeline's empirical μ; nothing is read)

Prompts (``Flux2KleinPipeline._get_qwen3_prompt_embeds``): each prompt is wrapped in the tokenizer's chat template
(one user message, generation prompt, ``enable_thinking=False``), padded to ``max_sequence_length`` with its
attention mask, and the hidden states ``text_layers`` (9, 18, 27) are stacked on the feature axis: ``(B, L, n·D)``.
Text RoPE ids are ``(0, 0, 0, l)``.

Space. The sampler works in the pipeline's latent space: VAE latents patchified 2×2 into ``4C`` channels and
normalised by the VAE's batch-norm running statistics, shape ``(4C, H/2, W/2)``. ``_predict`` packs that grid
row-major into a token sequence (image ids ``(0, row, col, 0)``) and back. ``decode`` denormalises, un-patchifies,
decodes and maps to [0, 1] as the pipeline does; ``encode`` is its inverse (posterior mode).

Prediction: ``v = transformer(x, timestep = (1000σ)/1000, seq)``, no guidance embedding (klein has none; a
checkpoint with ``guidance_embeds`` gets ``guidance``). CFG against the empty prompt is the base class's batched form
(the pipeline's ``guidance_scale`` of a non-distilled checkpoint). Schedule: the pipeline's dynamic shift with
:func:`fewstep_rl.sampling.sigmas.flux2_mu` (image tokens and step count); :meth:`sigmas`, :meth:`schedule_shift`.

Roles: LoRA (or full copies) on the double blocks' attention and context projections, the single blocks' fused
qkv-mlp projection and their out projection (methods.md §2.2, RTDMD's FLUX.2 targets).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from fewstep_rl.backbones.base import BackboneLoadError
from fewstep_rl.backbones.flux import FluxFamily, load_parts, read_scheduler
from fewstep_rl.backbones.loading import dtype_of, load_tokenizer
from fewstep_rl.roles import RolesConfig
from fewstep_rl.sampling.sigmas import flux2_mu

#: LoRA targets of FLUX.2 (double blocks' attention + context projections, single blocks' fused projection); the
#: single blocks' ``attn.to_out`` is added per block (a bare ``to_out`` would also name the double blocks' list).
DEFAULT_LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
                        "to_qkv_mlp_proj")


def lora_targets(transformer: nn.Module) -> tuple[str, ...]:
    """:data:`DEFAULT_LORA_TARGETS` + each single block's ``attn.to_out`` (the default LoRA targets of ``transformer``)."""
    return DEFAULT_LORA_TARGETS + tuple(f"single_transformer_blocks.{i}.attn.to_out"
                                        for i in range(len(transformer.single_transformer_blocks)))


class Flux2Backbone(FluxFamily):
    """Frozen FLUX.2-klein transformer + Qwen3 text encoder + Flux2 VAE, with LoRA or full-copy roles.

    Args:
        transformer: a ``Flux2Transformer2DModel``; text: ``(tokenizer, Qwen3ForCausalLM)``; vae: ``AutoencoderKLFlux2``.
        roles: the ``roles`` section (default LoRA rank 32 / alpha 64 on :data:`DEFAULT_LORA_TARGETS` + single-block
            out projections).
        resolution: image side in pixels; the latent side ``resolution / vae factor`` must be even.
        max_sequence_length: text tokens (the pipeline's 512); text_layers: hidden states stacked (9, 18, 27).
        guidance: the guidance embedding of a checkpoint that has one (klein does not).
        text_embedder: optional module ``prompts -> (seq (B, L, n·D), _)`` used instead of the text encoder (then
            ``text`` may be ``None``): precomputed embeddings for benchmarks (:mod:`fewstep_rl.perf.arch`).
    """

    family = "flux2"

    def __init__(self, transformer: nn.Module, text: tuple[Any, nn.Module] | None, vae: nn.Module, *,
                 roles: RolesConfig | None = None, resolution: int = 1024, max_sequence_length: int = 512,
                 text_layers: tuple[int, ...] = (9, 18, 27), guidance: float = 4.0, prompt_cache_size: int = 256,
                 scheduler: dict[str, Any] | None = None, source: Path | None = None,
                 text_embedder: nn.Module | None = None) -> None:
        super().__init__()
        cfg = transformer.config
        if text is None and text_embedder is None:
            raise BackboneLoadError("flux2 needs a (tokenizer, text encoder) pair (or a text_embedder)")
        self.text_embedder = text_embedder
        self.tokenizer, self.text_encoder = text or (None, None)
        self.components = (self.text_encoder,) if self.text_encoder is not None else ()
        c = int(vae.config.latent_channels) * 4
        if c != cfg.in_channels:
            raise BackboneLoadError(f"vae/config.json latent_channels={vae.config.latent_channels} patchifies to {c} "
                                    f"channels, transformer in_channels={cfg.in_channels}")
        if text_embedder is None:
            self._check_text(cfg, text_layers)
        factor = 2 ** (len(vae.config.block_out_channels) - 1)
        side = int(resolution) // factor
        if side % 2 or int(resolution) % factor:
            raise BackboneLoadError(f"resolution {resolution} must be a multiple of 2x the VAE factor {factor}")
        self.text_layers, self.max_sequence_length = tuple(int(k) for k in text_layers), int(max_sequence_length)
        self.guidance = float(guidance)
        self._setup(transformer, vae, roles, lora_targets(transformer), (c, side // 2, side // 2), source,
                    scheduler or {}, prompt_cache_size)

    def _check_text(self, cfg: Any, text_layers: tuple[int, ...]) -> None:
        n_hidden = int(self.text_encoder.config.num_hidden_layers)
        if not text_layers or max(text_layers) > n_hidden:
            raise BackboneLoadError(f"text_layers {list(text_layers)} exceed the text encoder's {n_hidden} layers")
        width = len(text_layers) * int(self.text_encoder.config.hidden_size)
        if width != cfg.joint_attention_dim:
            raise BackboneLoadError(f"{len(text_layers)} text layers x width {self.text_encoder.config.hidden_size} "
                                    f"= {width} != transformer joint_attention_dim={cfg.joint_attention_dim}")
        if not getattr(self.tokenizer, "chat_template", None):
            raise BackboneLoadError("tokenizer/ has no chat template (Flux2KleinPipeline wraps prompts in it)")

    @classmethod
    def from_pretrained(cls, path: str | Path, *, roles: RolesConfig | None = None,
                        dtype: torch.dtype = torch.float32, **kwargs: Any) -> Flux2Backbone:
        """Load a local ``Flux2KleinPipeline`` directory (layout in the module docstring); ``kwargs`` as the
        constructor."""
        from diffusers import AutoencoderKLFlux2, Flux2Transformer2DModel
        from transformers import Qwen3ForCausalLM

        root = Path(path)
        load = load_parts(root, cls.family, dtype)
        parts = dict(transformer=load(Flux2Transformer2DModel, "transformer", True),
                     text=(load_tokenizer(root, "tokenizer", cls.family), load(Qwen3ForCausalLM, "text_encoder", False)),
                     vae=load(AutoencoderKLFlux2, "vae", True))
        try:
            return cls(**parts, roles=roles, scheduler=read_scheduler(root), source=root, **kwargs)
        except BackboneLoadError as e:
            raise BackboneLoadError(f"flux2 world {root}: {e}") from None

    def _encode(self, prompts: list[str]) -> dict[str, Tensor]:
        """``Flux2KleinPipeline._get_qwen3_prompt_embeds``: chat template, padded, hidden states stacked."""
        if self.text_embedder is not None:
            return {"seq": self.text_embedder(prompts)[0]}
        tok, enc = self.tokenizer, self.text_encoder
        texts = [tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True,
                                         enable_thinking=False) for p in prompts]
        rows = [tok(t, return_tensors="pt", padding="max_length", truncation=True, max_length=self.max_sequence_length)
                for t in texts]
        ids = torch.cat([r["input_ids"] for r in rows]).to(enc.device)
        mask = torch.cat([r["attention_mask"] for r in rows]).to(enc.device)
        hidden = enc(input_ids=ids, attention_mask=mask, output_hidden_states=True, use_cache=False).hidden_states
        out = torch.stack([hidden[k] for k in self.text_layers], dim=1)  # (B, n, L, D)
        b, n, length, d = out.shape
        return {"seq": out.permute(0, 2, 1, 3).reshape(b, length, n * d)}

    def image_tokens(self) -> int:
        return self.sample_shape[1] * self.sample_shape[2]

    def _mu(self, num_steps: int) -> float:
        return flux2_mu(self.image_tokens(), num_steps)

    def _pack(self, x: Tensor) -> Tensor:
        return x.reshape(x.shape[0], x.shape[1], -1).permute(0, 2, 1)  # Flux2KleinPipeline._pack_latents

    def _unpack(self, tokens: Tensor) -> Tensor:
        return tokens.permute(0, 2, 1).reshape(tokens.shape[0], *self.sample_shape)

    def _forward(self, model: nn.Module, tokens: Tensor, t: Tensor, cond: dict[str, Tensor]) -> Tensor:
        _, h, w = self.sample_shape
        b, dev, seq = tokens.shape[0], tokens.device, cond["seq"]
        one = torch.arange(1)
        img_ids = torch.cartesian_prod(one, torch.arange(h), torch.arange(w), one)  # (T, H, W, L)
        txt_ids = torch.cartesian_prod(one, one, one, torch.arange(seq.shape[1]))
        guidance = None
        if model.config.guidance_embeds:
            guidance = torch.full((b,), self.guidance, device=dev, dtype=torch.float32)
        out = model(hidden_states=tokens, timestep=t, guidance=guidance, encoder_hidden_states=seq,
                    txt_ids=txt_ids.expand(b, -1, -1).to(dev), img_ids=img_ids.expand(b, -1, -1).to(dev),
                    return_dict=False)[0]
        return out[:, : tokens.shape[1]]

    def _bn(self, x: Tensor) -> tuple[Tensor, Tensor]:
        bn = self.vae.bn
        mean = bn.running_mean.view(1, -1, 1, 1).to(x)
        return mean, torch.sqrt(bn.running_var.view(1, -1, 1, 1) + self.vae.config.batch_norm_eps).to(x)

    def decode(self, x: Tensor) -> Tensor:
        """Normalised patchified latents → images in [0, 1] (differentiable; the pipeline's decode)."""
        z = x.to(dtype_of(self.vae))
        mean, std = self._bn(z)
        z = z * std + mean
        b, c, h, w = z.shape  # Flux2KleinPipeline._unpatchify_latents
        z = z.reshape(b, c // 4, 2, 2, h, w).permute(0, 1, 4, 2, 5, 3).reshape(b, c // 4, h * 2, w * 2)
        img = self._vae().decode(z, return_dict=False)[0]
        return (img / 2 + 0.5).clamp(0, 1).to(x.dtype)

    def encode(self, images: Tensor) -> Tensor:
        """Images in [0, 1] → normalised patchified latents (posterior mode, as the pipeline's image encoding)."""
        z = self._vae().encode((2 * images - 1).to(dtype_of(self.vae))).latent_dist.mode()
        b, c, h, w = z.shape  # Flux2KleinPipeline._patchify_latents
        z = z.view(b, c, h // 2, 2, w // 2, 2).permute(0, 1, 3, 5, 2, 4).reshape(b, c * 4, h // 2, w // 2)
        mean, std = self._bn(z)
        return ((z - mean) / std).to(images.dtype)
