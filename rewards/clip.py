"""CLIP-family rewards from a local transformers ``CLIPModel`` directory: ``pickscore`` and ``clip_score``.

* ``pickscore`` — PickScore v1 (Kirstain et al. 2023, arXiv 2305.01569): a fine-tuned CLIP ViT-H/14 whose score is
  ``logit_scale.exp() · cos(image_embed, text_embed)`` (≈ 100 · cos; the Flow-GRPO / RTDMD / TDM-R1 reward).
* ``clip_score`` — the same computation on any CLIP checkpoint, reported as ``scale · cos`` (default scale 1).

Both are differentiable: the pixel preprocessing is done in torch (bicubic resize of the short side to the model's
``image_size``, centre crop, CLIP mean/std normalisation), never through PIL, so gradients reach the samples
(rewards.md §3). Weights load with ``local_files_only`` from ``path`` — a directory written by
``CLIPModel.save_pretrained`` plus the tokenizer files (``vocab.json`` + ``merges.txt`` or ``tokenizer.json``); the
tokenizer may sit in a separate ``tokenizer_path``. Nothing is downloaded; a missing or unreadable directory is one
clear error naming it. With transformers 5 ``get_image_features``/``get_text_features`` return an output object;
the projected embedding is its ``pooler_output`` (handled here).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from fewstep_rl.config import knob
from fewstep_rl.rewards.base import Reward

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclasses.dataclass
class ClipRewardConfig:
    """Knobs of the CLIP-family rewards."""

    path: str = knob("", "local CLIPModel directory (save_pretrained layout); required")
    tokenizer_path: str | None = knob(None, "tokenizer directory (default: path)")
    scale: float | None = knob(None, "score = scale · cos; default: logit_scale.exp() for pickscore, 1 for clip_score")
    max_length: int = knob(77, "text tokens")


def clip_preprocess(images: Tensor, size: int) -> Tensor:
    """Differentiable CLIP preprocessing of images in [0, 1]: resize the short side to ``size`` (bicubic),
    centre-crop ``size × size``, normalise with the CLIP mean/std."""
    if images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"CLIP rewards expect images of shape (B, 3, H, W) in [0, 1], got {tuple(images.shape)}")
    h, w = images.shape[-2:]
    s = size / min(h, w)
    nh, nw = max(size, round(h * s)), max(size, round(w * s))
    x = F.interpolate(images, size=(nh, nw), mode="bicubic", align_corners=False, antialias=s < 1)
    top, left = (nh - size) // 2, (nw - size) // 2
    x = x[..., top : top + size, left : left + size]
    mean = torch.tensor(CLIP_MEAN, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    return (x - mean) / std


def _features(out: object) -> Tensor:
    return out if isinstance(out, Tensor) else out.pooler_output  # type: ignore[attr-defined]


class PickScore(Reward):
    """``logit_scale.exp() · cos(image, text)`` of a local PickScore (CLIP) checkpoint; differentiable."""

    name = "pickscore"
    differentiable = True
    Config = ClipRewardConfig
    default_logit_scale = True

    def __init__(self, cfg: ClipRewardConfig | None = None) -> None:
        super().__init__(cfg)
        from transformers import AutoTokenizer, CLIPModel

        path = Path(self.cfg.path) if self.cfg.path else None
        if path is None or not path.is_dir():
            raise ValueError(f"reward {self.name!r}: 'path' must be a local CLIPModel directory, got {self.cfg.path!r}")
        tok_path = Path(self.cfg.tokenizer_path) if self.cfg.tokenizer_path else path
        try:
            self.model = CLIPModel.from_pretrained(str(path), local_files_only=True).eval().requires_grad_(False)
        except (OSError, ValueError) as e:
            raise ValueError(f"reward {self.name!r}: cannot load a CLIPModel from {str(path)!r}: {e}") from None
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(str(tok_path), local_files_only=True)
        except (OSError, ValueError, TypeError) as e:
            raise ValueError(f"reward {self.name!r}: cannot load a tokenizer from {str(tok_path)!r}: {e}") from None
        self.image_size = int(self.model.config.vision_config.image_size)

    def scale(self) -> Tensor | float:
        if self.cfg.scale is not None:
            return float(self.cfg.scale)
        return self.model.logit_scale.exp() if self.default_logit_scale else 1.0

    def score(self, samples: Tensor, prompts: Sequence[str], meta: Sequence[dict]) -> Tensor:
        param = next(self.model.parameters())
        x = clip_preprocess(samples.to(param.device, param.dtype), self.image_size)
        tok = self.tokenizer(list(prompts), padding="max_length", truncation=True, max_length=self.cfg.max_length,
                             return_tensors="pt").to(param.device)
        img = F.normalize(_features(self.model.get_image_features(pixel_values=x)).float(), dim=-1)
        txt = F.normalize(_features(self.model.get_text_features(**tok)).float(), dim=-1)
        return (self.scale() * (img * txt).sum(-1)).to(samples.device)


class ClipScore(PickScore):
    """``scale · cos(image, text)`` of any local CLIP checkpoint (default scale 1); differentiable."""

    name = "clip_score"
    default_logit_scale = False
