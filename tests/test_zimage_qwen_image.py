"""The ``zimage`` and ``qwen_image`` backbones and worlds beyond the conformance suite (which runs both in
test_conformance*.py): the pipelines' own σ grids (Z-Image's static shift; Qwen-Image's dynamic shift with
``shift_terminal``) through the directory's scheduler, the dynamic shift as a static one, loader and world errors,
and the Z-Image presets (DIDR, TDM-R1) with the note for a method without one."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"

import shutil

import pytest
import torch

from fewstep_rl.backbones.base import Backbone, BackboneLoadError
from fewstep_rl.backbones.varlen import scheduler_sigmas
from fewstep_rl.cli import main
from fewstep_rl.run import preset_path, resolve
from fewstep_rl.sampling import sigma_grid
from fewstep_rl.testing.cases import CASES

FAMILIES = ("zimage", "qwen_image")


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    return {n: CASES[n].prepare(tmp_path_factory.mktemp(n)) for n in FAMILIES}


def _pipeline(name, d):
    from diffusers import QwenImagePipeline, ZImagePipeline

    pipe = (ZImagePipeline if name == "zimage" else QwenImagePipeline).from_pretrained(d, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.parametrize("name", FAMILIES)
def test_pipeline_sigmas_are_the_pipelines_default_grid(dirs, name):
    bb = CASES[name].load(dirs[name], None)
    pipe = _pipeline(name, dirs[name])
    side = bb.sample_shape[-1] * pipe.vae_scale_factor
    kw = {"guidance_scale": 0.0} if name == "zimage" else {}
    pipe(["a red cube"], num_inference_steps=3, height=side, width=side, output_type="latent", **kw)
    ours = bb.pipeline_sigmas(3)
    assert ours.shape == (4,) and torch.equal(pipe.scheduler.sigmas, ours.to(pipe.scheduler.sigmas))
    if name == "zimage":  # static shift 3 of the directory's scheduler = our sigma_grid
        assert bb.default_shift == 3.0
        assert torch.allclose(ours, sigma_grid(3, shift=3.0), atol=1e-6)
    else:  # dynamic shift, stretched so the last non-zero σ is shift_terminal
        assert abs(float(ours[-2]) - 0.02) < 1e-6 and bb.default_shift > 1.0


@torch.no_grad()
def test_qwen_cfg_renorm_is_the_pipelines_true_cfg(dirs):
    """With cfg_renorm, k-step Euler at CFG 3 equals QwenImagePipeline's true CFG (norm rescaling included)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    from fewstep_rl.backbones.qwen_image import QwenImageBackbone, pack, unpack
    from fewstep_rl.sampling import Transition, sample

    d = dirs["qwen_image"]
    bb = QwenImageBackbone.from_pretrained(d, resolution=4, cfg_renorm=True)
    prompts, sig = ["a red cube", "two blue balls"], sigma_grid(4, shift=3.0)
    noise = torch.randn((2, *bb.sample_shape), generator=torch.Generator().manual_seed(0))
    cond = bb.encode_prompts(prompts)
    ours = sample(lambda x, s: bb.velocity(x, s, cond, role=None, guidance=3.0), noise, sig, Transition("euler")).final
    linear = sample(lambda x, s: Backbone.velocity(bb, x, s, cond, None, 3.0), noise, sig,
                    Transition("euler")).final
    pipe = _pipeline("qwen_image", d)
    pipe.scheduler = FlowMatchEulerDiscreteScheduler(shift=1.0)
    latents = pipe(prompts, negative_prompt=["", ""], true_cfg_scale=3.0, sigmas=sig[:-1].tolist(), height=16,
                   width=16, latents=pack(noise), output_type="latent").images
    err = float((unpack(latents, 4, 4) - ours).abs().max())
    print(f"qwen_image true-CFG parity (cfg_renorm): max |Δ latents| = {err:.3g}")
    assert err < 1e-5 and float((linear - ours).abs().max()) > 1e3 * max(err, 1e-8), err


def test_qwen_dynamic_shift_is_a_static_shift_of_e_mu(dirs):
    """Exponential time shift e^μ/(e^μ + 1/σ − 1) = the static shift γσ/(1 + (γ−1)σ) with γ = e^μ (without the
    shift_terminal stretch)."""
    bb = CASES["qwen_image"].load(dirs["qwen_image"], None)
    sched = bb.scheduler.__class__.from_config({**bb.scheduler.config, "shift_terminal": None})
    grid = scheduler_sigmas(sched, [1.0, 2 / 3, 1 / 3], 4)
    assert torch.allclose(grid, sigma_grid(3, shift=bb.default_shift), atol=1e-6)


@pytest.mark.parametrize("name", FAMILIES)
def test_a_missing_component_names_its_folder(dirs, name, tmp_path):
    d = tmp_path / "broken"
    shutil.copytree(dirs[name], d)
    shutil.rmtree(d / "text_encoder")
    with pytest.raises(BackboneLoadError, match="text_encoder"):
        CASES[name].load(d, None)
    shutil.copytree(dirs[name] / "text_encoder", d / "text_encoder")
    (d / "vae" / "config.json").unlink()
    with pytest.raises(BackboneLoadError, match="vae/config.json is missing"):
        CASES[name].load(d, None)


def test_world_errors(dirs, tmp_path):
    from fewstep_rl.worlds.qwen_image import QwenImageWorld, QwenImageWorldConfig
    from fewstep_rl.worlds.zimage import ZImageWorld, ZImageWorldConfig

    prompts = tmp_path / "p.txt"
    prompts.write_text("a red cube\n")
    with pytest.raises(ValueError, match="even"):
        ZImageWorldConfig(resolution=7)
    with pytest.raises(ValueError, match="world.path"):
        ZImageWorld(ZImageWorldConfig(prompts=str(prompts)))
    with pytest.raises(ValueError, match="guidance"):
        QwenImageWorldConfig(guidance=0.5)
    world = QwenImageWorld(QwenImageWorldConfig(path=str(dirs["qwen_image"]), prompts=str(prompts), resolution=12))
    with pytest.raises(ValueError, match="multiple of 2 × the VAE factor 4"):
        world.latent_side()
    world = ZImageWorld(ZImageWorldConfig(path=str(dirs["zimage"]), prompts=str(prompts), resolution=8))
    assert world.build_backbone().sample_shape == (16, 8, 8)


@pytest.mark.parametrize("method", ["didr", "tdm_r1"])
def test_zimage_presets_resolve(method):
    r = resolve(method, "zimage")
    assert preset_path(method, "zimage") is not None and r.world.path and r.rewards
    assert r.world.resolution in (512, 1024) and r.method.shift == 3.0


def test_a_method_without_a_zimage_preset_gets_a_note(dirs, tmp_path, capsys):
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red cube\n")
    args = ["--world", "zimage", "--world.path", str(dirs["zimage"]), "--world.prompts", str(prompts),
            "--print_config"]
    assert main(["fit", "--method", "dmd2", *args]) == 0
    assert "note: no preset configs/dmd2/zimage.yaml" in capsys.readouterr().err
    assert main(["fit", "--method", "didr", *args]) == 0
    assert "note:" not in capsys.readouterr().err
