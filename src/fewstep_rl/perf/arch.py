"""Real architectures from their configs (random weights, nothing downloaded) and precomputed text embeddings.

``ARCHS["sd3.5-medium"]`` holds the values of Stable Diffusion 3.5 Medium's ``transformer/config.json`` and
``vae/config.json`` (24 MMDiT layers, 24 heads × 64 = 1536 wide, patch 2, 16 latent channels, joint attention
dim 4096, pooled 2048, caption projection 1536, RMS q/k norm, dual attention in layers 0–12, pos-embed max size
384; VAE 128/256/512/512 with 16 latent channels, scale 1.5305, shift 0.0609, no quant convs). The text side is
not built: :class:`RandomTextEmbedder` returns fixed random embeddings of the real shapes — 77 CLIP tokens + 256
T5 tokens = 333 tokens × 4096, pooled 2 × CLIP projections = 2048 — one row per prompt, as the backbone's prompt
cache would hold them. ``ARCHS["tiny"]`` is the same family at a width that runs in a CPU test.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from fewstep_rl.sampling.noise import stable_hash


@dataclass(frozen=True)
class Arch:
    """One architecture: transformer + VAE configs and the prompt-embedding shape."""

    transformer: dict[str, Any]
    vae: dict[str, Any] | None
    text_tokens: int
    vae_factor: int = 8
    notes: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


SD35_MEDIUM_TRANSFORMER: dict[str, Any] = {
    "sample_size": 128, "patch_size": 2, "in_channels": 16, "out_channels": 16, "num_layers": 24,
    "attention_head_dim": 64, "num_attention_heads": 24, "joint_attention_dim": 4096,
    "caption_projection_dim": 1536, "pooled_projection_dim": 2048, "pos_embed_max_size": 384,
    "dual_attention_layers": tuple(range(13)), "qk_norm": "rms_norm",
}
SD35_VAE: dict[str, Any] = {
    "in_channels": 3, "out_channels": 3, "down_block_types": ("DownEncoderBlock2D",) * 4,
    "up_block_types": ("UpDecoderBlock2D",) * 4, "block_out_channels": (128, 256, 512, 512), "layers_per_block": 2,
    "latent_channels": 16, "norm_num_groups": 32, "sample_size": 1024, "scaling_factor": 1.5305,
    "shift_factor": 0.0609, "use_quant_conv": False, "use_post_quant_conv": False, "force_upcast": True,
}
TINY_TRANSFORMER: dict[str, Any] = {
    "sample_size": 8, "patch_size": 2, "in_channels": 16, "out_channels": 16, "num_layers": 2,
    "attention_head_dim": 8, "num_attention_heads": 2, "joint_attention_dim": 32, "caption_projection_dim": 16,
    "pooled_projection_dim": 16, "pos_embed_max_size": 32, "dual_attention_layers": (0,), "qk_norm": "rms_norm",
}
TINY_VAE: dict[str, Any] = {**SD35_VAE, "block_out_channels": (8, 8, 8, 8), "layers_per_block": 1,
                            "norm_num_groups": 4, "sample_size": 64}

ARCHS: dict[str, Arch] = {
    "sd3.5-medium": Arch(SD35_MEDIUM_TRANSFORMER, SD35_VAE, text_tokens=77 + 256,
                         notes="Stable Diffusion 3.5 Medium (2.5B MMDiT)"),
    "tiny": Arch(TINY_TRANSFORMER, TINY_VAE, text_tokens=16, notes="SD3.5-M's family at test width"),
}


def get_arch(name: str) -> Arch:
    if name not in ARCHS:
        raise ValueError(f"unknown arch {name!r}; known: {', '.join(ARCHS)}")
    return ARCHS[name]


def transformer_params(cfg: dict[str, Any]) -> int:
    """Parameter count of an ``SD3Transformer2DModel`` config (built on the meta device: no memory)."""
    from diffusers import SD3Transformer2DModel

    with torch.device("meta"):
        m = SD3Transformer2DModel(**cfg)
    return sum(p.numel() for p in m.parameters())


def build_transformer(arch: Arch, device: str | torch.device, dtype: torch.dtype, seed: int = 0) -> nn.Module:
    """The transformer with random weights (PyTorch/diffusers default init, seeded), built on ``device``."""
    from diffusers import SD3Transformer2DModel

    with torch.random.fork_rng(devices=[]), _default_dtype(dtype), torch.device(device):
        torch.manual_seed(seed)
        m = SD3Transformer2DModel(**arch.transformer)
    return m.eval()


def build_vae(arch: Arch, device: str | torch.device, dtype: torch.dtype, seed: int = 1) -> nn.Module | None:
    from diffusers import AutoencoderKL

    if arch.vae is None:
        return None
    with torch.random.fork_rng(devices=[]), _default_dtype(dtype), torch.device(device):
        torch.manual_seed(seed)
        m = AutoencoderKL(**arch.vae)
    return m.eval()


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype) -> Iterator[None]:
    """Build modules directly in ``dtype`` (no fp32 transient of the whole model, no cast warning)."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


