"""The ``glyphs`` world's gold judge: rapidocr 3.x recognition (a real OCR model nobody here trained).

Each 16×48 strip is resized 3× (bilinear) and padded by 1/12 of its height (edge pixels) before rapidocr reads it as
one text line (recognition only, no detector, no angle classifier); both choices come from the pilot in the README
(rendered ground truth is read exactly). Scores: accuracy ``max(0, 1 − Lev(pred, word) / len(word))``
(:func:`fewstep_rl.rewards.ocr.ocr_accuracy`) and exact match (:func:`fewstep_rl.rewards.ocr.ocr_exact`). The
engine is built once per process (about 0.4 s) and reused.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache
from typing import Any

import torch
from torch import Tensor

UPSCALE, PAD = 3.0, 1.0 / 12.0


@lru_cache(maxsize=1)
def engine() -> Any:
    """The shared rapidocr reader (:class:`fewstep_rl.rewards.ocr.OcrReward` with the judge's settings)."""
    from fewstep_rl.rewards.ocr import OcrConfig, OcrReward

    return OcrReward(OcrConfig(upscale=UPSCALE, pad=PAD))


def read(images: Tensor) -> list[str]:
    """The text the judge reads in each ``(B, 3, H, W)`` image in [0, 1]."""
    return engine().read(images)


def judge(images: Tensor, targets: Sequence[str]) -> tuple[Tensor, Tensor]:
    """(accuracy ``(B,)`` float in [0, 1], exact match ``(B,)`` bool) of ``images`` against the target words."""
    from fewstep_rl.rewards.ocr import ocr_accuracy, ocr_exact

    preds = read(images)
    acc = torch.tensor([ocr_accuracy(p, t) for p, t in zip(preds, targets)], dtype=torch.float32)
    exact = torch.tensor([ocr_exact(p, t) for p, t in zip(preds, targets)], dtype=torch.bool)
    return acc, exact
