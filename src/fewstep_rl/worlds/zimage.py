"""The ``zimage`` world: a local diffusers Z-Image / Z-Image-Turbo directory (:mod:`fewstep_rl.backbones.zimage`).

Prompts, samples and checks are the ``sd3`` world's (prompt files, PNGs, ``world.resolution`` in image pixels
divided by the VAE factor read from ``vae/config.json``). ``world.guidance`` is our CFG scale ω = the pipeline's
``guidance_scale`` + 1: 1 (no CFG) for Z-Image-Turbo, 5 for Z-Image (the pipeline's default 4).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from fewstep_rl.config import knob
from fewstep_rl.perf.speed import SpeedFlags
from fewstep_rl.worlds.sd3 import _DTYPES, SD3World


@dataclass
class ZImageWorldConfig(SpeedFlags):
    """The ``zimage`` world (``world.*`` keys)."""

    path: str = knob("", "local diffusers Z-Image(-Turbo) directory (required; nothing is downloaded)")
    prompts: str = knob("", "training prompts: a text file, one prompt per line (required)")
    eval_prompts: str | None = knob(None, "evaluation prompts file (default: the training prompts)")
    guidance: float = knob(1.0, "teacher CFG scale ω (= ZImagePipeline guidance_scale + 1; Turbo: 1)")
    resolution: int = knob(1024, "image side in pixels")
    dtype: Literal["float32", "bfloat16", "float16"] = knob("float32", "dtype the frozen components load in")
    max_sequence_length: int = knob(512, "text tokens per prompt (the pipeline's padding length)")

    def __post_init__(self) -> None:
        if self.resolution < 2 or self.resolution % 2:
            raise ValueError(f"resolution must be a positive even number, got {self.resolution}")
        if self.guidance < 1.0:
            raise ValueError(f"guidance must be >= 1, got {self.guidance}")


class ZImageWorld(SD3World):
    """A local diffusers Z-Image checkpoint with prompts from files."""

    name = "zimage"
    Config = ZImageWorldConfig
    roles_defaults = {"rank": 32, "alpha": 64.0}

    def _load(self) -> Any:
        from fewstep_rl.backbones.zimage import ZImageBackbone

        c = self.cfg
        side = self.latent_side()
        if side % 2:
            raise ValueError(f"world.resolution {c.resolution} gives an odd latent side {side} (Z-Image packs 2×2)")
        return ZImageBackbone.from_pretrained(self.dir, roles=self.roles_config(), dtype=_DTYPES[c.dtype],
                                              resolution=side, max_sequence_length=c.max_sequence_length)
