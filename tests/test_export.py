"""``fewstep-rl export``: the exported generator, loaded by diffusers alone, reproduces ``fewstep-rl sample``.

A tiny random StableDiffusion3Pipeline (two CLIPs, T5, VAE; real diffusers classes, saved and loaded back) is the
sd3 world; a real 1-iteration ``fit`` writes the checkpoint, whose role weights are then made clearly non-zero
(one optimiser step barely moves a zero-initialised LoRA, so an export that dropped them would still pass).
Tolerance: the float images of diffusers and of fewstep-rl agree to 1e-4 (float32 on CPU; the LoRA runs unmerged
in fewstep-rl and merged or unmerged in diffusers, so they are equal up to rounding only), and the PNGs written
by ``fewstep-rl sample`` equal diffusers' PIL images to within one level.
"""

import os

os.environ["HF_HUB_OFFLINE"] = "1"

import json

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("peft")

from fewstep_rl import ckpt_io  # noqa: E402
from fewstep_rl.backbones import tiny  # noqa: E402
from fewstep_rl.cli import load_checkpoint, main  # noqa: E402
from fewstep_rl.run import build_method, resolve  # noqa: E402

PROMPTS = ["a red cube", "two blue balls"]
SEED = 3
TOL = 1e-4


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from diffusers import StableDiffusion3Pipeline

    d = tmp_path_factory.mktemp("export_world")
    StableDiffusion3Pipeline(**tiny.sd3_pipeline_components()).save_pretrained(d / "sd3")
    (d / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    return d


@torch.no_grad()
def _perturb(method, role, seed, scale=0.3):
    g = torch.Generator().manual_seed(seed)
    for p in method.backbone.role_parameters(role):
        p.add_(scale * torch.randn(p.shape, generator=g) / max(1.0, p.shape[-1] ** 0.5))


def _save(method, path):
    """What ``fewstep-rl sample``/``export`` read from a checkpoint: the role weights and the fewstep section."""
    ckpt = {"state_dict": method.state_dict()}
    method.on_save_checkpoint(ckpt)
    ckpt_io.save_checkpoint(ckpt, path)
    return str(path)


def _rebuilt(trained, section, key, value):
    """The trained checkpoint's method rebuilt with one config value changed (fresh roles)."""
    cfg = ckpt_io.load_checkpoint(trained)["fewstep"]["config"]
    cfg[section][key] = value
    m = build_method(resolve(None, raw=cfg))
    m.configure_model()
    return m


@pytest.fixture(scope="module")
def ckpts(world):
    """dmd2 checkpoints on the tiny world: trained (cps(1) chain, EMA) and perturbed, folded/merged, Euler chain,
    cps(0.9) chain, full-copy roles."""
    d = world
    rc = main(["fit", "--method", "dmd2", "--world", "sd3", "--world.path", str(d / "sd3"), "--world.prompts",
               str(d / "prompts.txt"), "--world.resolution", "16", "--roles.rank", "2", "--world.dtype",
               "float32", "--method.batch_size", "2", "--trainer.max_steps", "1", "--trainer.eval_samples", "2",
               "--trainer.run_dir", str(d / "run"), "--trainer.progress_bar", "false", "--rewards", "jpeg"])
    assert rc == 0
    trained = str(d / "run" / "checkpoints" / "last.ckpt")
    out = {}
    m = load_checkpoint(trained)
    _perturb(m, "generator", 1)
    _perturb(m, "ema", 2)
    out["lora"] = _save(m, d / "lora.ckpt")
    # RTDMD-style fold (generator's adapter frozen under generator and ema) and a merge of fake_score into the base
    _perturb(m, "fake_score", 3)
    m.backbone.merge_role("fake_score")
    m.backbone.fold_role("generator", into=("ema",))
    _perturb(m, "generator", 4)
    _perturb(m, "ema", 5)
    out["folded"] = _save(m, d / "folded.ckpt")
    for name, transition in (("euler", "euler"), ("cps09", "cps(0.9)")):
        m = _rebuilt(trained, "method", "transition", transition)
        _perturb(m, "ema", 6)
        out[name] = _save(m, d / f"{name}.ckpt")
    full = _rebuilt(trained, "roles", "mode", "full")
    _perturb(full, "generator", 7, scale=0.02)
    out["full"] = _save(full, d / "full.ckpt")
    return out


def _ours(ckpt, role=None):
    """``fewstep-rl sample``'s float samples (the same call its --ckpt path makes)."""
    m = load_checkpoint(ckpt)
    return m.generate(PROMPTS, torch.Generator().manual_seed(SEED), role=role, guidance=1.0)


def _diffusers(pipe, fs, output_type="pt"):
    """The snippet of the exported README.md: seed torch's generator, sigmas from fewstep.json, guidance 1."""
    pipe.set_progress_bar_config(disable=True)
    torch.manual_seed(SEED)
    return pipe(PROMPTS, num_inference_steps=fs["num_inference_steps"], sigmas=fs["sigmas"], guidance_scale=1.0,
                height=fs["height"], width=fs["width"], max_sequence_length=fs["max_sequence_length"],
                output_type=output_type).images


def _load_lora(world, out):
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

    pipe = StableDiffusion3Pipeline.from_pretrained(world / "sd3", local_files_only=True)
    pipe.load_lora_weights(out)
    pipe.scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(out, subfolder="scheduler")
    return pipe


def _errors(capsys):
    """The one error line on stderr (loaders' progress bars aside)."""
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1, lines
    return lines[0]


@pytest.mark.parametrize(("name", "transition"), [("lora", "cps(1)"), ("euler", "euler")])
def test_lora_export_reproduces_sample(world, ckpts, tmp_path, name, transition):
    from PIL import Image

    out = tmp_path / "lora"
    assert main(["export", "--ckpt", ckpts[name], "--out", str(out)]) == 0
    fs = json.loads((out / "fewstep.json").read_text())
    assert fs["role"] == "ema" and fs["format"] == "lora"  # dmd2 keeps an EMA: the role `sample` uses
    assert fs["sigmas"] == [1.0, 0.9, 0.75, 0.5] and fs["timesteps"] == [1000.0, 900.0, 750.0, 500.0]
    assert fs["transition"] == transition and fs["stochastic_sampling"] == (name == "lora") and fs["exact"]
    assert fs["guidance_scale"] == 1.0 and "sigmas=[1.0, 0.9, 0.75, 0.5]" in (out / "README.md").read_text()
    pipe = _load_lora(world, out)
    theirs = _diffusers(pipe, fs)
    ours = _ours(ckpts[name])
    diff = float((theirs - ours).abs().max())
    print(f"lora export ({transition}): max |diffusers - fewstep-rl| = {diff:.3g}")
    assert diff < TOL
    assert float((ours - _ours(ckpts[name], role="teacher")).abs().max()) > 1e-2  # the LoRA matters
    # the PNGs `fewstep-rl sample` writes equal diffusers' PIL images (to one level of rounding)
    assert main(["sample", "--ckpt", ckpts[name], "--prompt", PROMPTS[0], "--prompt", PROMPTS[1], "--seed",
                 str(SEED), "--out", str(tmp_path / "pngs")]) == 0
    pil = _diffusers(pipe, fs, output_type="pil")
    for i, img in enumerate(pil):
        png = np.asarray(Image.open(tmp_path / "pngs" / f"{i:05d}.png"), dtype=np.int16)
        assert np.abs(png - np.asarray(img, dtype=np.int16)).max() <= 1


def test_generator_role_and_folds_and_merges(world, ckpts, tmp_path):
    """--role generator; a fold and a merge stack into one LoRA of rank 3·r that equals the role exactly."""
    out = tmp_path / "gen"
    assert main(["export", "--ckpt", ckpts["folded"], "--out", str(out), "--role", "generator"]) == 0
    fs = json.loads((out / "fewstep.json").read_text())
    assert fs["role"] == "generator" and fs["lora"]["r"] == 6
    diff = float((_diffusers(_load_lora(world, out), fs) - _ours(ckpts["folded"], role="generator")).abs().max())
    print(f"lora export (merge + fold + role): max diff = {diff:.3g}")
    assert diff < TOL
    out2 = tmp_path / "ema"
    assert main(["export", "--ckpt", ckpts["folded"], "--out", str(out2), "--role", "ema"]) == 0
    fs2 = json.loads((out2 / "fewstep.json").read_text())
    ema = _ours(ckpts["folded"], role="ema")
    assert float((_diffusers(_load_lora(world, out2), fs2) - ema).abs().max()) < TOL
    assert float((ema - _ours(ckpts["folded"], role="generator")).abs().max()) > 1e-3  # two different roles


def test_merged_export_is_a_pipeline_directory(world, ckpts, tmp_path):
    from diffusers import DiffusionPipeline

    out = tmp_path / "merged"
    assert main(["export", "--ckpt", ckpts["folded"], "--out", str(out), "--merge"]) == 0
    fs = json.loads((out / "fewstep.json").read_text())
    assert fs["format"] == "merged" and fs["role"] == "ema"
    pipe = DiffusionPipeline.from_pretrained(out, local_files_only=True)
    assert type(pipe).__name__ == "StableDiffusion3Pipeline" and pipe.scheduler.config.stochastic_sampling
    diff = float((_diffusers(pipe, fs) - _ours(ckpts["folded"])).abs().max())
    print(f"merged export: max diff = {diff:.3g}")
    assert diff < TOL


def test_full_copy_roles(world, ckpts, tmp_path, capsys):
    from diffusers import DiffusionPipeline

    assert main(["export", "--ckpt", ckpts["full"], "--out", str(tmp_path / "x"), "--role", "generator"]) == 2
    err = _errors(capsys)
    assert "full copies" in err and "--merge" in err
    assert not (tmp_path / "x").exists()
    out = tmp_path / "full"
    assert main(["export", "--ckpt", ckpts["full"], "--out", str(out), "--merge", "--role", "generator"]) == 0
    fs = json.loads((out / "fewstep.json").read_text())
    ours = _ours(ckpts["full"], role="generator")
    diff = float((_diffusers(DiffusionPipeline.from_pretrained(out, local_files_only=True), fs) - ours).abs().max())
    print(f"full-copy merged export: max diff = {diff:.3g}")
    assert diff < TOL
    assert float((ours - _ours(ckpts["full"], role="teacher")).abs().max()) > 1e-2


def test_chain_without_a_diffusers_scheduler_is_exported_with_a_note(ckpts, tmp_path, capsys):
    out = tmp_path / "cps09"
    assert main(["export", "--ckpt", ckpts["cps09"], "--out", str(out)]) == 0
    fs = json.loads((out / "fewstep.json").read_text())
    assert fs["transition"] == "cps(0.9)" and not fs["exact"] and fs["stochastic_sampling"]  # nearest: cps(1)
    assert "note: the cps(0.9) chain has no diffusers scheduler" in capsys.readouterr().err
    assert "samples differ from `fewstep-rl sample`" in (out / "README.md").read_text()


def test_bad_input_is_one_line_exit_2(world, ckpts, tmp_path, capsys):
    def fails(args, *needles):
        assert main(["export", *args]) == 2
        err = _errors(capsys)
        for n in needles:
            assert n in err, err

    fails(["--ckpt", str(tmp_path / "none.ckpt"), "--out", str(tmp_path / "o")], "not found")
    fails(["--ckpt", ckpts["lora"]], "--out")
    fails(["--ckpt", ckpts["lora"], "--out", str(tmp_path / "o"), "--role", "fake_score"], "generator, ema")
    fails(["--ckpt", ckpts["lora"], "--out", str(tmp_path / "o"), "--rol", "ema"], "--role")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "f").write_text("x")
    fails(["--ckpt", ckpts["lora"], "--out", str(tmp_path / "full")], "not an empty directory")
    toy = build_method(resolve("dmd2", "toy2d"))
    toy.configure_model()
    fails(["--ckpt", _save(toy, tmp_path / "toy.ckpt"), "--out", str(tmp_path / "o")], "toy2d")
    shapes = build_method(resolve("dmd2", "shapes"))
    shapes.configure_model()
    fails(["--ckpt", _save(shapes, tmp_path / "shapes.ckpt"), "--out", str(tmp_path / "o")], "shapes", "CLIP")
    assert not (tmp_path / "o").exists()


