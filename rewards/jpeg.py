"""JPEG (in)compressibility (DDPO, Black et al. 2023): the size of the image saved as JPEG by PIL.

``r(x) = −size_kB`` (``compressibility``) or ``+size_kB`` (``incompressibility``), with ``size_kB`` = bytes / 1000 of
the PIL JPEG encoding at the configured quality (default 95, as in DDPO). Deterministic, weight-free, a black box
(rewards.md §4): a flat grey 512² image is ≈ 4.7 kB, uniform noise ≈ 307 kB.
"""

from __future__ import annotations

import dataclasses
import io
from collections.abc import Sequence
from typing import Literal

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from fewstep_rl.config import knob
from fewstep_rl.rewards.base import Reward


@dataclasses.dataclass
class JpegConfig:
    """Knobs of :class:`JpegCompressibility`."""

    quality: int = knob(95, "PIL JPEG quality in [1, 100] (DDPO uses 95)")
    sign: Literal["compressibility", "incompressibility"] = knob(
        "compressibility", "compressibility: r = −size_kB (smaller files score higher); incompressibility: r = +size_kB"
    )

    def __post_init__(self) -> None:
        if not 1 <= self.quality <= 100:
            raise ValueError(f"jpeg reward: quality must lie in [1, 100], got {self.quality}")
        if self.sign not in ("compressibility", "incompressibility"):
            raise ValueError(f"jpeg reward: sign must be 'compressibility' or 'incompressibility', got {self.sign!r}")


def jpeg_size_kb(image: np.ndarray, quality: int) -> float:
    """Size in kB (1000 bytes) of an ``(H, W, 3)`` uint8 image encoded as JPEG at ``quality``."""
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="JPEG", quality=quality)
    return buf.tell() / 1000.0


class JpegCompressibility(Reward):
    """``r = ∓ JPEG size in kB`` of images ``(B, 3, H, W)`` in [0, 1] (black box)."""

    name = "jpeg"
    differentiable = False
    Config = JpegConfig

    def score(self, samples: Tensor, prompts: Sequence[str], meta: Sequence[dict]) -> Tensor:
        if samples.dim() != 4 or samples.shape[1] != 3:
            raise ValueError(
                f"reward 'jpeg' expects images of shape (B, 3, H, W) in [0, 1], got {tuple(samples.shape)}"
            )
        arr = (samples.float().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
        sizes = torch.tensor(
            [jpeg_size_kb(np.ascontiguousarray(a), self.cfg.quality) for a in arr], dtype=torch.float32
        )
        sign = -1.0 if self.cfg.sign == "compressibility" else 1.0
        return (sign * sizes).to(samples.device)
