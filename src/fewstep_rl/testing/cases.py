"""The backbone families under the conformance suite (:mod:`fewstep_rl.testing.conformance`), one entry each.

A new backbone adds its :class:`~fewstep_rl.testing.conformance.BackboneCase` to :data:`CASES`: a tiny random model
of the family's real classes written in its real diffusers layout (``save_pretrained``), the family's real loading
code, and the family's diffusers pipeline run on our noise and σ grid. ``tests/test_conformance.py`` and
``tests/test_conformance_fit.py`` run every applicable check of every entry in ``make test``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from fewstep_rl.roles import RolesConfig
from fewstep_rl.testing.conformance import BackboneCase

SD3_PROMPTS = ("a red cube", "two blue balls", "a green cone")


def _sd3_prepare(workdir: Path) -> Path:
    """A tiny random ``StableDiffusion3Pipeline`` (2 CLIPs, T5, VAE, shift 3) written with ``save_pretrained``."""
    from diffusers import StableDiffusion3Pipeline

    from fewstep_rl.backbones import tiny

    d = workdir / "sd3"
    StableDiffusion3Pipeline(**tiny.sd3_pipeline_components()).save_pretrained(d)
    return d


def _sd3_load(d: Path, roles: RolesConfig | None) -> Any:
    from fewstep_rl.backbones.sd3 import SD3Backbone

    return SD3Backbone.from_pretrained(d, roles=roles, resolution=16)


def _sd3_pipeline(d: Path, prompts: Sequence[str], noise: Tensor, sigmas: Tensor, guidance: float) -> tuple[Tensor,
                                                                                                          Tensor]:
    """``StableDiffusion3Pipeline`` with our noise as ``latents`` and our σ grid as ``sigmas`` (shift 1, so the
    scheduler uses them exactly as given)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

    pipe = StableDiffusion3Pipeline.from_pretrained(d, local_files_only=True)
    pipe.scheduler = FlowMatchEulerDiscreteScheduler(shift=1.0)
    pipe.set_progress_bar_config(disable=True)
    side = noise.shape[-1] * pipe.vae_scale_factor
    kw = dict(prompt=list(prompts), guidance_scale=guidance, sigmas=sigmas[:-1].tolist(), height=side, width=side)
    latents = pipe(latents=noise.clone(), output_type="latent", **kw).images
    assert torch.equal(pipe.scheduler.sigmas, sigmas.to(pipe.scheduler.sigmas))
    images = pipe(latents=noise.clone(), output_type="pt", **kw).images
    return latents, images


FLUX_SEQ = 16  # T5 tokens of the tiny flux world (the pipeline's max_sequence_length)


def _flux_prepare(workdir: Path) -> Path:
    """A tiny random ``FluxPipeline`` (CLIP, T5, VAE, guidance embedding, dynamic shift) via ``save_pretrained``."""
    from diffusers import FluxPipeline

    from fewstep_rl.backbones import tiny

    d = workdir / "flux"
    FluxPipeline(**tiny.flux_pipeline_components()).save_pretrained(d)
    return d


def _flux_load(d: Path, roles: RolesConfig | None) -> Any:
    from fewstep_rl.backbones.flux import FluxBackbone

    return FluxBackbone.from_pretrained(d, roles=roles, resolution=16, guidance=3.5, max_sequence_length=FLUX_SEQ)


