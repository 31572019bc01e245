"""Rewards of the ``shapes`` world: the learned, differentiable :class:`ProxyReward` and the exact :class:`GoldReward`.

The proxy (:mod:`fewstep_rl.worlds.shapes.proxy`) is a small network trained to predict the gold verifier's
partial-credit score from (image, prompt); it is what differentiable reward methods optimise. The gold reward
wraps the verifier (:func:`fewstep_rl.worlds.shapes.verify.score_batch`): exact, non-differentiable, the yardstick
that shows when optimising the proxy turns into reward hacking. In the ``glyphs`` world ``gold`` is the rapidocr
judge instead (chosen by the prompts' metadata, ``judge: ocr``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from fewstep_rl.config import knob
from fewstep_rl.rewards.base import Reward
from fewstep_rl.worlds.shapes import proxy, verify


def _check_images(name: str, samples: Tensor) -> None:
    if samples.dim() != 4 or samples.shape[1] != 3:
        raise ValueError(f"reward {name!r} expects images of shape (B, 3, H, W) in [0, 1], got {tuple(samples.shape)}")


@dataclasses.dataclass
class ProxyConfig:
    """Knobs of :class:`ProxyReward`."""

    path: str | None = knob(None, "proxy weights (proxy.safetensors or its folder, with proxy.json); null = shipped")
    variant: Literal["calibrated", "renders"] = knob(
        "calibrated", "shipped proxy: calibrated on teacher samples, or trained on renders only (more hackable)"
    )
    scale: float = knob(1.0, "multiplier of the score sigmoid(logit) ∈ (0, 1)")


class ProxyReward(Reward):
    """Learned image–prompt agreement ``scale · sigmoid(f(image, prompt))`` (differentiable in the image).

    Images of another size than 16×16 are resized differentiably (bilinear, no antialiasing) first.
    """

    name = "proxy"
    differentiable = True
    Config = ProxyConfig

    def __init__(self, cfg: ProxyConfig | None = None) -> None:
        super().__init__(cfg)
        if self.cfg.path is not None and self.cfg.variant != "calibrated":
            raise ValueError("reward 'proxy': give either path or variant, not both")
        path = self.cfg.path or (proxy.ASSETS / "proxy-renders" if self.cfg.variant == "renders" else None)
        self.net = proxy.load_proxy(path)

    def score(self, samples: Tensor, prompts: Sequence[str], meta: Sequence[dict]) -> Tensor:
        _check_images(self.name, samples)
        size = self.net.cfg.image_size
        param = next(self.net.parameters())
        x = samples.to(param.dtype)
        if x.shape[-2:] != (size, size):
            x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=False)
        tokens = proxy.tokenize(prompts, self.net.cfg.max_tokens).to(param.device)
        return self.cfg.scale * torch.sigmoid(self.net(x.to(param.device), tokens)).to(samples.device)


@dataclasses.dataclass
class GoldConfig:
    """Knobs of :class:`GoldReward`."""

    strict: bool = knob(
        False, "score 1/0 for all-correct images (GenEval's binary correctness) instead of partial credit"
    )


class GoldReward(Reward):
    """The world's gold judge, a black box in [0, 1].

    ``shapes``: the exact verifier (GenEval-like partial credit; ``strict``: all-correct). ``glyphs`` (prompts whose
    metadata says ``judge: ocr``): rapidocr recognition accuracy ``1 − Lev/len`` of the word
    (:mod:`fewstep_rl.worlds.glyphs.judge`; ``strict``: exact match). A batch must not mix the two.
    """

    name = "gold"
    differentiable = False
    Config = GoldConfig

    def score(self, samples: Tensor, prompts: Sequence[str], meta: Sequence[dict]) -> Tensor:
        _check_images(self.name, samples)
        judges = {m.get("judge") for m in meta}
        if judges == {"ocr"}:
            from fewstep_rl.rewards.ocr import target_text
            from fewstep_rl.worlds.glyphs.judge import judge

            acc, exact = judge(samples, [target_text(p, m) for p, m in zip(prompts, meta)])
            return (exact.float() if self.cfg.strict else acc).to(samples.device)
        if "ocr" in judges:
            raise ValueError("reward 'gold': a batch mixes OCR-judged (glyphs) and verifier-judged (shapes) prompts")
        scores, strict, _ = verify.score_batch(samples, list(prompts))
        return strict.float() if self.cfg.strict else scores
