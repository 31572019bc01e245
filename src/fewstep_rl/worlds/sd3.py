"""The ``sd3`` world: a real diffusers SD3 / SD3.5 model loaded from a local directory.

Every method's ``configs/<method>/sd3.yaml`` preset targets this world with the paper's hyper-parameters
(SD3.5-Medium at 512 px unless the paper says otherwise). Nothing is downloaded: ``world.path`` must name a local
diffusers-format directory (``transformer/``, ``text_encoder[_2,_3]/``, ``tokenizer[_2,_3]/``, ``vae/``,
``scheduler/``), which the ``sd3`` backbone loads with ``local_files_only`` and checks component by component
(a missing or mismatched component is one :class:`~fewstep_rl.backbones.base.BackboneLoadError` naming the file).

Prompts come from text files (one prompt per line, blank lines and ``#`` comments skipped): ``world.prompts`` for
training, ``world.eval_prompts`` for evaluation (default: the training prompts). The world has no built-in metric
beyond the configured rewards' means (the caller adds them); samples are written as PNGs.

``world.resolution`` is in image pixels; the transformer's sample side is ``resolution / 2^(len(vae blocks) − 1)``
(8 for SD3), or ``resolution`` itself for a pixel-space directory without a VAE.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor

from fewstep_rl.config import knob
from fewstep_rl.perf.speed import SpeedFlags
from fewstep_rl.worlds.base import World

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class SD3WorldConfig(SpeedFlags):
    """The ``sd3`` world (``world.*`` keys; the speed flags from :class:`~fewstep_rl.perf.speed.SpeedFlags`)."""

    path: str = knob("", "local diffusers SD3/SD3.5 directory (required; nothing is downloaded)")
    prompts: str = knob("", "training prompts: a text file, one prompt per line (required)")
    eval_prompts: str | None = knob(None, "evaluation prompts file (default: the training prompts)")
    guidance: float = knob(4.5, "teacher CFG scale")
    resolution: int = knob(512, "image side in pixels")
    dtype: Literal["float32", "bfloat16", "float16"] = knob("float32", "dtype the frozen components load in")
    max_sequence_length: int = knob(256, "T5 tokens per prompt")

    def __post_init__(self) -> None:
        if self.resolution < 8 or self.resolution % 8:
            raise ValueError(f"resolution must be a positive multiple of 8, got {self.resolution}")
        if self.guidance < 1.0:
            raise ValueError(f"guidance must be >= 1, got {self.guidance}")


def read_prompts(path: str | Path, key: str) -> list[str]:
    """One prompt per line; blank lines and lines starting with ``#`` are skipped."""
    p = Path(path)
    if not str(path) or not p.is_file():
        raise ValueError(f"world.{key}: prompt file {str(path)!r} not found (give a text file, one prompt per line)")
    out = [ln.strip() for ln in p.read_text().splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
    if not out:
        raise ValueError(f"world.{key}: prompt file {str(p)!r} holds no prompts")
    return out


class SD3World(World):
    """A local diffusers SD3 / SD3.5 checkpoint with prompts from files."""

    name = "sd3"
    Config = SD3WorldConfig
    sample_kind = "images"
    roles_defaults = {"rank": 32, "alpha": 64.0}
    example_path = "/models/stable-diffusion-3.5-medium"

    def __init__(self, cfg: SD3WorldConfig | None = None) -> None:
        super().__init__(cfg or SD3WorldConfig())
        c = self.cfg
        if not c.path:
            raise ValueError(f"world.path: the {self.name} world needs a local diffusers model directory "
                             f"(e.g. --world.path {self.example_path})")
        self.dir = Path(c.path)
        if not self.dir.is_dir():
            raise ValueError(f"world.path: {str(self.dir)!r} is not a directory (a local diffusers {self.name} "
                             "checkpoint is required; nothing is downloaded)")
        self._train = read_prompts(c.prompts, "prompts")
        self._eval = read_prompts(c.eval_prompts, "eval_prompts") if c.eval_prompts else list(self._train)
        self.teacher_guidance = float(c.guidance)

    def latent_side(self) -> int:
        """Transformer sample side for ``world.resolution`` (VAE downsampling read from ``vae/config.json``)."""
        vae_cfg = self.dir / "vae" / "config.json"
        if not vae_cfg.is_file():
            return int(self.cfg.resolution)
        try:
            blocks = json.loads(vae_cfg.read_text())["block_out_channels"]
        except (json.JSONDecodeError, KeyError) as e:
            raise ValueError(f"world.path: cannot read the VAE config {str(vae_cfg)!r} ({e})") from None
        factor = 2 ** (len(blocks) - 1)
        if self.cfg.resolution % factor:
            raise ValueError(f"world.resolution {self.cfg.resolution} is not a multiple of the VAE factor {factor}")
        return int(self.cfg.resolution) // factor

    #: In-memory hook (``benchmarks/scale.py``, ``fewstep-rl plan``): a callable returning the backbone instead of
    #: loading ``world.path`` (every image world; :mod:`fewstep_rl.perf.arch`).
    backbone_factory: Any = None

    def build_backbone(self) -> Any:
        """The backbone (:meth:`_load` from ``world.path``, or :attr:`backbone_factory`) with the speed flags on."""
        bb = self.backbone_factory() if self.backbone_factory is not None else self._load()
        return self.cfg.apply_speed(bb)

    def _load(self) -> Any:
        from fewstep_rl.backbones.sd3 import SD3Backbone

        c = self.cfg
        return SD3Backbone.from_pretrained(self.dir, roles=self.roles_config(), dtype=_DTYPES[c.dtype],
                                           resolution=self.latent_side(), max_sequence_length=c.max_sequence_length)

    @property
    def train_prompts(self) -> list[str]:
        return list(self._train)

    @property
    def eval_prompts(self) -> list[str]:
        return list(self._eval)

    def default_rewards(self) -> list[dict]:
        return [{"name": "jpeg"}]

    def save_samples(self, samples: Tensor, prompts: Sequence[str], out: Path) -> None:
        from fewstep_rl.eval.images import save_pngs

        save_pngs(samples, prompts, Path(out), scale=1)

    def log_samples(self, samples: Tensor, prompts: Sequence[str], run_dir: Path, step: int) -> None:
        from fewstep_rl.eval.images import save_grid

        save_grid(samples[:8], list(prompts[:8]), Path(run_dir) / "samples" / f"iter_{step:06d}.png", cols=4, scale=1)
