"""FLUX.1 (``flux``) and FLUX.2-klein (``flux2``) specifics beyond the conformance suite (tests/test_conformance.py):
the pipelines' own dynamic-shift schedules, the distilled guidance embedding, the klein μ formula, load errors and
the worlds' guidance keys. Tiny random pipelines of the real classes, saved and loaded through the real code."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"

import shutil

import pytest
import torch

from fewstep_rl.backbones.base import BackboneLoadError
from fewstep_rl.sampling import Transition, flux2_mu, sample, sigma_grid
from fewstep_rl.testing import cases


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("flux")
    return {"flux": cases._flux_prepare(root), "flux2": cases._flux2_prepare(root)}


def _pipe(family, d):
    from diffusers import Flux2KleinPipeline, FluxPipeline

    pipe = (FluxPipeline if family == "flux" else Flux2KleinPipeline).from_pretrained(d, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.parametrize("family", ["flux", "flux2"])
@pytest.mark.parametrize(("resolution", "steps"), [(16, 4), (32, 3)])
@torch.no_grad()
def test_dynamic_shift_schedule_and_sampling_match_the_pipeline(dirs, family, resolution, steps):
    """The pipeline with its own scheduler config (dynamic shift) and ``num_inference_steps``: its σ's are
    ``bb.sigmas(K)`` (= the static shift ``e^μ``), and its latents our K-step Euler sampling on them."""
    from fewstep_rl.backbones.flux import FluxBackbone
    from fewstep_rl.backbones.flux2 import Flux2Backbone

    d = dirs[family]
    if family == "flux":
        bb = FluxBackbone.from_pretrained(d, resolution=resolution, max_sequence_length=cases.FLUX_SEQ)
    else:
        bb = Flux2Backbone.from_pretrained(d, resolution=resolution, max_sequence_length=cases.FLUX2_SEQ,
                                           text_layers=cases.FLUX2_LAYERS)
    sig = bb.sigmas(steps)
    assert torch.allclose(sig, sigma_grid(steps, shift=bb.schedule_shift(steps)), atol=1e-6)
    assert float(sig[1]) > 1 - 1 / steps  # shifted towards noise (μ > 0)
    prompts = list(cases.SD3_PROMPTS[:2])
    noise = torch.randn((2, *bb.sample_shape), generator=torch.Generator().manual_seed(5))
    cond = bb.encode_prompts(prompts)
    ours = sample(lambda x, s: bb.velocity(x, s, cond, role="teacher"), noise, sig, Transition("euler")).final
    pipe = _pipe(family, d)
    if family == "flux":
        b, c, h, w = noise.shape
        out = pipe(prompt=prompts, num_inference_steps=steps, height=resolution, width=resolution, guidance_scale=3.5,
                   max_sequence_length=cases.FLUX_SEQ, latents=pipe._pack_latents(noise, b, c, h, w),
                   output_type="latent").images
        theirs = bb._pack(ours)
    else:
        out = pipe(prompt=prompts, num_inference_steps=steps, height=resolution, width=resolution, guidance_scale=1.0,
                   max_sequence_length=cases.FLUX2_SEQ, text_encoder_out_layers=cases.FLUX2_LAYERS, latents=noise,
                   output_type="latent").images
        theirs = _flux2_to_vae_latents(bb, ours)
    assert torch.allclose(pipe.scheduler.sigmas, sig, atol=1e-6), (pipe.scheduler.sigmas, sig)
    err = float((out - theirs).abs().max())
    assert err < 1e-5, f"{family}: default-schedule sampling differs from the pipeline by {err:.3g}"


def _flux2_to_vae_latents(bb, x):
    bn = bb.vae.bn
    z = x * torch.sqrt(bn.running_var.view(1, -1, 1, 1) + bb.vae.config.batch_norm_eps) + bn.running_mean.view(1, -1, 1, 1)
    b, c, h, w = z.shape
    return z.reshape(b, c // 4, 2, 2, h, w).permute(0, 1, 4, 2, 5, 3).reshape(b, c // 4, h * 2, w * 2)


def test_klein_mu_gives_the_spec_grid_at_512px():
    """methods.md §1.1: FLUX.2-klein at 512 px (1024 tokens), 4 steps → σ ≈ [1.0, 0.958, 0.884, 0.718]."""
    sig = sigma_grid(4, mu=flux2_mu(1024, 4))
    assert torch.allclose(sig[:4], torch.tensor([1.0, 0.958, 0.884, 0.718]), atol=5e-4), sig
    assert flux2_mu(5000, 4) == flux2_mu(5000, 50)  # beyond 4300 tokens μ ignores the step count


@torch.no_grad()
def test_flux_guidance_embedding_is_an_input_not_cfg(dirs):
    """The world's ``guidance`` enters every pass (changes the velocity in one forward), CFG stays separate."""
    bb = cases._flux_load(dirs["flux"], None)
    x = torch.randn((2, *bb.sample_shape), generator=torch.Generator().manual_seed(1))
    cond = bb.encode_prompts(["a red cube", "a green cone"])
    v35 = bb.velocity(x, 0.6, cond, role="teacher")
    bb.guidance = 1.0
    v1 = bb.velocity(x, 0.6, cond, role="teacher")
    assert float((v35 - v1).abs().max()) > 1e-3


