"""HPSv2 and HPSv2.1 (Wu et al. 2023, arXiv 2306.09341) from the official ``HPS_v2*_compressed.pt`` files.

An HPS checkpoint is an open_clip ViT-H-14 CLIP fine-tuned on human preferences, saved as
``{'state_dict': {'module.' + open_clip key: fp16 tensor}, ...}`` (rewards.md §1). The score is the cosine of the
L2-normalised image and text embeddings, with no logit scale (values ≈ 0.2–0.35):
``r(x, c) = <f_img(x)/|f_img(x)|, f_txt(c)/|f_txt(c)|>``. Pixels are preprocessed in torch (bicubic short-side
resize to 224, centre crop, CLIP mean/std), so the reward is differentiable. ``hpsv2`` and ``hpsv21`` are the same
code under two names (v2.0 and v2.1 differ only in the checkpoint file), so both can sit in one reward list.

Departure from the spec (rewards.md §1 builds ``open_clip.create_model('ViT-H-14')``): the open_clip keys are mapped
onto transformers' ``CLIPModel`` (the same ViT: pre-LN blocks, exact GELU, fused qkv split into q/k/v, class-token
pooling after ``ln_post``, EOT pooling after ``ln_final``, no text padding mask), because ``open_clip`` imports
``torchvision`` and no torchvision wheel matches the CPU torch build this project installs. The architecture
sizes (widths, depths, patch, image and context size, vocabulary) are read from the checkpoint's shapes; only the
head counts are knobs (ViT-H-14: 16 and 16). The text tokenizer is CLIP's BPE: a local CLIP tokenizer directory
(``tokenizer_path``), or the BPE table bundled with ``open_clip_torch`` when that package is installed (read as a
data file, not imported).
"""

from __future__ import annotations

import dataclasses
import gzip
import importlib.util
import json
import re
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from fewstep_rl.config import knob
from fewstep_rl.rewards._deps import require
from fewstep_rl.rewards.base import Reward, load_weights, read_checkpoint
from fewstep_rl.rewards.clip import clip_preprocess

_BLOCK = {
    "ln_1.": "layer_norm1.",
    "ln_2.": "layer_norm2.",
    "attn.out_proj.": "self_attn.out_proj.",
    "mlp.c_fc.": "mlp.fc1.",
    "mlp.c_proj.": "mlp.fc2.",
}


def _block(prefix_out: str, rest: str, v: Tensor, out: dict[str, Tensor]) -> None:
    """One open_clip residual block entry → transformers CLIP encoder-layer entries (qkv split into three)."""
    if rest.startswith("attn.in_proj_"):
        kind = rest.removeprefix("attn.in_proj_")  # weight | bias
        for name, part in zip(("q_proj", "k_proj", "v_proj"), v.chunk(3, dim=0)):
            out[f"{prefix_out}self_attn.{name}.{kind}"] = part.clone()
        return
    for a, b in _BLOCK.items():
        if rest.startswith(a):
            out[prefix_out + b + rest[len(a):]] = v
            return
    raise KeyError(f"unexpected open_clip block key {rest!r}")


