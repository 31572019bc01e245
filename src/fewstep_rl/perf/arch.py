"""Real architectures from their configs (random weights, nothing downloaded) and precomputed text embeddings.

One :class:`Arch` per published model, holding the values of its diffusers ``transformer/config.json`` and
``vae/config.json`` (sources cited beside each dict) and the shape of its prompt embedding. The text side is not
built: :class:`RandomTextEmbedder` returns fixed random embeddings of the real shapes, one row per prompt, as the
backbone's prompt cache would hold them; every family's backbone takes it as ``text_embedder``. The text encoders'
parameter counts (for ``fewstep-rl plan``) come from their configs, built on the meta device.

=================  ========  ==================================================================================
``--arch``          world     prompt embedding (tokens × width, pooled)
=================  ========  ==================================================================================
sd3.5-medium        sd3       77 CLIP + 256 T5 = 333 × 4096, pooled 2 × CLIP = 2048
flux.1-dev          flux      512 T5 tokens × 4096 (``max_sequence_length`` 512), pooled CLIP-L 768
flux.2-klein-4b     flux2     512 tokens × 3 stacked Qwen3-4B hidden states (3 × 2560 = 7680), no pooled
z-image-turbo       zimage    128 tokens × 2560 (Qwen3-4B; an assumed prompt length, see below), no pooled
qwen-image          qwen_image 128 tokens × 3584 (Qwen2.5-VL-7B; an assumed prompt length), no pooled
tiny[-<world>]      each      the same family at a width that runs in a CPU test
=================  ========  ==================================================================================

Z-Image and Qwen-Image keep only a prompt's own tokens (variable length; the pipelines' 512 is a cap, not a
padding): the benchmark fixes every prompt at 128 tokens (chat template included), an assumption of a typical
prompt, not a published value.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from fewstep_rl.sampling.noise import stable_hash


@dataclass(frozen=True)
class Arch:
    """One architecture: transformer + VAE configs, the prompt-embedding shape and the text encoders.

    Attributes:
        world: the world (backbone family) the architecture belongs to.
        transformer, vae: constructor arguments of the family's transformer / VAE class.
        text_tokens, text_dim, pooled_dim: one prompt's embedding: ``(text_tokens, text_dim)`` (+ ``pooled_dim``).
        text_encoders: ``(transformers class name, config kwargs)`` per text encoder (``fewstep-rl plan``'s weights
            line); ``text_params`` overrides the count when the configs are not spelled out.
        vae_factor: image pixels per latent pixel.
    """

    world: str
    transformer: dict[str, Any]
    vae: dict[str, Any] | None
    text_tokens: int
    text_dim: int
    pooled_dim: int = 0
    text_encoders: tuple[tuple[str, dict[str, Any]], ...] = ()
    text_label: str = ""
    text_params: int = 0
    vae_factor: int = 8
    notes: str = ""


# ------------------------------------------------------------------------------------------------ sd3
SD35_MEDIUM_TRANSFORMER: dict[str, Any] = {  # stabilityai/stable-diffusion-3.5-medium transformer/config.json
    "sample_size": 128, "patch_size": 2, "in_channels": 16, "out_channels": 16, "num_layers": 24,
    "attention_head_dim": 64, "num_attention_heads": 24, "joint_attention_dim": 4096,
    "caption_projection_dim": 1536, "pooled_projection_dim": 2048, "pos_embed_max_size": 384,
    "dual_attention_layers": tuple(range(13)), "qk_norm": "rms_norm",
}
SD35_VAE: dict[str, Any] = {  # stabilityai/stable-diffusion-3.5-medium vae/config.json
    "in_channels": 3, "out_channels": 3, "down_block_types": ("DownEncoderBlock2D",) * 4,
    "up_block_types": ("UpDecoderBlock2D",) * 4, "block_out_channels": (128, 256, 512, 512), "layers_per_block": 2,
    "latent_channels": 16, "norm_num_groups": 32, "sample_size": 1024, "scaling_factor": 1.5305,
    "shift_factor": 0.0609, "use_quant_conv": False, "use_post_quant_conv": False, "force_upcast": True,
}
#: Parameter counts of SD3.5's text encoders (CLIP ViT-L/14 text 123.7 M, OpenCLIP ViT-bigG/14 text 694.7 M,
#: T5-XXL encoder 4.762 B), from their transformers configs.
SD3_TEXT_ENCODER_PARAMS = 123_650_304 + 694_659_840 + 4_762_310_656
TINY_TRANSFORMER: dict[str, Any] = {
    "sample_size": 8, "patch_size": 2, "in_channels": 16, "out_channels": 16, "num_layers": 2,
    "attention_head_dim": 8, "num_attention_heads": 2, "joint_attention_dim": 32, "caption_projection_dim": 16,
    "pooled_projection_dim": 16, "pos_embed_max_size": 32, "dual_attention_layers": (0,), "qk_norm": "rms_norm",
}
TINY_VAE: dict[str, Any] = {**SD35_VAE, "block_out_channels": (8, 8, 8, 8), "layers_per_block": 1,
                            "norm_num_groups": 4, "sample_size": 64}

# ------------------------------------------------------------------------------------------------ flux
#: black-forest-labs/FLUX.1-dev transformer/config.json (the same values appear verbatim in many public loaders,
#: e.g. ones that rebuild the gated repo's config offline: 19 double + 38 single blocks, 24 heads × 128).
FLUX1_DEV_TRANSFORMER: dict[str, Any] = {
    "patch_size": 1, "in_channels": 64, "num_layers": 19, "num_single_layers": 38, "attention_head_dim": 128,
    "num_attention_heads": 24, "joint_attention_dim": 4096, "pooled_projection_dim": 768, "guidance_embeds": True,
    "axes_dims_rope": (16, 56, 56),
}
#: FLUX.1-dev vae/config.json (16 latent channels, scale 0.3611, shift 0.1159, no quant convs); Z-Image ships the
#: same VAE (Tongyi-MAI/Z-Image-Turbo vae/config.json carries these values too).
FLUX1_VAE: dict[str, Any] = {**SD35_VAE, "scaling_factor": 0.3611, "shift_factor": 0.1159,
                             "mid_block_add_attention": True}
CLIP_L_TEXT: dict[str, Any] = {  # FLUX.1-dev text_encoder/config.json (openai/clip-vit-large-patch14 text tower)
    "hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12,
    "max_position_embeddings": 77, "vocab_size": 49408, "projection_dim": 768, "hidden_act": "quick_gelu",
}
T5_XXL: dict[str, Any] = {  # FLUX.1-dev text_encoder_2/config.json (google/t5-v1_1-xxl encoder)
    "d_model": 4096, "d_ff": 10240, "d_kv": 64, "num_heads": 64, "num_layers": 24, "vocab_size": 32128,
    "feed_forward_proj": "gated-gelu",
}
TINY_FLUX_TRANSFORMER: dict[str, Any] = {
    "patch_size": 1, "in_channels": 64, "num_layers": 1, "num_single_layers": 1, "attention_head_dim": 16,
    "num_attention_heads": 2, "joint_attention_dim": 32, "pooled_projection_dim": 16, "guidance_embeds": True,
    "axes_dims_rope": (4, 4, 8),
}
TINY_FLUX_VAE: dict[str, Any] = {**FLUX1_VAE, "block_out_channels": (8, 8, 8, 8), "layers_per_block": 1,
                                 "norm_num_groups": 4, "sample_size": 64}

# ------------------------------------------------------------------------------------------------ flux2
#: black-forest-labs/FLUX.2-klein-4B transformer/config.json: 5 double + 20 single blocks, 24 heads × 128,
#: joint_attention_dim 7680 (= 3 stacked Qwen3-4B hidden states × 2560), in_channels 128, mlp_ratio 3, no guidance
#: embedding (values as published and copied verbatim in public loaders that rebuild the config offline).
FLUX2_KLEIN_4B_TRANSFORMER: dict[str, Any] = {
    "patch_size": 1, "in_channels": 128, "out_channels": None, "num_layers": 5, "num_single_layers": 20,
    "attention_head_dim": 128, "num_attention_heads": 24, "joint_attention_dim": 7680,
    "timestep_guidance_channels": 256, "mlp_ratio": 3.0, "axes_dims_rope": (32, 32, 32, 32), "rope_theta": 2000,
    "eps": 1e-6, "guidance_embeds": False,
}
#: FLUX.2 vae/config.json (``AutoencoderKLFlux2``, shared by FLUX.2-dev and klein): 32 latent channels, patch 2×2
#: (its ``force_upcast: true`` is not a constructor argument of this class and is left out).
FLUX2_VAE: dict[str, Any] = {
    "in_channels": 3, "out_channels": 3, "down_block_types": ("DownEncoderBlock2D",) * 4,
    "up_block_types": ("UpDecoderBlock2D",) * 4, "block_out_channels": (128, 256, 512, 512), "layers_per_block": 2,
    "act_fn": "silu", "latent_channels": 32, "norm_num_groups": 32, "sample_size": 1024,
    "use_quant_conv": True, "use_post_quant_conv": True, "mid_block_add_attention": True,
    "batch_norm_eps": 1e-4, "batch_norm_momentum": 0.1, "patch_size": (2, 2),
}
QWEN3_4B: dict[str, Any] = {  # Qwen3-4B: klein's text_encoder/config.json and Z-Image-Turbo's
    "hidden_size": 2560, "intermediate_size": 9728, "num_hidden_layers": 36, "num_attention_heads": 32,
    "num_key_value_heads": 8, "head_dim": 128, "vocab_size": 151936, "max_position_embeddings": 40960,
    "tie_word_embeddings": True, "rope_theta": 1_000_000,
}
TINY_FLUX2_TRANSFORMER: dict[str, Any] = {
    "patch_size": 1, "in_channels": 128, "num_layers": 1, "num_single_layers": 1, "attention_head_dim": 16,
    "num_attention_heads": 2, "joint_attention_dim": 48, "timestep_guidance_channels": 32, "mlp_ratio": 3.0,
    "axes_dims_rope": (4, 4, 4, 4), "guidance_embeds": False,
}
TINY_FLUX2_VAE: dict[str, Any] = {**FLUX2_VAE, "block_out_channels": (8, 8, 8, 8), "layers_per_block": 1,
                                  "norm_num_groups": 4, "sample_size": 64}

# ------------------------------------------------------------------------------------------------ zimage
#: Tongyi-MAI/Z-Image-Turbo transformer/config.json (30 layers + 2 refiner layers, dim 3840, 30 heads,
#: cap_feat_dim 2560 = Qwen3-4B), as copied verbatim (with its URL) in public ports of the model.
Z_IMAGE_TURBO_TRANSFORMER: dict[str, Any] = {
    "all_patch_size": (2,), "all_f_patch_size": (1,), "in_channels": 16, "dim": 3840, "n_layers": 30,
    "n_refiner_layers": 2, "n_heads": 30, "n_kv_heads": 30, "norm_eps": 1e-5, "qk_norm": True,
    "cap_feat_dim": 2560, "rope_theta": 256.0, "t_scale": 1000.0, "axes_dims": (32, 48, 48),
    "axes_lens": (1536, 512, 512),
}
TINY_ZIMAGE_TRANSFORMER: dict[str, Any] = {
    "all_patch_size": (2,), "all_f_patch_size": (1,), "in_channels": 16, "dim": 32, "n_layers": 1,
    "n_refiner_layers": 1, "n_heads": 2, "n_kv_heads": 2, "cap_feat_dim": 16, "axes_dims": (8, 4, 4),
    "axes_lens": (256, 32, 32),
}

# ------------------------------------------------------------------------------------------------ qwen_image
#: Qwen/Qwen-Image transformer/config.json: 60 MMDiT blocks, 24 heads × 128, joint_attention_dim 3584
#: (Qwen2.5-VL-7B), in_channels 64 (16 × 2×2 packing), out_channels 16, no guidance embedding.
QWEN_IMAGE_TRANSFORMER: dict[str, Any] = {
    "patch_size": 2, "in_channels": 64, "out_channels": 16, "num_layers": 60, "attention_head_dim": 128,
    "num_attention_heads": 24, "joint_attention_dim": 3584, "guidance_embeds": False, "axes_dims_rope": (16, 56, 56),
}
#: Qwen/Qwen-Image vae/config.json: z_dim 16, temporal downsampling (F, T, T) and the per-channel latents mean/std
#: are the published values; base_dim 96, dim_mult (1, 2, 4, 4), num_res_blocks 2, no attention scales are the
#: diffusers ``AutoencoderKLQwenImage`` defaults, which that config repeats (not re-checked value by value here).
QWEN_IMAGE_VAE: dict[str, Any] = {
    "base_dim": 96, "z_dim": 16, "dim_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_scales": [],
    "temperal_downsample": [False, True, True], "dropout": 0.0,  # (lists: the class concatenates them)
    "latents_mean": [-0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508, 0.4134, -0.0715, 0.5517,
                     -0.3632, -0.1922, -0.9497, 0.2503, -0.2921],
    "latents_std": [2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743, 3.2687, 2.1526, 2.8652, 1.5579,
                    1.6382, 1.1253, 2.8251, 1.916],
}
#: Qwen-Image text_encoder/config.json (Qwen2.5-VL-7B): the language model and the vision tower (loaded with the
#: text encoder, unused for text prompts; values as in Qwen2.5-VL-7B-Instruct's config.json copied in public code).
QWEN25_VL_7B_TEXT: dict[str, Any] = {
    "hidden_size": 3584, "num_hidden_layers": 28, "num_attention_heads": 28, "num_key_value_heads": 4,
    "intermediate_size": 18944, "vocab_size": 152064, "max_position_embeddings": 128000,
    "tie_word_embeddings": False,
}
QWEN25_VL_7B_VISION: dict[str, Any] = {
    "depth": 32, "hidden_size": 1280, "intermediate_size": 3420, "num_heads": 16, "out_hidden_size": 3584,
    "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2, "window_size": 112,
    "fullatt_block_indexes": [7, 15, 23, 31],
}
TINY_QWEN_TRANSFORMER: dict[str, Any] = {
    "patch_size": 2, "in_channels": 64, "out_channels": 16, "num_layers": 1, "attention_head_dim": 16,
    "num_attention_heads": 2, "joint_attention_dim": 16, "axes_dims_rope": (8, 4, 4),
}
TINY_QWEN_VAE: dict[str, Any] = {**QWEN_IMAGE_VAE, "base_dim": 8, "num_res_blocks": 1}

#: Prompt tokens of the variable-length families (an assumed typical prompt; see the module docstring).
VARLEN_TOKENS = 128

ARCHS: dict[str, Arch] = {
    "sd3.5-medium": Arch("sd3", SD35_MEDIUM_TRANSFORMER, SD35_VAE, text_tokens=77 + 256, text_dim=4096,
                         pooled_dim=2048, text_label="CLIP-L, CLIP-G, T5-XXL", text_params=SD3_TEXT_ENCODER_PARAMS,
                         notes="Stable Diffusion 3.5 Medium (2.5B MMDiT)"),
    "tiny": Arch("sd3", TINY_TRANSFORMER, TINY_VAE, text_tokens=16, text_dim=32, pooled_dim=16,
                 notes="SD3.5-M's family at test width"),
    "flux.1-dev": Arch("flux", FLUX1_DEV_TRANSFORMER, FLUX1_VAE, text_tokens=512, text_dim=4096, pooled_dim=768,
                       text_encoders=(("CLIPTextModel", CLIP_L_TEXT), ("T5EncoderModel", T5_XXL)),
                       text_label="CLIP-L, T5-XXL", notes="FLUX.1-dev (12B MMDiT + single-stream)"),
    "tiny-flux": Arch("flux", TINY_FLUX_TRANSFORMER, TINY_FLUX_VAE, text_tokens=16, text_dim=32, pooled_dim=16,
                      notes="FLUX.1's family at test width"),
    "flux.2-klein-4b": Arch("flux2", FLUX2_KLEIN_4B_TRANSFORMER, FLUX2_VAE, text_tokens=512, text_dim=7680,
                            text_encoders=(("Qwen3ForCausalLM", QWEN3_4B),), text_label="Qwen3-4B",
                            vae_factor=16, notes="FLUX.2 [klein] 4B"),
    "tiny-flux2": Arch("flux2", TINY_FLUX2_TRANSFORMER, TINY_FLUX2_VAE, text_tokens=16, text_dim=48, vae_factor=16,
                       notes="FLUX.2-klein's family at test width"),
    "z-image-turbo": Arch("zimage", Z_IMAGE_TURBO_TRANSFORMER, FLUX1_VAE, text_tokens=VARLEN_TOKENS, text_dim=2560,
                          text_encoders=(("Qwen3Model", QWEN3_4B),), text_label="Qwen3-4B",
                          notes="Z-Image-Turbo (6B single-stream DiT)"),
    "tiny-zimage": Arch("zimage", TINY_ZIMAGE_TRANSFORMER, TINY_FLUX_VAE, text_tokens=16, text_dim=16,
                        notes="Z-Image's family at test width"),
    "qwen-image": Arch("qwen_image", QWEN_IMAGE_TRANSFORMER, QWEN_IMAGE_VAE, text_tokens=VARLEN_TOKENS, text_dim=3584,
                       text_encoders=(("Qwen2_5_VLForConditionalGeneration", {"text_config": QWEN25_VL_7B_TEXT,
                                                                              "vision_config": QWEN25_VL_7B_VISION}),),
                       text_label="Qwen2.5-VL-7B", notes="Qwen-Image (20B MMDiT)"),
    "tiny-qwen_image": Arch("qwen_image", TINY_QWEN_TRANSFORMER, TINY_QWEN_VAE, text_tokens=16, text_dim=16,
                            notes="Qwen-Image's family at test width"),
}
#: The CPU-test architecture of each world.
TINY = {"sd3": "tiny", "flux": "tiny-flux", "flux2": "tiny-flux2", "zimage": "tiny-zimage",
        "qwen_image": "tiny-qwen_image"}
#: The real architecture each world benchmarks by default.
DEFAULT = {"sd3": "sd3.5-medium", "flux": "flux.1-dev", "flux2": "flux.2-klein-4b", "zimage": "z-image-turbo",
           "qwen_image": "qwen-image"}
_CLASSES = {  # world -> (transformer class, VAE class) in diffusers
    "sd3": ("SD3Transformer2DModel", "AutoencoderKL"), "flux": ("FluxTransformer2DModel", "AutoencoderKL"),
    "flux2": ("Flux2Transformer2DModel", "AutoencoderKLFlux2"), "zimage": ("ZImageTransformer2DModel", "AutoencoderKL"),
    "qwen_image": ("QwenImageTransformer2DModel", "AutoencoderKLQwenImage"),
}


def get_arch(name: str, world: str | None = None) -> Arch:
    """The architecture ``name`` (``world``: it must belong to that world). Raises ``ValueError`` (one line)."""
    if name not in ARCHS:
        raise ValueError(f"unknown arch {name!r}; known: {', '.join(ARCHS)}")
    a = ARCHS[name]
    if world is not None and a.world != world:
        mine = ", ".join(k for k, v in ARCHS.items() if v.world == world) or "none"
        raise ValueError(f"arch {name!r} belongs to world {a.world!r}, not {world!r} (archs of {world}: {mine})")
    return a


def _diffusers_class(name: str) -> type:
    import diffusers

    return getattr(diffusers, name)


def transformer_params(cfg: dict[str, Any], world: str = "sd3") -> int:
    """Parameter count of a ``world`` transformer config (built on the meta device: no memory)."""
    with torch.device("meta"):
        m = _diffusers_class(_CLASSES[world][0])(**cfg)
    return sum(p.numel() for p in m.parameters())


def text_encoder_params(arch: Arch) -> int:
    """Parameters of ``arch``'s text encoders (``text_params``, or their transformers configs built on meta)."""
    if arch.text_params or not arch.text_encoders:
        return arch.text_params
    import transformers

    n = 0
    for cls_name, cfg in arch.text_encoders:
        cls = getattr(transformers, cls_name)
        with torch.device("meta"):
            m = cls(cls.config_class(**cfg))
        n += sum(p.numel() for p in m.parameters())  # tied embeddings count once (parameters() deduplicates)
    return n


