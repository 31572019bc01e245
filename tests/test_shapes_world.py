"""The shapes world end to end: the shipped teacher loads through the sd3 backbone, LoRA roles, checkpoints hold
only adapter weights, and ``sample`` / ``eval`` work for the teacher and for a checkpoint."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fewstep_rl import registry
from fewstep_rl.testing.contract import run_fit
from fewstep_rl.worlds.shapes import grammar, render
from fewstep_rl.worlds.shapes.world import ShapesWorld

CLI = [str(Path(sys.executable).parent / "fewstep-rl")]


def run(*args):
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})


def test_shipped_teacher_loads_and_roles_start_equal():
    world = ShapesWorld()
    bb = world.build_backbone()
    assert bb.sample_shape == (3, 16, 16) and world.teacher_guidance == 4.0
    bb.add_role("generator")
    g = torch.Generator().manual_seed(0)
    x, s = torch.randn(4, 3, 16, 16, generator=g), torch.rand(4, generator=g)
    cond = bb.encode_prompts(["a red circle", "two blue squares", "a green triangle above a red square", ""])
    assert torch.equal(bb.velocity(x, s, cond, "generator"), bb.velocity(x, s, cond, "teacher"))
    v = bb.velocity(x, s, cond, "teacher", guidance=4.0)
    assert v.shape == x.shape and torch.isfinite(v).all()


def test_world_prompts_split_and_gold_on_ground_truth():
    world = ShapesWorld()
    assert not set(world.train_prompts) & set(world.heldout_prompts)
    ev = world.eval_prompts
    assert set(ev) == set(world.train_prompts) | set(world.heldout_prompts)
    prompts = ev[:64]
    m = world.evaluate(render.render_batch(prompts, seed=0), prompts)
    assert m["gold"] >= 0.99 and m["strict"] >= 0.99
    assert "gold_heldout" in m and "gold_train" in m
    assert world.prompt_meta("a red circle") == grammar.meta("a red circle")


def test_bad_world_directory_is_one_clear_error(tmp_path):
    p = run("fit", "--method", "dmd2", "--world", "shapes", "--world.path", str(tmp_path / "nothing"))
    assert p.returncode == 2 and "Traceback" not in p.stderr and "nothing" in p.stderr


def test_checkpoint_on_shapes_holds_only_lora_weights(tmp_path):
    ck = tmp_path / "a.ckpt"
    module, _, logged = run_fit("dmd2", tmp_path, steps=2, world="shapes", save_as=str(ck))
    assert logged["_all_finite"] == 1.0
    sd = torch.load(ck, weights_only=False)["state_dict"]
    frozen = [k for k in sd if ".lora_" not in k and k != "backbone.store.base_merges"]  # the merge count
    assert sd and not frozen, frozen[:5]
    base = sum(p.numel() for p in module.backbone.transformer.parameters() if not p.requires_grad)
    assert sum(v.numel() for v in sd.values()) < 0.1 * base
    assert module.world.roles_config().rank == 2 and module.backbone.store.rank == 2


@pytest.mark.parametrize("source", ["teacher", "ckpt"])
def test_sample_and_eval_commands_on_shapes(source, tmp_path):
    if source == "teacher":
        args = ["--teacher", "--world", "shapes", "--steps", "4", "--guidance", "4.0"]
    else:
        ck = tmp_path / "run" / "last.ckpt"
        run_fit("dmd2", tmp_path / "run", steps=1, world="shapes", save_as=str(ck))
        args = ["--ckpt", str(ck)]
    out = tmp_path / "pngs"
    p = run("sample", *args, "--n", "3", "--prompt", "a red circle", "--out", str(out))
    assert p.returncode == 0, p.stderr[-2000:]
    assert sorted(f.name for f in out.glob("*.png")) == ["00000.png", "00001.png", "00002.png"]
    assert json.loads((out / "prompts.json").read_text()) == ["a red circle"] * 3
    p = run("eval", *args, "--n", "16", "--rewards", "gold,proxy")
    assert p.returncode == 0, p.stderr[-2000:]
    res = json.loads(p.stdout.strip().splitlines()[-1])
    assert {"reward/gold", "reward/proxy", "gold", "strict"} <= set(res)
    assert res["reward/gold"] == pytest.approx(res["gold"])


def test_shapes_is_registered():
    assert "shapes" in registry.names("worlds") and {"gold", "proxy"} <= set(registry.names("rewards"))