def openclip_to_hf_clip(sd: dict[str, Tensor]) -> dict[str, Tensor]:
    """open_clip ``CLIP`` state dict (ViT image tower, standard text tower) → transformers ``CLIPModel`` keys."""
    out: dict[str, Tensor] = {}
    direct = {
        "logit_scale": "logit_scale",
        "token_embedding.weight": "text_model.embeddings.token_embedding.weight",
        "positional_embedding": "text_model.embeddings.position_embedding.weight",
        "ln_final.weight": "text_model.final_layer_norm.weight",
        "ln_final.bias": "text_model.final_layer_norm.bias",
        "visual.class_embedding": "vision_model.embeddings.class_embedding",
        "visual.positional_embedding": "vision_model.embeddings.position_embedding.weight",
        "visual.conv1.weight": "vision_model.embeddings.patch_embedding.weight",
        "visual.ln_pre.weight": "vision_model.pre_layrnorm.weight",
        "visual.ln_pre.bias": "vision_model.pre_layrnorm.bias",
        "visual.ln_post.weight": "vision_model.post_layernorm.weight",
        "visual.ln_post.bias": "vision_model.post_layernorm.bias",
    }
    for k, v in sd.items():
        if k in direct:
            out[direct[k]] = v
        elif k == "text_projection":
            out["text_projection.weight"] = v.t().contiguous()
        elif k == "visual.proj":
            out["visual_projection.weight"] = v.t().contiguous()
        elif m := re.match(r"^visual\.transformer\.resblocks\.(\d+)\.(.+)$", k):
            _block(f"vision_model.encoder.layers.{m.group(1)}.", m.group(2), v, out)
        elif m := re.match(r"^transformer\.resblocks\.(\d+)\.(.+)$", k):
            _block(f"text_model.encoder.layers.{m.group(1)}.", m.group(2), v, out)
        elif k == "attn_mask":
            continue  # the causal mask buffer; transformers builds its own
        else:
            raise KeyError(f"unexpected open_clip key {k!r} (only ViT image towers with a standard text tower map)")
    return out


def hf_clip_to_openclip(sd: dict[str, Tensor]) -> dict[str, Tensor]:
    """Inverse of :func:`openclip_to_hf_clip` (q/k/v fused back into ``in_proj``): writes the HPS layout."""
    out = {}
    top = {
        "logit_scale": "logit_scale",
        "text_model.embeddings.token_embedding.weight": "token_embedding.weight",
        "text_model.embeddings.position_embedding.weight": "positional_embedding",
        "text_model.final_layer_norm.weight": "ln_final.weight",
        "text_model.final_layer_norm.bias": "ln_final.bias",
        "vision_model.embeddings.class_embedding": "visual.class_embedding",
        "vision_model.embeddings.position_embedding.weight": "visual.positional_embedding",
        "vision_model.embeddings.patch_embedding.weight": "visual.conv1.weight",
        "vision_model.pre_layrnorm.weight": "visual.ln_pre.weight",
        "vision_model.pre_layrnorm.bias": "visual.ln_pre.bias",
        "vision_model.post_layernorm.weight": "visual.ln_post.weight",
        "vision_model.post_layernorm.bias": "visual.ln_post.bias",
    }
    for k, v in sd.items():
        if k in top:
            out[top[k]] = v
        elif k == "text_projection.weight":
            out["text_projection"] = v.t()
        elif k == "visual_projection.weight":
            out["visual.proj"] = v.t()
    for tower, pre in (("vision_model", "visual.transformer"), ("text_model", "transformer")):
        n = len({m.group(1) for k in sd if (m := re.match(rf"{tower}\.encoder\.layers\.(\d+)\.", k))})
        for i in range(n):
            a, b = f"{tower}.encoder.layers.{i}.", f"{pre}.resblocks.{i}."
            for kind in ("weight", "bias"):
                out[b + f"attn.in_proj_{kind}"] = torch.cat([sd[a + f"self_attn.{p}_proj.{kind}"] for p in "qkv"])
                out[b + f"attn.out_proj.{kind}"] = sd[a + f"self_attn.out_proj.{kind}"]
                out[b + f"ln_1.{kind}"] = sd[a + f"layer_norm1.{kind}"]
                out[b + f"ln_2.{kind}"] = sd[a + f"layer_norm2.{kind}"]
                out[b + f"mlp.c_fc.{kind}"] = sd[a + f"mlp.fc1.{kind}"]
                out[b + f"mlp.c_proj.{kind}"] = sd[a + f"mlp.fc2.{kind}"]
    return out


def _count_layers(sd: dict[str, Tensor], prefix: str) -> int:
    idx = {int(m.group(1)) for k in sd if (m := re.match(re.escape(prefix) + r"(\d+)\.", k))}
    return max(idx) + 1 if idx else 0


