"""ImageReward (Xu et al. 2023, arXiv 2304.05977) from the official ``ImageReward.pt`` + ``med_config.json``.

ImageReward is BLIP (ViT-L/16 image encoder, BERT-base text encoder with cross-attention to the image tokens) plus
a 5-layer MLP head on the text [CLS] state (768→1024→128→64→16→1, dropouts, no activations), standardised with
the published mean/std: ``r = (MLP(h_cls) − 0.16717) / 1.03334``. Prompts are BERT-tokenised to 35 tokens.

Re-implemented on transformers' ``BlipVisionModel`` + ``BlipTextModel`` (rewards.md §2 and Appendix A; parity
0.0 against the package on identical random weights is recorded there): none of the ``image-reward`` package's
pins (timm 0.6, fairscale, diffusers, a hub download at construction). The key map from ``ImageReward.pt`` is
:func:`convert_imagereward_state_dict`; a missing or unexpected key is an error. The image tower's sizes are read
from the checkpoint's shapes (heads and LayerNorm ε are knobs; ViT-L: 16, 1e-6); the text tower comes from
``med_config.json``. Pixels are preprocessed in torch (CLIP preprocessing at 224), so the score is differentiable
(the package's ``score_gard`` path). The tokenizer is a local BERT ``vocab.txt`` (bert-base-uncased), plus BLIP's
``[DEC]`` (BOS) and ``[ENC]`` specials so ids match the 30 524-token embedding.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from fewstep_rl.config import knob
from fewstep_rl.rewards._deps import require
from fewstep_rl.rewards.base import Reward, load_weights, read_checkpoint
from fewstep_rl.rewards.clip import clip_preprocess

IMAGEREWARD_MEAN = 0.16717362830052426
IMAGEREWARD_STD = 1.0333394966054072


def reward_head(d_in: int = 768) -> nn.Sequential:
    """The ImageReward / LAION-aesthetic MLP: Linear layers 768→1024→128→64→16→1 with dropouts, no activations."""
    return nn.Sequential(
        nn.Linear(d_in, 1024), nn.Dropout(0.2), nn.Linear(1024, 128), nn.Dropout(0.2),
        nn.Linear(128, 64), nn.Dropout(0.1), nn.Linear(64, 16), nn.Linear(16, 1),
    )


def convert_imagereward_state_dict(sd: dict[str, Tensor]) -> dict[str, Tensor]:
    """``ImageReward.pt`` keys (BLIP + ``mlp.layers``) → this module's keys (``vision.``, ``text.``, ``mlp.``).

    ``blip.vision_proj`` / ``blip.text_proj`` (contrastive heads, unused by the score) and position-id buffers are
    dropped."""
    out = {}
    for k, v in sd.items():
        if k.startswith("blip.text_encoder."):
            if not k.endswith("position_ids"):
                out["text." + k.removeprefix("blip.text_encoder.")] = v
        elif k.startswith("blip.visual_encoder."):
            k2 = k.removeprefix("blip.visual_encoder.")
            k2 = {"cls_token": "embeddings.class_embedding", "pos_embed": "embeddings.position_embedding"}.get(k2, k2)
            k2 = k2.replace("patch_embed.proj", "embeddings.patch_embedding")
            k2 = re.sub(r"^blocks\.(\d+)\.", r"encoder.layers.\1.", k2)
            k2 = (k2.replace(".norm1.", ".layer_norm1.").replace(".norm2.", ".layer_norm2.")
                  .replace(".attn.qkv.", ".self_attn.qkv.").replace(".attn.proj.", ".self_attn.projection."))
            out["vision." + re.sub(r"^norm\.", "post_layernorm.", k2)] = v
        elif k.startswith("mlp.layers."):
            out["mlp." + k.removeprefix("mlp.layers.")] = v
    return out


def to_imagereward_state_dict(sd: dict[str, Tensor]) -> dict[str, Tensor]:
    """Inverse of :func:`convert_imagereward_state_dict`: writes the ``ImageReward.pt`` layout."""
    out = {}
    for k, v in sd.items():
        if k.startswith("text."):
            out["blip.text_encoder." + k[5:]] = v
        elif k.startswith("mlp."):
            out["mlp.layers." + k[4:]] = v
        elif k.startswith("vision."):
            k2 = k[7:]
            k2 = {"embeddings.class_embedding": "cls_token", "embeddings.position_embedding": "pos_embed"}.get(k2, k2)
            k2 = k2.replace("embeddings.patch_embedding", "patch_embed.proj")
            k2 = re.sub(r"^encoder\.layers\.(\d+)\.", r"blocks.\1.", k2)
            k2 = (k2.replace(".layer_norm1.", ".norm1.").replace(".layer_norm2.", ".norm2.")
                  .replace(".self_attn.qkv.", ".attn.qkv.").replace(".self_attn.projection.", ".attn.proj."))
            out["blip.visual_encoder." + re.sub(r"^post_layernorm\.", "norm.", k2)] = v
    return out


def _layers(sd: dict[str, Tensor], prefix: str) -> int:
    idx = {int(m.group(1)) for k in sd if (m := re.match(re.escape(prefix) + r"(\d+)\.", k))}
    return max(idx) + 1 if idx else 0


class ImageRewardModel(nn.Module):
    """BLIP vision + text encoders and the reward head; ``forward`` → standardised rewards ``(B,)``."""

    def __init__(self, vision_config: Any, text_config: Any) -> None:
        super().__init__()
        from transformers.models.blip.modeling_blip import BlipVisionModel
        from transformers.models.blip.modeling_blip_text import BlipTextModel

        self.vision = BlipVisionModel(vision_config)
        self.text = BlipTextModel(text_config, add_pooling_layer=False)
        self.mlp = reward_head(text_config.hidden_size)

    def forward(self, pixel_values: Tensor, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        img = self.vision(pixel_values=pixel_values).last_hidden_state
        att = torch.ones(img.shape[:-1], dtype=torch.long, device=img.device)
        h = self.text(input_ids=input_ids, attention_mask=attention_mask, encoder_hidden_states=img,
                      encoder_attention_mask=att, is_decoder=False).last_hidden_state[:, 0]
        return (self.mlp(h).squeeze(-1) - IMAGEREWARD_MEAN) / IMAGEREWARD_STD


def text_config_from_med(med: dict) -> Any:
    """``med_config.json`` (a BERT config with ``encoder_width``) → ``BlipTextConfig``."""
    from transformers import BlipTextConfig

    return BlipTextConfig(
        vocab_size=med["vocab_size"], hidden_size=med["hidden_size"], encoder_hidden_size=med["encoder_width"],
        intermediate_size=med["intermediate_size"], num_hidden_layers=med["num_hidden_layers"],
        num_attention_heads=med["num_attention_heads"], max_position_embeddings=med["max_position_embeddings"],
        layer_norm_eps=med.get("layer_norm_eps", 1e-12), hidden_act=med.get("hidden_act", "gelu"),
    )


def vision_config_from_state_dict(sd: dict[str, Tensor], heads: int, eps: float) -> Any:
    """``BlipVisionConfig`` read off ``blip.visual_encoder.*`` shapes (heads and LayerNorm ε given)."""
    from transformers import BlipVisionConfig

    w = sd["blip.visual_encoder.patch_embed.proj.weight"]
    grid = int(round((sd["blip.visual_encoder.pos_embed"].shape[1] - 1) ** 0.5))
    return BlipVisionConfig(
        hidden_size=w.shape[0], patch_size=w.shape[-1], image_size=grid * w.shape[-1],
        intermediate_size=sd["blip.visual_encoder.blocks.0.mlp.fc1.weight"].shape[0],
        num_hidden_layers=_layers(sd, "blip.visual_encoder.blocks."), num_attention_heads=heads, layer_norm_eps=eps,
    )


def blip_tokenizer(vocab_file: Path) -> Any:
    """BERT WordPiece tokenizer from ``vocab.txt`` plus BLIP's ``[DEC]`` (BOS) and ``[ENC]`` specials."""
    from transformers import BertTokenizer

    tok = BertTokenizer(str(vocab_file))
    tok.add_special_tokens({"bos_token": "[DEC]"})
    tok.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
    return tok


