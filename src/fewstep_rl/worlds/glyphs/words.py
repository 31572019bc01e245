"""Prompts of the ``glyphs`` world: short words of upper-case letters and digits, a seeded list and its split.

A prompt is the word itself (``"K4XB"``); its metadata holds the target text for the OCR rewards. The alphabet
drops the glyphs that the built-in font draws (nearly) identically at 16 px, so that the judge reads rendered
ground truth exactly (pilot in the module docstring of :mod:`fewstep_rl.worlds.glyphs.world`): ``I``/``1``
and ``O``/``0``/``Q`` (31 characters remain). Words have 2–5 characters, lengths uniform.
"""

from __future__ import annotations

import numpy as np

ALPHABET = "ABCDEFGHJKLMNPRSTUVWXYZ23456789"
MIN_LEN, MAX_LEN = 2, 5
NUM_WORDS = 5000
HELDOUT_FRAC = 0.1


def make_words(n: int = NUM_WORDS, seed: int = 0) -> list[str]:
    """``n`` distinct words (lengths uniform in 2–5, characters uniform over :data:`ALPHABET`), in draw order."""
    rng = np.random.default_rng(seed)
    out: list[str] = []
    seen: set[str] = set()
    while len(out) < n:
        k = int(rng.integers(MIN_LEN, MAX_LEN + 1))
        w = "".join(ALPHABET[i] for i in rng.integers(0, len(ALPHABET), k))
        if w not in seen:
            seen.add(w)
            out.append(w)
    return out


def split_words(seed: int = 0, n: int = NUM_WORDS, heldout_frac: float = HELDOUT_FRAC) -> tuple[list[str], list[str]]:
    """(training words, held-out words): a seeded ``heldout_frac`` of :func:`make_words` is never trained on."""
    words = make_words(n, seed)
    perm = np.random.default_rng(seed + 1).permutation(len(words))
    k = int(round(heldout_frac * len(words)))
    held = sorted(words[i] for i in perm[:k])
    train = sorted(words[i] for i in perm[k:])
    return train, held


def meta(word: str) -> dict:
    """Per-prompt metadata: the target text (``text``) and the judge the ``gold`` reward uses (``ocr``)."""
    return {"prompt": word, "text": word, "judge": "ocr"}
