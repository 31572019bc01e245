"""The ``glyphs`` world: text rendering judged by a real OCR model (a second embedded world, issue 19).

Prompts are short words (upper-case letters and digits, 2–5 characters, :mod:`.words`); 10% of the words are held
out of the teacher's training. Ground truth is Pillow's built-in font on a 16×48 strip (:mod:`.render`). The
teacher is a tiny ``SD3Transformer2DModel`` + character-level CLIP in pixel space, trained by
:mod:`.teacher` (``fewstep-rl world glyphs build``) and shipped in ``assets/teacher`` (fp16); it loads through the
``sd3`` backbone at 16×48. Rewards: ``gold`` (rapidocr accuracy, black box, :mod:`.judge`) and ``ocr_ctc``
(EasyOCR's recogniser, −CTC NLL of the word, differentiable; the default). Training on ``ocr_ctc`` and judging by
rapidocr is a reward-hacking test between two independent real models. Evaluation reports ``gold`` (OCR accuracy)
and ``exact`` (exact-match rate), overall and for training / held-out words.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from fewstep_rl.config import knob
from fewstep_rl.worlds import embedded
from fewstep_rl.worlds.base import World
from fewstep_rl.worlds.glyphs import render, words

ASSETS = Path(__file__).parent / "assets"


@dataclass
class GlyphsConfig:
    """The ``glyphs`` world (``world.*`` keys)."""

    path: str | None = knob(None, "teacher directory (diffusers format); default: the weights shipped in the package")
    guidance: float | None = knob(None, "teacher CFG scale (default: the shipped teacher's, 4.0)")
    eval_heldout_frac: float = knob(0.5, "fraction of evaluation prompts drawn from the held-out words")

    def __post_init__(self) -> None:
        if not 0.0 <= self.eval_heldout_frac <= 1.0:
            raise ValueError("eval_heldout_frac must lie in [0, 1]")


class GlyphsWorld(World):
    """16×48 word strips, a rapidocr gold judge, an EasyOCR CTC reward and a tiny SD3 teacher."""

    name = "glyphs"
    Config = GlyphsConfig
    sample_kind = "images"
    roles_defaults = {"rank": 16, "alpha": 32.0}

    def __init__(self, cfg: GlyphsConfig | None = None) -> None:
        super().__init__(cfg or GlyphsConfig())
        self.dir, meta = embedded.teacher_dir("glyphs", self.cfg.path, ASSETS)
        self.teacher_guidance = float(self.cfg.guidance if self.cfg.guidance is not None else meta.get("guidance", 4.0))
        self.shift = float(meta.get("shift", 1.0))
        self.resolution = (int(meta.get("height", render.HEIGHT)), int(meta.get("width", render.WIDTH)))
        self._train, self._held = words.split_words(seed=0)

    def build_backbone(self) -> Any:
        from fewstep_rl.backbones.sd3 import SD3Backbone

        return SD3Backbone.from_pretrained(self.dir, roles=self.roles_config(), resolution=self.resolution)

    @property
    def train_prompts(self) -> list[str]:
        return list(self._train)

    @property
    def heldout_prompts(self) -> list[str]:
        return list(self._held)

    @property
    def eval_prompts(self) -> list[str]:
        """A fixed interleaving of training and held-out words (``eval_heldout_frac`` of them held out)."""
        g = torch.Generator().manual_seed(0)
        train = [self._train[i] for i in torch.randperm(len(self._train), generator=g, device="cpu").tolist()]
        held = [self._held[i] for i in torch.randperm(len(self._held), generator=g, device="cpu").tolist()]
        f = self.cfg.eval_heldout_frac
        out, ti, hi = [], 0, 0
        for i in range(len(train) + len(held)):
            want_held = f > 0 and int((i + 1) * f) > int(i * f)  # held-out at a steady rate f
            if (want_held and hi < len(held)) or ti >= len(train):
                out.append(held[hi])
                hi += 1
            else:
                out.append(train[ti])
                ti += 1
        return out

    def prompt_meta(self, prompt: str) -> dict:
        return words.meta(prompt)

    def default_rewards(self) -> list[dict]:
        return [{"name": "ocr_ctc"}]

    def evaluate(
        self, samples: Tensor, prompts: Sequence[str], rewards: Any = None, beta: float | None = None,
        generator: torch.Generator | None = None,
    ) -> dict[str, float]:
        """OCR accuracy (``gold``) and exact-match rate (``exact``): all, training words, held-out words."""
        from fewstep_rl.worlds.glyphs.judge import judge

        acc, exact = judge(samples, list(prompts))
        return embedded.by_split({"gold": acc, "exact": exact}, prompts, set(self._held))

    def save_samples(self, samples: Tensor, prompts: Sequence[str], out: Path) -> None:
        embedded.save_samples(samples, prompts, out)

    def log_samples(self, samples: Tensor, prompts: Sequence[str], run_dir: Path, step: int) -> None:
        embedded.log_samples(samples, prompts, run_dir, step)
