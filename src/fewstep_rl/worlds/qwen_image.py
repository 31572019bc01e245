"""The ``qwen_image`` world: a local diffusers Qwen-Image directory (:mod:`fewstep_rl.backbones.qwen_image`).

Prompts, samples and checks are the ``sd3`` world's (prompt files, PNGs). ``world.resolution`` is in image pixels;
the latent side is ``resolution / 2^len(vae temperal_downsample)`` (8 for Qwen-Image) and must be even (2×2
packing). ``world.guidance`` is the ``true_cfg_scale`` (4 in the pipeline's examples) applied linearly (the
backbone's docstring gives the departure: no norm rescaling).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Literal

from fewstep_rl.config import knob
from fewstep_rl.perf.speed import SpeedFlags
from fewstep_rl.worlds.sd3 import _DTYPES, SD3World


@dataclass
class QwenImageWorldConfig(SpeedFlags):
    """The ``qwen_image`` world (``world.*`` keys)."""

    path: str = knob("", "local diffusers Qwen-Image directory (required; nothing is downloaded)")
    prompts: str = knob("", "training prompts: a text file, one prompt per line (required)")
    eval_prompts: str | None = knob(None, "evaluation prompts file (default: the training prompts)")
    guidance: float = knob(4.0, "teacher CFG scale ω (the pipeline's true_cfg_scale, applied linearly)")
    resolution: int = knob(1024, "image side in pixels")
    dtype: Literal["float32", "bfloat16", "float16"] = knob("float32", "dtype the frozen components load in")
    max_sequence_length: int = knob(512, "text tokens kept per prompt")
    cfg_renorm: bool = knob(False, "rescale CFG per token to the conditional norm (the pipeline's true CFG)")

    def __post_init__(self) -> None:
        if self.resolution < 2 or self.resolution % 2:
            raise ValueError(f"resolution must be a positive even number, got {self.resolution}")
        if self.guidance < 1.0:
            raise ValueError(f"guidance must be >= 1, got {self.guidance}")


class QwenImageWorld(SD3World):
    """A local diffusers Qwen-Image checkpoint with prompts from files."""

    name = "qwen_image"
    Config = QwenImageWorldConfig
    roles_defaults = {"rank": 32, "alpha": 64.0}

    def latent_side(self) -> int:
        """Latent side for ``world.resolution`` (VAE factor ``2^len(temperal_downsample)`` from ``vae/config.json``)."""
        f = self.dir / "vae" / "config.json"
        try:
            factor = 2 ** len(json.loads(f.read_text())["temperal_downsample"])
        except (OSError, ValueError, KeyError) as e:
            raise ValueError(f"world.path: cannot read the VAE config {str(f)!r} ({e})") from None
        side, rem = divmod(int(self.cfg.resolution), factor)
        if rem or side % 2:
            raise ValueError(f"world.resolution {self.cfg.resolution} must be a multiple of 2 × the VAE factor {factor}")
        return side

    def _load(self) -> Any:
        from fewstep_rl.backbones.qwen_image import QwenImageBackbone

        c = self.cfg
        return QwenImageBackbone.from_pretrained(self.dir, roles=self.roles_config(), dtype=_DTYPES[c.dtype],
                                                 resolution=self.latent_side(),
                                                 max_sequence_length=c.max_sequence_length,
                                                 cfg_renorm=c.cfg_renorm)