def build_transformer(arch: Arch, device: str | torch.device, dtype: torch.dtype, seed: int = 0) -> nn.Module:
    """The transformer with random weights (PyTorch/diffusers default init, seeded), built on ``device``."""
    cls = _diffusers_class(_CLASSES[arch.world][0])
    with torch.random.fork_rng(devices=[]), _default_dtype(dtype), torch.device(device):
        torch.manual_seed(seed)
        m = cls(**arch.transformer)
    return m.eval()


def build_vae(arch: Arch, device: str | torch.device, dtype: torch.dtype, seed: int = 1) -> nn.Module | None:
    if arch.vae is None:
        return None
    cls = _diffusers_class(_CLASSES[arch.world][1])
    with torch.random.fork_rng(devices=[]), _default_dtype(dtype), torch.device(device):
        torch.manual_seed(seed)
        m = cls(**arch.vae)
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
    with the backbone. ``pooled`` may be 0 (families without a pooled embedding).
    """

    def __init__(self, prompts: Sequence[str], tokens: int, dim: int, pooled: int, dtype: torch.dtype,
                 device: str | torch.device = "cpu", seed: int = 0) -> None:
        super().__init__()
        names = ["", *dict.fromkeys(p for p in prompts if p)]
        self.index = {p: i for i, p in enumerate(names)}
        gen = torch.Generator(device="cpu").manual_seed(seed)
        seq = torch.empty(len(names), tokens, dim, dtype=dtype, device=device)
        pool = torch.empty(len(names), pooled, dtype=dtype, device=device)
        if seq.device.type != "meta":
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


def _sd3(t: nn.Module, vae: nn.Module | None, emb: nn.Module, roles: Any, resolution: int, factor: int) -> Any:
    from fewstep_rl.backbones.sd3 import SD3Backbone

    side = resolution // factor if vae is not None else resolution
    return SD3Backbone(t, [], None, vae, roles=roles, resolution=side, default_shift=3.0, text_embedder=emb)


def _flux(t: nn.Module, vae: nn.Module, emb: nn.Module, roles: Any, resolution: int, factor: int) -> Any:
    from fewstep_rl.backbones.flux import FluxBackbone

    return FluxBackbone(t, None, None, vae, roles=roles, resolution=resolution, text_embedder=emb)


def _flux2(t: nn.Module, vae: nn.Module, emb: nn.Module, roles: Any, resolution: int, factor: int) -> Any:
    from fewstep_rl.backbones.flux2 import Flux2Backbone

    return Flux2Backbone(t, None, vae, roles=roles, resolution=resolution, text_embedder=emb)


def _zimage(t: nn.Module, vae: nn.Module, emb: nn.Module, roles: Any, resolution: int, factor: int) -> Any:
    from fewstep_rl.backbones.zimage import ZImageBackbone

    return ZImageBackbone(t, None, None, vae, roles=roles, resolution=resolution // factor, text_embedder=emb)


def _qwen_image(t: nn.Module, vae: nn.Module, emb: nn.Module, roles: Any, resolution: int, factor: int) -> Any:
    from fewstep_rl.backbones.qwen_image import QwenImageBackbone

    return QwenImageBackbone(t, None, None, vae, roles=roles, resolution=resolution // factor, text_embedder=emb)


_BACKBONES: dict[str, Callable[..., Any]] = {"sd3": _sd3, "flux": _flux, "flux2": _flux2, "zimage": _zimage,
                                             "qwen_image": _qwen_image}


def build_backbone(arch: Arch, prompts: Sequence[str], *, device: str | torch.device, dtype: torch.dtype,
                   resolution: int, roles: Any = None, with_vae: bool = True, seed: int = 0) -> Any:
    """The family's backbone over random weights of ``arch`` and precomputed prompt embeddings (``resolution`` in
    image pixels); ``roles``: a :class:`~fewstep_rl.roles.RolesConfig` (default LoRA rank 32, alpha 64).
    ``with_vae=False`` (``sd3`` only): pixel space."""
    if not with_vae and arch.world != "sd3":
        raise ValueError(f"with_vae=False needs the sd3 world (the {arch.world} backbone needs its VAE)")
    t = build_transformer(arch, device, dtype, seed)
    vae = build_vae(arch, device, dtype) if with_vae else None
    emb = RandomTextEmbedder(prompts, arch.text_tokens, arch.text_dim, arch.pooled_dim, dtype, device, seed)
    return _BACKBONES[arch.world](t, vae, emb, roles, resolution, arch.vae_factor)


#: The SD3 name of :func:`build_backbone` (kept for callers of the first version).
build_sd3_backbone = build_backbone


def default_lora_targets(world: str, transformer: nn.Module) -> tuple[str, ...]:
    """The LoRA targets the ``world``'s backbone adapts by default (before filtering to existing modules)."""
    import importlib

    mod = importlib.import_module(f"fewstep_rl.backbones.{world}")
    if hasattr(mod, "lora_targets"):
        return tuple(mod.lora_targets(transformer))
    return tuple(mod.DEFAULT_LORA_TARGETS)


#: Attributes of the family transformers that hold their repeated blocks (each block is one FSDP2 unit).
BLOCK_LISTS = ("transformer_blocks", "single_transformer_blocks", "noise_refiner", "context_refiner", "layers")


def transformer_blocks(transformer: nn.Module) -> list[nn.Module]:
    """The transformer's repeated blocks, in order (every family: :data:`BLOCK_LISTS`)."""
    return [b for name in BLOCK_LISTS for b in getattr(transformer, name, ())]