@dataclasses.dataclass
class ImageRewardConfig:
    """Knobs of :class:`ImageReward`."""

    path: str = knob("", "ImageReward.pt, or a directory holding ImageReward.pt, med_config.json and vocab.txt")
    med_config: str | None = knob(None, "med_config.json (default: next to ImageReward.pt)")
    tokenizer_path: str | None = knob(None, "BERT vocab.txt or its directory (default: next to ImageReward.pt)")
    vision_heads: int = knob(16, "attention heads of the BLIP ViT (ViT-L: 16)")
    vision_eps: float = knob(1e-6, "LayerNorm ε of the BLIP ViT")
    max_length: int = knob(35, "prompt tokens (ImageReward uses 35)")


class ImageReward(Reward):
    """Standardised ImageReward score (≈ N(0, 1) over its training prompts); differentiable."""

    name = "imagereward"
    differentiable = True
    Config = ImageRewardConfig

    def __init__(self, cfg: ImageRewardConfig | None = None) -> None:
        super().__init__(cfg)
        require("transformers", "imagereward", self.name)
        if not self.cfg.path:
            raise ValueError(f"reward {self.name!r}: 'path' (ImageReward.pt or its directory) is required")
        ckpt = Path(self.cfg.path)
        if ckpt.is_dir():
            ckpt = ckpt / "ImageReward.pt"
        if not ckpt.is_file():
            raise ValueError(f"reward {self.name!r}: no checkpoint at {str(ckpt)!r}")
        med = Path(self.cfg.med_config) if self.cfg.med_config else ckpt.parent / "med_config.json"
        vocab = Path(self.cfg.tokenizer_path) if self.cfg.tokenizer_path else ckpt.parent
        vocab = vocab / "vocab.txt" if vocab.is_dir() else vocab
        for f, what in ((med, "med_config.json"), (vocab, "vocab.txt")):
            if not f.is_file():
                raise ValueError(f"reward {self.name!r}: no {what} at {str(f)!r}")
        try:
            sd = read_checkpoint(ckpt)
        except ValueError as e:
            raise ValueError(f"reward {self.name!r}: {e}") from None
        if not isinstance(sd, dict) or "blip.visual_encoder.patch_embed.proj.weight" not in sd:
            raise ValueError(f"reward {self.name!r}: {str(ckpt)!r} is not an ImageReward state dict")
        try:
            text_cfg = text_config_from_med(json.loads(med.read_text()))
        except (KeyError, json.JSONDecodeError) as e:
            raise ValueError(f"reward {self.name!r}: bad med_config {str(med)!r}: {e}") from None
        try:
            vision_cfg = vision_config_from_state_dict(sd, self.cfg.vision_heads, self.cfg.vision_eps)
            self.model = ImageRewardModel(vision_cfg, text_cfg)
        except Exception as e:  # noqa: BLE001 - transformers' strict config validation has its own error type
            raise ValueError(f"reward {self.name!r}: bad architecture for {str(ckpt)!r}: {e}") from None
        load_weights(self.model, convert_imagereward_state_dict(sd), self.name, ckpt, "ImageReward")
        self.model.eval().requires_grad_(False)
        self.tokenizer = blip_tokenizer(vocab)
        self.image_size = int(vision_cfg.image_size)

    def score(self, samples: Tensor, prompts: Sequence[str], meta: Sequence[dict]) -> Tensor:
        param = next(self.model.parameters())
        x = clip_preprocess(samples.to(param.device, param.dtype), self.image_size)
        tok = self.tokenizer(list(prompts), padding="max_length", truncation=True, max_length=self.cfg.max_length,
                             return_tensors="pt").to(param.device)
        return self.model(x, tok["input_ids"], tok["attention_mask"]).float().to(samples.device)
