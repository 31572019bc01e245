"""The ``sd3`` world (a local diffusers SD3/SD3.5 directory + prompt files) on a tiny random pipeline."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"

import json

import pytest
import torch

pytest.importorskip("diffusers")

from fewstep_rl.backbones import tiny  # noqa: E402
from fewstep_rl.config import ConfigError  # noqa: E402
from fewstep_rl.run import resolve  # noqa: E402
from fewstep_rl.worlds.sd3 import SD3World, SD3WorldConfig, read_prompts  # noqa: E402


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from diffusers import StableDiffusion3Pipeline

    d = tmp_path_factory.mktemp("sd35")
    StableDiffusion3Pipeline(**tiny.sd3_pipeline_components()).save_pretrained(d)
    return d


@pytest.fixture()
def prompts(tmp_path):
    f = tmp_path / "prompts.txt"
    f.write_text("# training prompts\na red cube\n\ntwo blue balls\n")
    return f


def test_reads_prompt_files_and_sizes_samples_from_the_vae(model_dir, prompts):
    w = SD3World(SD3WorldConfig(path=str(model_dir), prompts=str(prompts), resolution=16))
    assert w.train_prompts == ["a red cube", "two blue balls"] == w.eval_prompts
    bb = w.build_backbone()
    # the tiny VAE has one block (factor 1) and 4 latent channels
    assert bb.sample_shape == (4, 16, 16)
    x = torch.randn(2, *bb.sample_shape)
    v = bb.velocity(x, torch.tensor([0.5, 0.5]), bb.encode_prompts(w.train_prompts), role="teacher", guidance=4.5)
    assert v.shape == x.shape and torch.isfinite(v).all()
    assert bb.decode(x).shape == (2, 3, 16, 16)


def test_bad_paths_are_one_clear_error(tmp_path, model_dir, prompts):
    with pytest.raises(ValueError, match="world.path"):
        SD3World(SD3WorldConfig(prompts=str(prompts)))
    with pytest.raises(ValueError, match="not a directory"):
        SD3World(SD3WorldConfig(path=str(tmp_path / "nope"), prompts=str(prompts)))
    with pytest.raises(ValueError, match="world.prompts"):
        SD3World(SD3WorldConfig(path=str(model_dir), prompts=str(tmp_path / "none.txt")))
    empty = tmp_path / "empty.txt"
    empty.write_text("# nothing\n\n")
    with pytest.raises(ValueError, match="holds no prompts"):
        read_prompts(empty, "prompts")
    with pytest.raises(ValueError, match="multiple of 8"):
        SD3WorldConfig(resolution=100)


def test_fit_runs_on_the_world_through_the_cli(model_dir, prompts, tmp_path):
    from fewstep_rl.cli import main

    run = tmp_path / "run"
    rc = main(["fit", "--method", "dmd2", "--world", "sd3", "--world.path", str(model_dir), "--world.prompts",
               str(prompts), "--world.resolution", "16", "--roles.rank", "2", "--method.batch_size", "2",
               "--trainer.max_steps", "2", "--trainer.eval_samples", "2", "--trainer.run_dir", str(run),
               "--trainer.progress_bar", "false", "--rewards", "jpeg"])
    assert rc == 0
    final = json.loads((run / "final_metrics.json").read_text())
    assert "reward/jpeg" in final, final
    assert (run / "checkpoints" / "last.ckpt").is_file()


def test_every_shipped_sd3_preset_resolves():
    from importlib.resources import files

    root = files("fewstep_rl.configs")
    names = sorted(p.name for p in root.iterdir() if p.is_dir() and (p / "sd3.yaml").is_file())
    assert "dmd2" in names
    for name in names:
        try:
            r = resolve(name, "sd3")
        except ConfigError as e:  # a preset naming a reward or key that does not exist
            raise AssertionError(f"configs/{name}/sd3.yaml: {e}") from None
        assert r.world.path and r.rewards