def test_missing_or_mismatched_components_name_the_file(dirs, tmp_path):
    from fewstep_rl.backbones.flux import FluxBackbone
    from fewstep_rl.backbones.flux2 import Flux2Backbone

    d = tmp_path / "f"
    shutil.copytree(dirs["flux"], d)
    shutil.rmtree(d / "text_encoder_2")
    with pytest.raises(BackboneLoadError, match="text_encoder_2"):
        FluxBackbone.from_pretrained(d)
    with pytest.raises(BackboneLoadError, match="text_layers"):
        Flux2Backbone.from_pretrained(dirs["flux2"], resolution=16)  # default layers (9, 18, 27): a 3-layer encoder
    with pytest.raises(BackboneLoadError, match="resolution"):
        FluxBackbone.from_pretrained(dirs["flux"], resolution=25, max_sequence_length=cases.FLUX_SEQ)


def test_worlds_guidance_keys(dirs, tmp_path):
    from fewstep_rl.config import ConfigError
    from fewstep_rl.run import resolve

    p = tmp_path / "p.txt"
    p.write_text("a red cube\n")
    r = resolve("dmd2", "flux", overrides={"world.path": str(dirs["flux"]), "world.prompts": str(p)}, use_preset=False)
    world = r.world_cls(r.world)
    assert world.cfg.guidance == 3.5 and world.teacher_guidance == 1.0  # embedding 3.5, no true CFG
    r = resolve("dmd2", "flux2", overrides={"world.path": str(dirs["flux2"]), "world.prompts": str(p)},
                use_preset=False)
    assert r.world_cls(r.world).teacher_guidance == 4.0
    with pytest.raises(ConfigError, match="guidance_scale"):
        resolve("dmd2", "flux", overrides={"world.guidance_scale": 2.0}, use_preset=False)


def test_rtdmd_presets_carry_the_dynamic_shift_and_a_missing_preset_is_a_note(dirs, tmp_path, capsys):
    import math

    from fewstep_rl.run import resolve
    from fewstep_rl.sampling import flux_mu

    p = tmp_path / "p.txt"
    p.write_text("a red cube\n")
    over = {"world.prompts": str(p)}
    r = resolve("rtdmd", "flux2", overrides={**over, "world.path": str(dirs["flux2"])})
    assert math.isclose(r.method.shift, math.exp(flux2_mu(1024, 4)), rel_tol=1e-8) and r.method.guidance == 4.0
    assert r.world.resolution == 512 and r.method.optim.lr == 1e-6
    r = resolve("rtdmd", "flux", overrides={**over, "world.path": str(dirs["flux"])})
    assert math.isclose(r.method.shift, math.exp(flux_mu(1024)), rel_tol=1e-8) and r.world.guidance == 3.5
    assert "no preset" not in capsys.readouterr().err
    r = resolve("dmd2", "flux2", overrides={**over, "world.path": str(dirs["flux2"])})
    err = capsys.readouterr().err
    assert r.method.shift == 1.0 and "no preset for method 'dmd2' on world 'flux2'" in err and "7.6193" in err


@torch.no_grad()
def test_flux2_encode_is_the_pipelines_image_encoding_and_decode_inverts_it(dirs):
    bb = cases._flux2_load(dirs["flux2"], None)
    pipe = _pipe("flux2", dirs["flux2"])
    images = torch.rand((2, 3, 16, 16), generator=torch.Generator().manual_seed(2))
    z = bb.encode(images)
    assert z.shape == (2, *bb.sample_shape)
    assert float((z - pipe._encode_vae_image(2 * images - 1, None)).abs().max()) < 1e-5
    assert bb.decode(z).shape == images.shape
