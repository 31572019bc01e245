"""Ground-truth renderer of the ``glyphs`` world: a word in Pillow's built-in font, white on black, 16×48.

The font is ``ImageFont.load_default(size=12)`` (shipped inside Pillow, no system fonts). The word's ink box is
centred on the canvas at whole-pixel offsets (sub-pixel placement blurs the strokes enough for the OCR judge to
confuse letters), then shifted by a small random jitter: up to ``jitter`` pixels horizontally and 1 pixel
vertically, clipped so the ink stays inside the canvas. Images are grey, returned as 3 equal RGB channels.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache

import numpy as np
import torch

HEIGHT, WIDTH, FONT_SIZE = 16, 48, 12


@lru_cache(maxsize=4)
def _font(size: int):  # noqa: ANN202 - PIL font object
    from PIL import ImageFont

    return ImageFont.load_default(size=size)


def render(word: str, rng: np.random.Generator | None = None, height: int = HEIGHT, width: int = WIDTH,
           font_size: int = FONT_SIZE, jitter: int = 2) -> np.ndarray:
    """One ``(3, height, width)`` float32 image in [0, 1] of ``word`` (``rng=None``: centred, no jitter)."""
    from PIL import Image, ImageDraw

    font = _font(font_size)
    im = Image.new("L", (width, height), 0)
    d = ImageDraw.Draw(im)
    left, top, right, bottom = d.textbbox((0, 0), word, font=font)
    x = (width - (right - left)) // 2 - left
    y = (height - (bottom - top)) // 2 - top
    if rng is not None:
        room_x = max(0, (width - (right - left)) // 2 - 1)
        room_y = max(0, (height - (bottom - top)) // 2 - 1)
        x += int(rng.integers(-min(jitter, room_x), min(jitter, room_x) + 1))
        y += int(rng.integers(-min(1, room_y), min(1, room_y) + 1))
    d.text((x, y), word, font=font, fill=255)
    a = np.asarray(im, dtype=np.float32) / 255.0
    return np.repeat(a[None], 3, axis=0)


def render_batch(words: Sequence[str], seed: int | np.random.Generator = 0, height: int = HEIGHT,
                 width: int = WIDTH) -> torch.Tensor:
    """``(B, 3, height, width)`` float32 ground-truth images in [0, 1] (jitter drawn from ``seed``, in order)."""
    rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
    if not len(words):
        return torch.zeros(0, 3, height, width)
    return torch.from_numpy(np.stack([render(w, rng, height, width) for w in words]))
