"""Image outputs: PNG folders and captioned sample grids."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from torch import Tensor


def _to_uint8(img: Tensor, scale: int) -> np.ndarray:
    arr = (img.detach().float().clamp(0, 1).cpu().numpy().transpose(1, 2, 0) * 255).round().astype(np.uint8)
    return arr.repeat(scale, 0).repeat(scale, 1) if scale > 1 else arr


def save_pngs(samples: Tensor, prompts: Sequence[str], out: Path, scale: int = 4) -> None:
    """``out/00000.png`` … (images in [0, 1], upscaled ``scale``× nearest) and ``out/prompts.json``."""
    from PIL import Image

    out.mkdir(parents=True, exist_ok=True)
    for i, img in enumerate(samples):
        Image.fromarray(_to_uint8(img, scale)).save(out / f"{i:05d}.png")
    (out / "prompts.json").write_text(json.dumps(list(prompts), indent=0))


def save_grid(samples: Tensor, prompts: Sequence[str], path: Path, cols: int = 8, scale: int = 6) -> None:
    """A grid of images with their prompts as captions (wrapped under each image)."""
    import textwrap

    from PIL import Image, ImageDraw

    n = len(samples)
    if n == 0:
        return
    h, w = samples.shape[-2] * scale, samples.shape[-1] * scale
    cap = 36
    rows = (n + cols - 1) // cols
    cell_w = max(w, 120)
    grid = Image.new("RGB", (cols * cell_w, rows * (h + cap)), (255, 255, 255))
    draw = ImageDraw.Draw(grid)
    for i, (img, prompt) in enumerate(zip(samples, prompts)):
        r, c = divmod(i, cols)
        x0, y0 = c * cell_w + (cell_w - w) // 2, r * (h + cap)
        grid.paste(Image.fromarray(_to_uint8(img, scale)), (x0, y0))
        text = "\n".join(textwrap.wrap(prompt, 22)[:3])
        draw.multiline_text((c * cell_w + 2, y0 + h + 1), text, fill=(0, 0, 0), spacing=0)
    path.parent.mkdir(parents=True, exist_ok=True)
    grid.save(path)