def clip_config_from_openclip(sd: dict[str, Tensor], vision_heads: int, text_heads: int, eos_token_id: int) -> Any:
    """A transformers ``CLIPConfig`` read off an open_clip state dict's shapes (heads and EOS id given)."""
    from transformers import CLIPConfig

    width_v = sd["visual.conv1.weight"].shape[0]
    patch = sd["visual.conv1.weight"].shape[-1]
    grid = int(round((sd["visual.positional_embedding"].shape[0] - 1) ** 0.5))
    ctx, width_t = sd["positional_embedding"].shape
    return CLIPConfig(
        text_config=dict(
            vocab_size=sd["token_embedding.weight"].shape[0], hidden_size=width_t,
            intermediate_size=sd["transformer.resblocks.0.mlp.c_fc.weight"].shape[0],
            num_hidden_layers=_count_layers(sd, "transformer.resblocks."), num_attention_heads=text_heads,
            max_position_embeddings=ctx, hidden_act="gelu", eos_token_id=eos_token_id,
        ),
        vision_config=dict(
            hidden_size=width_v, intermediate_size=sd["visual.transformer.resblocks.0.mlp.c_fc.weight"].shape[0],
            num_hidden_layers=_count_layers(sd, "visual.transformer.resblocks."), num_attention_heads=vision_heads,
            image_size=grid * patch, patch_size=patch, hidden_act="gelu",
        ),
        projection_dim=sd["text_projection"].shape[1],
    )


def read_openclip_checkpoint(path: Path) -> dict[str, Tensor]:
    """``{'state_dict': {'module.' + key: tensor}}`` (HPS) or a bare state dict → fp32 open_clip keys."""
    if not path.is_file():
        raise ValueError(f"no checkpoint file at {str(path)!r}")
    ckpt = read_checkpoint(path)
    sd = ckpt.get("state_dict", ckpt) if isinstance(ckpt, dict) else None
    if not isinstance(sd, dict) or "visual.conv1.weight" not in {k.removeprefix("module.") for k in sd}:
        raise ValueError(f"{str(path)!r} is not an open_clip CLIP state dict (no 'visual.conv1.weight')")
    return {k.removeprefix("module."): v.float() if v.is_floating_point() else v for k, v in sd.items()}


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP byte → printable-unicode table (Radford et al. 2019, ``bytes_to_unicode``)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs]))