def _flux_pipeline(d: Path, prompts: Sequence[str], noise: Tensor, sigmas: Tensor, guidance: float) -> tuple[Tensor,
                                                                                                            Tensor]:
    """``FluxPipeline`` with our (packed) noise as ``latents``, our σ grid (dynamic shift off, so the scheduler uses
    it as given), the guidance embedding 3.5 and true CFG ``guidance`` against ``negative_prompt=""``."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline

    pipe = FluxPipeline.from_pretrained(d, local_files_only=True)
    pipe.scheduler = FlowMatchEulerDiscreteScheduler(shift=1.0, use_dynamic_shifting=False)
    pipe.set_progress_bar_config(disable=True)
    b, c, h, w = noise.shape
    side = h * pipe.vae_scale_factor
    kw = dict(prompt=list(prompts), guidance_scale=3.5, true_cfg_scale=guidance, sigmas=sigmas[:-1].tolist(),
              height=side, width=side, max_sequence_length=FLUX_SEQ,
              negative_prompt=[""] * len(prompts) if guidance > 1 else None)
    packed = pipe._pack_latents(noise.clone(), b, c, h, w)
    latents = pipe._unpack_latents(pipe(latents=packed.clone(), output_type="latent", **kw).images, side, side,
                                   pipe.vae_scale_factor)
    assert torch.equal(pipe.scheduler.sigmas, sigmas.to(pipe.scheduler.sigmas))
    images = pipe(latents=packed.clone(), output_type="pt", **kw).images
    return latents, images


FLUX2_SEQ, FLUX2_LAYERS = 64, (1, 2, 3)  # text tokens and stacked hidden states of the tiny flux2 world


def _flux2_prepare(workdir: Path) -> Path:
    """A tiny random ``Flux2KleinPipeline`` (Qwen3 with a chat template, Flux2 VAE, not step-distilled)."""
    from diffusers import Flux2KleinPipeline

    from fewstep_rl.backbones import tiny

    d = workdir / "flux2"
    Flux2KleinPipeline(**tiny.flux2_pipeline_components(), is_distilled=False).save_pretrained(d)
    return d


def _flux2_load(d: Path, roles: RolesConfig | None) -> Any:
    from fewstep_rl.backbones.flux2 import Flux2Backbone

    return Flux2Backbone.from_pretrained(d, roles=roles, resolution=16, max_sequence_length=FLUX2_SEQ,
                                         text_layers=FLUX2_LAYERS)


def _flux2_pipeline(d: Path, prompts: Sequence[str], noise: Tensor, sigmas: Tensor, guidance: float) -> tuple[Tensor,
                                                                                                             Tensor]:
    """``Flux2KleinPipeline`` with our noise (patchified, normalised: its ``latents``) and σ grid (dynamic shift
    off), CFG ``guidance``; its latent output (denormalised, un-patchified) is mapped back to our space."""
    from diffusers import FlowMatchEulerDiscreteScheduler, Flux2KleinPipeline

    pipe = Flux2KleinPipeline.from_pretrained(d, local_files_only=True)
    pipe.scheduler = FlowMatchEulerDiscreteScheduler(shift=1.0, use_dynamic_shifting=False)
    pipe.set_progress_bar_config(disable=True)
    side = 2 * noise.shape[-1] * pipe.vae_scale_factor
    kw = dict(prompt=list(prompts), guidance_scale=guidance, sigmas=sigmas[:-1].tolist(), height=side, width=side,
              max_sequence_length=FLUX2_SEQ, text_encoder_out_layers=FLUX2_LAYERS)
    z = pipe._patchify_latents(pipe(latents=noise.clone(), output_type="latent", **kw).images)
    bn = pipe.vae.bn
    latents = (z - bn.running_mean.view(1, -1, 1, 1)) / torch.sqrt(bn.running_var.view(1, -1, 1, 1)
                                                                    + pipe.vae.config.batch_norm_eps)
    assert torch.equal(pipe.scheduler.sigmas, sigmas.to(pipe.scheduler.sigmas))
    images = pipe(latents=noise.clone(), output_type="pt", **kw).images
    return latents, images


def _shapes_prepare(workdir: Path) -> Path:
    from fewstep_rl.worlds.shapes.world import ASSETS

    return ASSETS / "teacher"


def _toy2d_load(d: Path, roles: RolesConfig | None) -> Any:
    from fewstep_rl.worlds.toy2d import Toy2DConfig, Toy2DWorld

    if roles is not None:
        Toy2DWorld.check_roles(roles)
    return Toy2DWorld(Toy2DConfig(hidden=16)).build_backbone()


CASES: dict[str, BackboneCase] = {
    "sd3": BackboneCase(
        name="sd3", prepare=_sd3_prepare, load=_sd3_load, prompts=SD3_PROMPTS, pipeline=_sd3_pipeline, world="sd3",
        world_args=lambda d, p: ["--world.path", str(d), "--world.prompts", str(p), "--world.resolution", "16",
                                 "--roles.rank", "2"],
        rewards="fewstep_rl.perf.bench_reward:MeanPixelReward", save=lambda bb, d: bb.save_pretrained(d),
    ),
    "flux": BackboneCase(
        name="flux", prepare=_flux_prepare, load=_flux_load, prompts=SD3_PROMPTS, pipeline=_flux_pipeline,
        world="flux", world_args=lambda d, p: ["--world.path", str(d), "--world.prompts", str(p), "--world.resolution",
                                               "16", "--world.max_sequence_length", str(FLUX_SEQ), "--roles.rank", "2"],
        rewards="fewstep_rl.perf.bench_reward:MeanPixelReward", save=lambda bb, d: bb.save_pretrained(d),
    ),
    "flux2": BackboneCase(
        name="flux2", prepare=_flux2_prepare, load=_flux2_load, prompts=SD3_PROMPTS, pipeline=_flux2_pipeline,
        world="flux2", world_args=lambda d, p: ["--world.path", str(d), "--world.prompts", str(p), "--world.resolution",
                                                "16", "--world.max_sequence_length", str(FLUX2_SEQ),
                                                "--world.text_layers", "[1, 2, 3]", "--roles.rank", "2"],
        rewards="fewstep_rl.perf.bench_reward:MeanPixelReward", save=lambda bb, d: bb.save_pretrained(d),
    ),
    "shapes": BackboneCase(
        name="shapes", prepare=_shapes_prepare, load=lambda d, roles: _sd3_load_native(d, roles),
        prompts=("a red circle", "two blue squares", "a green triangle above a red square"), world="shapes",
        world_args=lambda d, p: ["--roles.rank", "2"], save=lambda bb, d: bb.save_pretrained(d),
    ),
    "toy2d": BackboneCase(
        name="toy2d", prepare=lambda w: w, load=_toy2d_load, prompts=("left", "right", ""), modes=("lora",),
        lora=RolesConfig(), world="toy2d", world_args=lambda d, p: ["--world.hidden", "16"], logp_atol=0.0,
        roles_draw_global_rng=True, exports=False,
    ),
}


def _sd3_load_native(d: Path, roles: RolesConfig | None) -> Any:
    from fewstep_rl.backbones.sd3 import SD3Backbone

    return SD3Backbone.from_pretrained(d, roles=roles)


# -------------------------------------------------------------------- zimage, qwen_image (Qwen-text families)
def _zimage_prepare(workdir: Path) -> Path:
    """A tiny random ``ZImagePipeline`` (Qwen3 text encoder with a chat template, 16-channel VAE) saved to disk."""
    from diffusers import ZImagePipeline

    from fewstep_rl.backbones import tiny_qwen

    d = workdir / "zimage"
    ZImagePipeline(**tiny_qwen.zimage_pipeline_components()).save_pretrained(d)
    return d


def _zimage_load(d: Path, roles: RolesConfig | None) -> Any:
    from fewstep_rl.backbones.zimage import ZImageBackbone

    return ZImageBackbone.from_pretrained(d, roles=roles, resolution=8)


def _zimage_pipeline(d: Path, prompts: Sequence[str], noise: Tensor, sigmas: Tensor, guidance: float) -> tuple[
        Tensor, Tensor]:
    """``ZImagePipeline`` on our noise and σ grid (shift 1); its ``guidance_scale`` g is our ``ω − 1``."""
    from diffusers import FlowMatchEulerDiscreteScheduler, ZImagePipeline

    pipe = ZImagePipeline.from_pretrained(d, local_files_only=True)
    pipe.scheduler = FlowMatchEulerDiscreteScheduler(shift=1.0)
    pipe.set_progress_bar_config(disable=True)
    side = noise.shape[-1] * pipe.vae_scale_factor
    kw = dict(guidance_scale=guidance - 1, sigmas=sigmas[:-1].tolist(), height=side, width=side)
    # (a fresh prompt list per call: ZImagePipeline._encode_prompt writes the chat-templated prompts into it)
    latents = pipe(list(prompts), latents=noise.clone(), output_type="latent", **kw).images
    assert torch.equal(pipe.scheduler.sigmas, sigmas.to(pipe.scheduler.sigmas))
    return latents, pipe(list(prompts), latents=noise.clone(), output_type="pt", **kw).images


CASES["zimage"] = BackboneCase(
    name="zimage", prepare=_zimage_prepare, load=_zimage_load, prompts=SD3_PROMPTS, pipeline=_zimage_pipeline,
    world="zimage", world_args=lambda d, p: ["--world.path", str(d), "--world.prompts", str(p), "--world.resolution",
                                             "8", "--roles.rank", "2"],
    rewards="fewstep_rl.perf.bench_reward:MeanPixelReward", save=lambda bb, d: bb.save_pretrained(d),
)


def _qwen_image_prepare(workdir: Path) -> Path:
    """A tiny random ``QwenImagePipeline`` (Qwen2.5-VL text encoder, 3-D VAE, dynamic-shift scheduler) on disk."""
    from diffusers import QwenImagePipeline

    from fewstep_rl.backbones import tiny_qwen

    d = workdir / "qwen_image"
    QwenImagePipeline(**tiny_qwen.qwen_image_pipeline_components()).save_pretrained(d)
    return d


def _qwen_image_load(d: Path, roles: RolesConfig | None) -> Any:
    from fewstep_rl.backbones.qwen_image import QwenImageBackbone

    return QwenImageBackbone.from_pretrained(d, roles=roles, resolution=4)


def _qwen_image_pipeline(d: Path, prompts: Sequence[str], noise: Tensor, sigmas: Tensor, guidance: float) -> tuple[
        Tensor, Tensor]:
    """``QwenImagePipeline`` on our noise (packed) and σ grid (static shift 1), ``true_cfg_scale`` = ω with the
    negative prompt ``""``. Its per-token norm rescaling of the CFG combination is neutralised here (``torch.norm``
    returns ones inside the call), since the backbone applies CFG linearly (the documented departure)."""
    from unittest import mock

    from diffusers import FlowMatchEulerDiscreteScheduler, QwenImagePipeline

    from fewstep_rl.backbones.qwen_image import pack, unpack

    pipe = QwenImagePipeline.from_pretrained(d, local_files_only=True)
    pipe.scheduler = FlowMatchEulerDiscreteScheduler(shift=1.0)
    pipe.set_progress_bar_config(disable=True)
    h, w = noise.shape[-2:]
    kw = dict(true_cfg_scale=guidance, negative_prompt=[""] * len(prompts) if guidance > 1 else None,
              sigmas=sigmas[:-1].tolist(), height=h * pipe.vae_scale_factor, width=w * pipe.vae_scale_factor)
    class _Torch:  # the pipeline module's ``torch`` with ``norm`` returning ones (no rescaling)
        def __getattr__(self, name: str) -> Any:
            return getattr(torch, name)

        @staticmethod
        def norm(t: Tensor, dim: int = -1, keepdim: bool = True) -> Tensor:
            return torch.ones_like(t[..., :1])

    with mock.patch("diffusers.pipelines.qwenimage.pipeline_qwenimage.torch", _Torch()):
        latents = pipe(list(prompts), latents=pack(noise), output_type="latent", **kw).images
        assert torch.equal(pipe.scheduler.sigmas, sigmas.to(pipe.scheduler.sigmas))
        images = pipe(list(prompts), latents=pack(noise), output_type="pt", **kw).images
    return unpack(latents, h, w), images


CASES["qwen_image"] = BackboneCase(
    name="qwen_image", prepare=_qwen_image_prepare, load=_qwen_image_load, prompts=SD3_PROMPTS,
    pipeline=_qwen_image_pipeline, world="qwen_image",
    world_args=lambda d, p: ["--world.path", str(d), "--world.prompts", str(p), "--world.resolution", "16",
                             "--roles.rank", "2"],
    rewards="fewstep_rl.perf.bench_reward:MeanPixelReward", save=lambda bb, d: bb.save_pretrained(d),
)
