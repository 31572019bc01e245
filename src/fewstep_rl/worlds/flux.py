"""The ``flux`` (FLUX.1-dev style) and ``flux2`` (FLUX.2-klein) worlds: a local diffusers directory + prompt files.

Nothing is downloaded: ``world.path`` names a ``FluxPipeline`` / ``Flux2KleinPipeline`` directory, loaded with
``local_files_only`` and checked component by component (:mod:`fewstep_rl.backbones.flux`,
:mod:`fewstep_rl.backbones.flux2`). Prompts, evaluation and sample files are as in the ``sd3`` world.

Guidance. ``flux``: ``world.guidance`` is FLUX.1's *distilled guidance embedding* (3.5 for FLUX.1-dev), an input of
every pass of every role; the teacher's true CFG against the empty prompt is ``world.true_cfg`` (default 1: none,
the pipeline's ``true_cfg_scale``), which methods take as their teacher guidance. ``flux2``: klein has no guidance
embedding; ``world.guidance`` is the teacher's CFG (4.0, methods.md §2.2).

Schedule. Both pipelines shift the σ grid dynamically (μ from the image token count; klein also from the step
count). At a fixed resolution and step count that is the static shift ``γ = e^μ`` (the backbone's
``schedule_shift(K)``; ``sigmas(K)`` is the pipeline's grid): set it as the method's ``shift`` (the presets do).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch

from fewstep_rl.config import knob
from fewstep_rl.perf.speed import SpeedFlags
from fewstep_rl.worlds.sd3 import SD3World

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class FluxWorldConfig(SpeedFlags):
    """The ``flux`` world (``world.*`` keys)."""

    path: str = knob("", "local diffusers FLUX.1 directory (required; nothing is downloaded)")
    prompts: str = knob("", "training prompts: a text file, one prompt per line (required)")
    eval_prompts: str | None = knob(None, "evaluation prompts file (default: the training prompts)")
    guidance: float = knob(3.5, "distilled guidance embedding fed to every pass (FLUX.1-dev: 3.5); not CFG")
    true_cfg: float = knob(1.0, "teacher true-CFG scale against the empty prompt (1: none)")
    resolution: int = knob(512, "image side in pixels")
    dtype: Literal["float32", "bfloat16", "float16"] = knob("float32", "dtype the frozen components load in")
    max_sequence_length: int = knob(512, "T5 tokens per prompt")

    def __post_init__(self) -> None:
        if self.resolution < 16 or self.resolution % 16:
            raise ValueError(f"resolution must be a positive multiple of 16, got {self.resolution}")
        if self.true_cfg < 1.0:
            raise ValueError(f"true_cfg must be >= 1, got {self.true_cfg}")


@dataclass
class Flux2WorldConfig(SpeedFlags):
    """The ``flux2`` world (``world.*`` keys)."""

    path: str = knob("", "local diffusers FLUX.2-klein directory (required; nothing is downloaded)")
    prompts: str = knob("", "training prompts: a text file, one prompt per line (required)")
    eval_prompts: str | None = knob(None, "evaluation prompts file (default: the training prompts)")
    guidance: float = knob(4.0, "teacher CFG scale (klein-base: 4.0)")
    resolution: int = knob(512, "image side in pixels")
    dtype: Literal["float32", "bfloat16", "float16"] = knob("float32", "dtype the frozen components load in")
    max_sequence_length: int = knob(512, "text tokens per prompt (chat template included)")
    text_layers: list[int] = knob([9, 18, 27], "text-encoder hidden states stacked into the prompt embedding")

    def __post_init__(self) -> None:
        if self.resolution < 16 or self.resolution % 16:
            raise ValueError(f"resolution must be a positive multiple of 16, got {self.resolution}")
        if self.guidance < 1.0:
            raise ValueError(f"guidance must be >= 1, got {self.guidance}")
        if not self.text_layers:
            raise ValueError("text_layers must name at least one hidden-state index")


class FluxWorld(SD3World):
    """A local diffusers FLUX.1 checkpoint with prompts from files."""

    name = "flux"
    Config = FluxWorldConfig
    label = "FLUX.1"
    example_path = "/models/FLUX.1-dev"
    missing_preset_hint = ("for the pipeline's dynamic shift set --method.shift to e^mu (FLUX.1 at 512 px: 1.8776; "
                           "the backbone's schedule_shift(num_steps))")

    def __init__(self, cfg: Any = None) -> None:
        super().__init__(cfg or self.Config())  # path, prompts (SD3World)
        self.teacher_guidance = float(getattr(self.cfg, "true_cfg", self.cfg.guidance))

    def _load(self) -> Any:
        from fewstep_rl.backbones.flux import FluxBackbone

        c = self.cfg
        return FluxBackbone.from_pretrained(self.dir, roles=self.roles_config(), dtype=_DTYPES[c.dtype],
                                            guidance=c.guidance, resolution=c.resolution,
                                            max_sequence_length=c.max_sequence_length)


class Flux2World(FluxWorld):
    """A local diffusers FLUX.2-klein checkpoint with prompts from files."""

    name = "flux2"
    Config = Flux2WorldConfig
    label = "FLUX.2-klein"
    example_path = "/models/FLUX.2-klein-base-4B"
    missing_preset_hint = ("for the pipeline's dynamic shift set --method.shift to e^mu (klein at 512 px, 4 steps: "
                           "7.6193; the backbone's schedule_shift(num_steps))")

    def _load(self) -> Any:
        from fewstep_rl.backbones.flux2 import Flux2Backbone

        c = self.cfg
        return Flux2Backbone.from_pretrained(self.dir, roles=self.roles_config(), dtype=_DTYPES[c.dtype],
                                             resolution=c.resolution, max_sequence_length=c.max_sequence_length,
                                             text_layers=tuple(c.text_layers))
