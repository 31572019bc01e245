"""LAION aesthetic predictor v2 ("improved-aesthetic-predictor", the DDPO aesthetic reward; rewards.md §3).

``r(x) = MLP(e / |e|)`` with ``e`` the CLIP ViT-L/14 (OpenAI) projected image embedding and the MLP
768→1024→128→64→16→1 (dropouts, no activations) of ``sac+logos+ava1-l14-linearMSE.pth`` (keys
``layers.{0,2,4,6,7}.{weight,bias}``). The CLIP tower is a local transformers directory (``CLIPModel`` or
``CLIPVisionModelWithProjection`` ``save_pretrained`` layout, e.g. ``openai/clip-vit-large-patch14``); pixels are
preprocessed in torch (short-side bicubic resize, centre crop, CLIP mean/std), so the reward is differentiable.
The prompt is not used. Scores are on the AVA 1–10 scale (≈ 4–7 for typical images).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch.nn.functional as F
from torch import Tensor

from fewstep_rl.config import knob
from fewstep_rl.rewards._deps import require
from fewstep_rl.rewards.base import Reward, load_weights, read_checkpoint
from fewstep_rl.rewards.clip import clip_preprocess
from fewstep_rl.rewards.imagereward import reward_head


def load_clip_vision(transformers: Any, path: Path) -> Any:
    """``CLIPVisionModelWithProjection`` from a CLIPModel or vision-only directory (the text tower is not loaded)."""
    config = transformers.CLIPVisionConfig.from_pretrained(str(path), local_files_only=True)
    top = json.loads((path / "config.json").read_text())
    if top.get("model_type") == "clip" and "projection_dim" in top:
        config.projection_dim = top["projection_dim"]  # the vision sub-config's own default (512) is not the model's
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()  # the unused text-tower keys of a full CLIPModel are expected
    try:
        return transformers.CLIPVisionModelWithProjection.from_pretrained(str(path), config=config,
                                                                           local_files_only=True)
    finally:
        transformers.logging.set_verbosity(verbosity)


@dataclasses.dataclass
class AestheticConfig:
    """Knobs of :class:`Aesthetic`."""

    path: str = knob("", "local CLIP ViT-L/14 directory (CLIPModel or CLIPVisionModelWithProjection); required")
    head_path: str = knob("", "sac+logos+ava1-l14-linearMSE.pth (the MLP head state dict); required")


class Aesthetic(Reward):
    """LAION aesthetic score of CLIP ViT-L/14 image embeddings; differentiable, prompt-free."""

    name = "aesthetic"
    differentiable = True
    Config = AestheticConfig

    def __init__(self, cfg: AestheticConfig | None = None) -> None:
        super().__init__(cfg)
        transformers = require("transformers", "aesthetic", self.name)
        path, head = Path(self.cfg.path or "."), Path(self.cfg.head_path or ".")
        if not self.cfg.path or not path.is_dir():
            raise ValueError(f"reward {self.name!r}: 'path' must be a local CLIP directory, got {self.cfg.path!r}")
        if not self.cfg.head_path or not head.is_file():
            raise ValueError(f"reward {self.name!r}: 'head_path' must be the aesthetic MLP .pth, got {self.cfg.head_path!r}")
        try:
            self.clip = load_clip_vision(transformers, path)
        except (OSError, ValueError) as e:
            raise ValueError(f"reward {self.name!r}: cannot load a CLIP vision model from {str(path)!r}: {e}") from None
        try:
            sd = read_checkpoint(head)
        except ValueError as e:
            raise ValueError(f"reward {self.name!r}: {e}") from None
        sd = {k.removeprefix("layers."): v.float() for k, v in sd.items()} if isinstance(sd, dict) else {}
        if "0.weight" not in sd:
            raise ValueError(f"reward {self.name!r}: {str(head)!r} is not an aesthetic MLP (no 'layers.0.weight')")
        self.mlp = reward_head(sd["0.weight"].shape[1])
        load_weights(self.mlp, sd, self.name, head, "the aesthetic MLP", rebuilt=())
        if sd["0.weight"].shape[1] != self.clip.config.projection_dim:
            raise ValueError(f"reward {self.name!r}: head expects {sd['0.weight'].shape[1]}-d embeddings, the CLIP "
                             f"model gives {self.clip.config.projection_dim}")
        self.clip.eval().requires_grad_(False)
        self.mlp.eval().requires_grad_(False)
        self.image_size = int(self.clip.config.image_size)

    def score(self, samples: Tensor, prompts: Sequence[str], meta: Sequence[dict]) -> Tensor:
        param = next(self.clip.parameters())
        x = clip_preprocess(samples.to(param.device, param.dtype), self.image_size)
        e = F.normalize(self.clip(pixel_values=x).image_embeds.float(), dim=-1)
        return self.mlp(e).squeeze(-1).to(samples.device)