def write_clip_tokenizer_files(bpe_gz: Path, out_dir: Path) -> None:
    """transformers ``CLIPTokenizer`` files (``vocab.json``, ``merges.txt``) from CLIP's ``bpe_simple_vocab_16e6.txt.gz``:
    vocab = 256 byte symbols, their ``</w>`` forms, the first 48 894 merges, then the two specials (49 408 tokens)."""
    lines = gzip.open(bpe_gz).read().decode("utf-8").split("\n")[1 : 49152 - 256 - 2 + 1]
    merges = [tuple(m.split()) for m in lines]
    vocab = list(_bytes_to_unicode().values())
    vocab += [v + "</w>" for v in vocab]
    vocab += ["".join(m) for m in merges] + ["<|startoftext|>", "<|endoftext|>"]
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}))
    (out_dir / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")


def openclip_bpe_file() -> Path | None:
    """``bpe_simple_vocab_16e6.txt.gz`` of an installed ``open_clip_torch`` (found without importing it), or None."""
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        return None
    f = Path(next(iter(spec.submodule_search_locations))) / "bpe_simple_vocab_16e6.txt.gz"
    return f if f.is_file() else None


def load_clip_tokenizer(tokenizer_path: str | None, reward: str, max_length: int = 77) -> Any:
    """A CLIP BPE tokenizer from a local directory, else built from open_clip_torch's bundled BPE table."""
    transformers = require("transformers", reward, reward)
    if tokenizer_path:
        try:
            return transformers.AutoTokenizer.from_pretrained(tokenizer_path, local_files_only=True)
        except (OSError, ValueError, TypeError) as e:
            raise ValueError(f"reward {reward!r}: cannot load a tokenizer from {tokenizer_path!r}: {e}") from None
    bpe = openclip_bpe_file()
    if bpe is None:
        raise ValueError(
            f"reward {reward!r}: set tokenizer_path to a local CLIP tokenizer directory (vocab.json + merges.txt, e.g. "
            "the one of any CLIP ViT-H/14 or ViT-L/14 checkpoint), or install open_clip_torch for its bundled BPE table"
        )
    out = Path(tempfile.mkdtemp(prefix="fewstep-clip-bpe-"))
    write_clip_tokenizer_files(bpe, out)
    return transformers.CLIPTokenizer(str(out / "vocab.json"), str(out / "merges.txt"), pad_token="<|endoftext|>",
                                      model_max_length=max_length)


@dataclasses.dataclass
class HPSConfig:
    """Knobs of the HPS rewards."""

    path: str = knob("", "HPS_v2_compressed.pt / HPS_v2.1_compressed.pt (open_clip ViT-H-14 state dict); required")
    tokenizer_path: str | None = knob(None, "CLIP tokenizer directory (default: open_clip_torch's bundled BPE)")
    vision_heads: int = knob(16, "attention heads of the image tower (ViT-H-14: 16)")
    text_heads: int = knob(16, "attention heads of the text tower (ViT-H-14: 16)")
    gradient_checkpointing: bool = knob(False, "recompute activations in backward (≈ 35 % less time-memory product)")


class HPSv2(Reward):
    """HPS score ``cos(f_img(x), f_txt(prompt))`` of an HPSv2 checkpoint; differentiable."""

    name = "hpsv2"
    differentiable = True
    Config = HPSConfig

    def __init__(self, cfg: HPSConfig | None = None) -> None:
        super().__init__(cfg)
        transformers = require("transformers", "hps", self.name)
        if not self.cfg.path:
            raise ValueError(f"reward {self.name!r}: 'path' (an HPS_v2*_compressed.pt file) is required")
        try:
            sd = read_openclip_checkpoint(Path(self.cfg.path))
        except ValueError as e:
            raise ValueError(f"reward {self.name!r}: {e}") from None
        self.tokenizer = load_clip_tokenizer(self.cfg.tokenizer_path, self.name)
        try:
            config = clip_config_from_openclip(sd, self.cfg.vision_heads, self.cfg.text_heads,
                                               int(self.tokenizer.eos_token_id))
            self.model = transformers.CLIPModel(config)
        except (KeyError, ValueError, TypeError) as e:
            raise ValueError(f"reward {self.name!r}: cannot build the CLIP model of {self.cfg.path!r}: {e}") from None
        except Exception as e:  # noqa: BLE001 - transformers' strict config validation has its own error type
            raise ValueError(f"reward {self.name!r}: bad architecture for {self.cfg.path!r}: {e}") from None
        load_weights(self.model, openclip_to_hf_clip(sd), self.name, self.cfg.path, "the CLIP model")
        self.model.eval().requires_grad_(False)
        if self.cfg.gradient_checkpointing:
            self.model.gradient_checkpointing_enable()
        self.image_size = int(config.vision_config.image_size)
        self.context = int(config.text_config.max_position_embeddings)

    def embed(self, samples: Tensor, prompts: Sequence[str]) -> tuple[Tensor, Tensor]:
        """L2-normalised image and text embeddings."""
        param = next(self.model.parameters())
        x = clip_preprocess(samples.to(param.device, param.dtype), self.image_size)
        ids = self.tokenizer(list(prompts), padding="max_length", truncation=True, max_length=self.context,
                             return_tensors="pt")["input_ids"].to(param.device)
        img = self.model.get_image_features(pixel_values=x)
        txt = self.model.get_text_features(input_ids=ids)
        img = img if isinstance(img, Tensor) else img.pooler_output
        txt = txt if isinstance(txt, Tensor) else txt.pooler_output
        return F.normalize(img.float(), dim=-1), F.normalize(txt.float(), dim=-1)

    def score(self, samples: Tensor, prompts: Sequence[str], meta: Sequence[dict]) -> Tensor:
        img, txt = self.embed(samples, prompts)
        return (img * txt).sum(-1).to(samples.device)


class HPSv21(HPSv2):
    """HPSv2.1: the same scorer with the ``HPS_v2.1_compressed.pt`` checkpoint."""

    name = "hpsv21"