class RandomTextEmbedder(nn.Module):
    """Precomputed random prompt embeddings of the real shapes: ``prompts -> (seq (B, L, D), pooled (B, P))``.

    Each prompt of ``prompts`` (plus the null prompt ``""``) owns one fixed row drawn once from a seeded generator;
    another prompt string maps to the row ``stable_hash(prompt) mod rows``. The rows are buffers, so they move
    with the backbone.
    """

    def __init__(self, prompts: Sequence[str], tokens: int, dim: int, pooled: int, dtype: torch.dtype,
                 device: str | torch.device = "cpu", seed: int = 0) -> None:
        super().__init__()
        names = ["", *dict.fromkeys(p for p in prompts if p)]
        self.index = {p: i for i, p in enumerate(names)}
        gen = torch.Generator(device="cpu").manual_seed(seed)
        seq = torch.empty(len(names), tokens, dim, dtype=dtype, device=device)
        pool = torch.empty(len(names), pooled, dtype=dtype, device=device)
        for i in range(len(names)):  # row by row: the fp32 draw of one row is small even at real width
            seq[i] = torch.randn(tokens, dim, generator=gen).to(seq)
            pool[i] = torch.randn(pooled, generator=gen).to(pool)
        self.register_buffer("seq", seq, persistent=False)
        self.register_buffer("pooled", pool, persistent=False)

    def row(self, prompt: str) -> int:
        return self.index.get(prompt, stable_hash("embed", prompt) % len(self.index))

    def forward(self, prompts: Sequence[str]) -> tuple[Tensor, Tensor]:
        idx = torch.tensor([self.row(p) for p in prompts], device=self.seq.device)
        return self.seq[idx], self.pooled[idx]


def build_sd3_backbone(arch: Arch, prompts: Sequence[str], *, device: str | torch.device, dtype: torch.dtype,
                       resolution: int, roles: Any = None, with_vae: bool = True, seed: int = 0) -> Any:
    """An :class:`~fewstep_rl.backbones.sd3.SD3Backbone` over random weights of ``arch`` and precomputed prompt
    embeddings (``resolution`` in image pixels; the sample side is ``resolution / vae_factor`` with a VAE);
    ``roles``: a :class:`~fewstep_rl.roles.RolesConfig` (default LoRA rank 32, alpha 64)."""
    from fewstep_rl.backbones.sd3 import SD3Backbone

    t = build_transformer(arch, device, dtype, seed)
    vae = build_vae(arch, device, dtype) if with_vae else None
    side = resolution // arch.vae_factor if vae is not None else resolution
    emb = RandomTextEmbedder(prompts, arch.text_tokens, int(t.config.joint_attention_dim),
                             int(t.config.pooled_projection_dim), dtype, device, seed)
    return SD3Backbone(t, [], None, vae, roles=roles, resolution=side, default_shift=3.0, text_embedder=emb)