# ------------------------------------------------------------------------------------------- flux (FLUX.1)
FLUX_SEQ = 16


@pytest.fixture(scope="module")
def flux(tmp_path_factory):
    """A tiny random FluxPipeline world and a 1-iteration dmd2 fit on it (Euler chain: the pipeline draws the same
    noise), its generator and EMA perturbed."""
    from diffusers import FluxPipeline

    d = tmp_path_factory.mktemp("export_flux")
    FluxPipeline(**tiny.flux_pipeline_components()).save_pretrained(d / "flux")
    (d / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    rc = main(["fit", "--method", "dmd2", "--world", "flux", "--world.path", str(d / "flux"), "--world.prompts",
               str(d / "prompts.txt"), "--world.resolution", "16", "--world.max_sequence_length", str(FLUX_SEQ),
               "--roles.rank", "2", "--method.transition", "euler", "--method.batch_size", "2",
               "--trainer.max_steps", "1", "--trainer.eval_samples", "2", "--trainer.run_dir", str(d / "run"),
               "--trainer.progress_bar", "false", "--rewards", "jpeg"])
    assert rc == 0
    m = load_checkpoint(str(d / "run" / "checkpoints" / "last.ckpt"))
    _perturb(m, "generator", 1)
    _perturb(m, "ema", 2)
    return d, _save(m, d / "flux.ckpt")


def _flux_call(pipe, fs):
    """The exported README.md's snippet: seed torch's generator, sigmas, guidance_scale = the guidance embedding."""
    pipe.set_progress_bar_config(disable=True)
    torch.manual_seed(SEED)
    return pipe(PROMPTS, num_inference_steps=fs["num_inference_steps"], sigmas=fs["sigmas"],
                guidance_scale=fs["guidance_scale"], height=fs["height"], width=fs["width"],
                max_sequence_length=fs["max_sequence_length"], output_type="pt").images


def test_flux_lora_and_merged_exports_reproduce_sample(flux, tmp_path):
    from diffusers import DiffusionPipeline, FlowMatchEulerDiscreteScheduler, FluxPipeline

    d, ckpt = flux
    out = tmp_path / "lora"
    assert main(["export", "--ckpt", ckpt, "--out", str(out), "--role", "generator"]) == 0
    fs = json.loads((out / "fewstep.json").read_text())
    assert fs["pipeline"] == "FluxPipeline" and fs["role"] == "generator" and fs["format"] == "lora"
    assert fs["guidance_scale"] == 3.5 and fs["transition"] == "euler" and fs["exact"] and fs["same_noise"]
    text = (out / "README.md").read_text()
    assert f"sigmas={fs['sigmas']}" in text and "guidance_scale=3.5" in text and "FluxPipeline" in text
    pipe = FluxPipeline.from_pretrained(d / "flux", local_files_only=True)
    pipe.load_lora_weights(out)
    pipe.scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(out, subfolder="scheduler")
    assert not pipe.scheduler.config.use_dynamic_shifting and pipe.scheduler.config.shift == 1.0
    theirs = _flux_call(pipe, fs)
    ours = _ours(ckpt, role="generator")
    assert torch.equal(pipe.scheduler.sigmas[:-1], torch.tensor(fs["sigmas"]))
    diff = float((theirs - ours).abs().max())
    print(f"flux lora export (euler): max |diffusers - fewstep-rl| = {diff:.3g}")
    assert diff < TOL
    assert float((ours - _ours(ckpt, role="teacher")).abs().max()) > 1e-2  # the LoRA matters
    # --merge: a FluxPipeline directory DiffusionPipeline loads; the EMA (the default role)
    out2 = tmp_path / "merged"
    assert main(["export", "--ckpt", ckpt, "--out", str(out2), "--merge"]) == 0
    fs2 = json.loads((out2 / "fewstep.json").read_text())
    pipe2 = DiffusionPipeline.from_pretrained(out2, local_files_only=True)
    assert type(pipe2).__name__ == "FluxPipeline" and fs2["role"] == "ema"
    ema = _ours(ckpt)
    diff2 = float((_flux_call(pipe2, fs2) - ema).abs().max())
    print(f"flux merged export: max diff = {diff2:.3g}")
    assert diff2 < TOL
    assert float((ema - ours).abs().max()) > 1e-3  # two different roles


def test_flux_stochastic_chain_says_its_renoising_noise_differs(flux, tmp_path, capsys):
    """cps(1) maps onto stochastic_sampling (the same chain), but FluxPipeline draws that noise packed: flagged."""
    d, ckpt = flux
    m = _rebuilt(ckpt, "method", "transition", "cps(1)")
    _perturb(m, "ema", 6)
    out = tmp_path / "cps1"
    assert main(["export", "--ckpt", _save(m, tmp_path / "cps1.ckpt"), "--out", str(out)]) == 0
    fs = json.loads((out / "fewstep.json").read_text())
    assert fs["exact"] and fs["stochastic_sampling"] and not fs["same_noise"]
    assert "packed token layout" in capsys.readouterr().err
    assert "re-noising differs" in (out / "README.md").read_text()


def test_other_worlds_are_refused_naming_the_supported(tmp_path, capsys):
    from types import SimpleNamespace

    from fewstep_rl.cli import UsageError
    from fewstep_rl.export import family_of
    from fewstep_rl.testing import cases

    d = cases._flux2_prepare(tmp_path)
    (tmp_path / "p.txt").write_text("a red cube\n")
    over = {"world.path": str(d), "world.prompts": str(tmp_path / "p.txt"), "world.resolution": 16,
            "world.max_sequence_length": cases.FLUX2_SEQ, "world.text_layers": list(cases.FLUX2_LAYERS),
            "roles.rank": 2}
    m = build_method(resolve("dmd2", "flux2", overrides=over, use_preset=False))
    m.configure_model()
    assert main(["export", "--ckpt", _save(m, tmp_path / "flux2.ckpt"), "--out", str(tmp_path / "o")]) == 2
    err = _errors(capsys)
    assert "world 'flux2' is not supported" in err and "sd3, flux" in err
    assert not (tmp_path / "o").exists()
    for name in ("zimage", "qwen_image"):
        with pytest.raises(UsageError, match=f"world '{name}' is not supported.*sd3, flux"):
            family_of(SimpleNamespace(world=SimpleNamespace(name=name)))
