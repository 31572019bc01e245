"""The glyphs world: word list and split, the renderer read back by the real rapidocr judge, the gold and ocr_ctc
rewards on rendered strips, a 16×48 teacher directory loading through the sd3 backbone, and (with the shipped
teacher) ``fewstep-rl fit --method rtdmd --world glyphs`` for 2 iterations."""

import dataclasses
import json
import os

os.environ["HF_HUB_OFFLINE"] = "1"

import pytest
import torch

pytest.importorskip("rapidocr")
pytest.importorskip("onnxruntime")

from fewstep_rl import registry  # noqa: E402
from fewstep_rl.rewards.ocr import OcrCtcReward  # noqa: E402
from fewstep_rl.rewards.shapes import GoldConfig, GoldReward  # noqa: E402
from fewstep_rl.worlds import pixel_teacher  # noqa: E402
from fewstep_rl.worlds.glyphs import judge, render, teacher, words  # noqa: E402
from fewstep_rl.worlds.glyphs.world import ASSETS, GlyphsConfig, GlyphsWorld  # noqa: E402

SHIPPED = (ASSETS / "teacher" / "transformer").is_dir()


def test_words_split_is_seeded_disjoint_and_ten_percent_held_out():
    train, held = words.split_words(seed=0)
    assert (train, held) == words.split_words(seed=0)
    assert words.split_words(seed=1)[1] != held
    assert len(held) == round(0.1 * (len(train) + len(held))) and not set(train) & set(held)
    allowed = set(words.ALPHABET)
    assert all(2 <= len(w) <= 5 and set(w) <= allowed for w in train + held)
    assert {len(w) for w in held} == {2, 3, 4, 5}
    assert words.meta("AB3") == {"prompt": "AB3", "text": "AB3", "judge": "ocr"}


def test_rendered_ground_truth_is_read_exactly_by_rapidocr():
    _, held = words.split_words(seed=0)
    batch = held[:64]
    imgs = render.render_batch(batch, seed=3)
    assert imgs.shape == (64, 3, 16, 48) and float(imgs.min()) >= 0 and float(imgs.max()) <= 1
    assert not torch.equal(imgs, render.render_batch(batch, seed=4))  # jitter
    acc, exact = judge.judge(imgs, batch)
    assert float(exact.float().mean()) >= 0.98 and float(acc.mean()) >= 0.99


def test_gold_reward_on_rendered_blank_and_wrong_words():
    batch = ["K4XB", "27", "MNPRS"]
    meta = [words.meta(w) for w in batch]
    imgs = render.render_batch(batch, seed=0)
    gold = GoldReward()
    assert torch.equal(gold(imgs, batch, meta), torch.ones(3))
    assert torch.equal(gold(torch.zeros_like(imgs), batch, meta), torch.zeros(3))
    wrong = render.render_batch(["K4XA", "27", "MN"], seed=0)  # one letter off, right, 3 of 5 letters missing
    s = gold(wrong, batch, meta)
    assert s[1] == 1 and 0.7 <= s[0] < 1 and s[2] < 0.5
    strict = GoldReward(GoldConfig(strict=True))(wrong, batch, meta)
    assert torch.equal(strict, torch.tensor([0.0, 1.0, 0.0]))
    with pytest.raises(ValueError, match="mixes"):
        gold(imgs[:2], ["K4XB", "a red circle"], [meta[0], {}])


def test_ocr_ctc_prefers_the_rendered_word_and_has_pixel_gradients():
    pytest.importorskip("easyocr_en_models")
    reward = OcrCtcReward()
    batch = ["K4XB", "H2M", "ZEBRA"]
    imgs = render.render_batch(batch, seed=0).requires_grad_(True)
    right = reward(imgs, batch, [words.meta(w) for w in batch])
    wrong_words = ["XB4K", "M2H", "ARBEZ"]
    wrong = reward(imgs, wrong_words, [words.meta(w) for w in wrong_words])
    blank = reward(torch.zeros(3, 3, 16, 48), batch, [words.meta(w) for w in batch])
    assert (right > wrong).all() and (right > blank).all()
    right.sum().backward()
    assert imgs.grad is not None and torch.isfinite(imgs.grad).all() and imgs.grad.abs().sum() > 0


def _tiny_teacher_dir(tmp_path):
    recipe = dataclasses.replace(
        teacher.RECIPE, transformer=dict(teacher.TEACHER_CFG, num_layers=1, attention_head_dim=8,
                                         caption_projection_dim=32, joint_attention_dim=32, pooled_projection_dim=32),
        text=dict(teacher.TEXT_CFG, hidden=32, projection_dim=32, intermediate=37, layers=2))
    tok, enc, tr = pixel_teacher.build_models(recipe, seed=0)
    d = tmp_path / "teacher"
    tr.save_pretrained(d / "transformer"), enc.save_pretrained(d / "text_encoder"), tok.save_pretrained(d / "tokenizer")
    (d / "teacher.json").write_text(json.dumps({"height": 16, "width": 48, "guidance": 2.0, "shift": 1.0}))
    return d, recipe, (tok, enc, tr)


def test_teacher_directory_loads_at_16x48_and_matches_the_training_velocity(tmp_path):
    d, recipe, (tok, enc, tr) = _tiny_teacher_dir(tmp_path)
    world = GlyphsWorld(GlyphsConfig(path=str(d)))
    assert world.teacher_guidance == 2.0 and world.resolution == (16, 48)
    bb = world.build_backbone()
    assert bb.sample_shape == (3, 16, 48)
    g = torch.Generator().manual_seed(0)
    x, s = torch.randn(2, 3, 16, 48, generator=g), torch.rand(2, generator=g)
    prompts = ["K4XB", "27"]
    with torch.no_grad():
        v = bb.velocity(x, s, bb.encode_prompts(prompts), "teacher")
        ref = pixel_teacher.velocity(recipe, tr, enc, tok, x, s, prompts)
    torch.testing.assert_close(v, ref, rtol=1e-4, atol=1e-5)


def test_world_registration_prompts_and_evaluation(tmp_path):
    assert registry.load("worlds", "glyphs") is GlyphsWorld
    d, *_ = _tiny_teacher_dir(tmp_path)
    world = GlyphsWorld(GlyphsConfig(path=str(d)))
    assert world.default_rewards() == [{"name": "ocr_ctc"}]
    ev = world.eval_prompts[:40]
    held = set(world.heldout_prompts)
    assert sum(p in held for p in ev) == 20 and not held & set(world.train_prompts)
    batch = ev[:8]
    m = world.evaluate(render.render_batch(batch, seed=1), batch)
    assert m["gold"] == 1.0 and m["exact"] == 1.0 and m["exact_heldout"] == 1.0 and m["exact_train"] == 1.0
    m0 = world.evaluate(torch.zeros(8, 3, 16, 48), batch)
    assert m0["gold"] == 0.0 and m0["exact"] == 0.0
    with pytest.raises(ValueError, match="has no transformer/ folder"):
        GlyphsWorld(GlyphsConfig(path=str(tmp_path / "none")))


@pytest.mark.skipif(not SHIPPED, reason="the glyphs teacher is not shipped in this checkout")
def test_fit_rtdmd_on_glyphs_runs_two_iterations_with_the_shipped_teacher(tmp_path):
    from fewstep_rl.testing.contract import run_fit

    # the preset (configs/rtdmd/glyphs.yaml), shrunk: one stage-1 iteration, then one stage-2 iteration
    over = {"method.batch_size": 4, "method.group_size": 2, "method.stage1_iterations": 1,
            "method.stage2_epochs_per_batch": 2, "trainer.eval_every": 1}
    _, _, logged = run_fit("rtdmd", tmp_path / "run", steps=2, world="glyphs", overrides=over)
    assert logged["_all_finite"] and logged["train/stage"] == 2
    evals = [json.loads(line) for line in (tmp_path / "run" / "eval.jsonl").read_text().splitlines()]
    assert [e["iteration"] for e in evals] == [0, 1, 2]
    for e in evals:
        assert {"gold", "exact", "gold_heldout", "exact_heldout", "gold_train", "reward/ocr_ctc"} <= set(e)
        assert 0 <= e["gold"] <= 1 and e["reward/ocr_ctc"] < 0


def test_shared_teacher_trainer_resumes_exactly_and_exports_a_loadable_teacher(tmp_path):
    _, recipe, _ = _tiny_teacher_dir(tmp_path)
    kw = dict(seed=0, batch=4, eval_every=1000, eval_n=2, ckpt_every=2, progress=False)
    last = pixel_teacher.train_teacher(recipe, tmp_path / "a", steps=4, **kw)
    assert last["step"] == 4 and {"train_gold@25", "heldout_strict@4"} <= set(last)
    pixel_teacher.train_teacher(recipe, tmp_path / "b", steps=2, **kw)
    pixel_teacher.train_teacher(recipe, tmp_path / "b", steps=4, **kw)  # resumes from step 2
    a, b = (torch.load(tmp_path / d / "train_state.pt", weights_only=False) for d in ("a", "b"))
    assert a["step"] == b["step"] == 4
    for k in a["ema_tr"]:
        assert torch.equal(a["ema_tr"][k], b["ema_tr"][k]), k
    pixel_teacher.export(recipe, tmp_path / "a", tmp_path / "out")
    info = json.loads((tmp_path / "out" / "teacher.json").read_text())
    assert info["height"] == 16 and info["width"] == 48 and info["step"] == 4
    bb = GlyphsWorld(GlyphsConfig(path=str(tmp_path / "out"))).build_backbone()
    assert bb.sample_shape == (3, 16, 48)


def test_world_build_usage_errors():
    import subprocess
    import sys
    from pathlib import Path

    cli = str(Path(sys.executable).parent / "fewstep-rl")
    p = subprocess.run([cli, "world", "glyphs", "build", "--teacher_steps", "0"], capture_output=True, text=True)
    assert p.returncode == 2 and "--teacher_steps must be >= 1" in p.stderr and "Traceback" not in p.stderr
    p = subprocess.run([cli, "world", "glyphs", "build", "--bogus", "1"], capture_output=True, text=True)
    assert p.returncode == 2 and "bogus" in p.stderr


@pytest.mark.skipif(not SHIPPED, reason="the glyphs teacher is not shipped in this checkout")
def test_shipped_teacher_writes_held_out_words_that_rapidocr_reads():
    """Issue 19's bar on the shipped asset, through the real loading path (sd3 backbone, Euler + CFG 4, 25 steps):
    ≥ 0.6 exact on held-out words (measured 0.8+ on 256; 48 words here keep it to seconds), and its 4-step chain
    no better than 25 steps by more than noise."""
    from fewstep_rl.eval.generate import generate
    from fewstep_rl.sampling import Transition, sigma_grid

    world = GlyphsWorld(GlyphsConfig())
    bb = world.build_backbone().eval()
    held = world.heldout_prompts[:48]
    exact = {}
    for steps in (25, 4):
        imgs = generate(bb, "teacher", held, torch.Generator().manual_seed(0), sigma_grid(steps), Transition("euler"),
                        world.teacher_guidance)
        exact[steps] = world.evaluate(imgs, held)["exact_heldout"]
    assert exact[25] >= 0.6, exact
    assert exact[4] <= exact[25] + 0.1, exact


@pytest.mark.parametrize("method", registry.names("methods"))
def test_every_method_has_a_glyphs_preset_within_the_30_minute_budget(method):
    """Every seed method's glyphs preset resolves (no unknown keys), the reward-driven ones train on ocr_ctc, and each
    stops itself at 30 minutes (issue 19's budget). Flow-GRPO's carries the two settings that made it raise the judge
    in that budget."""
    from fewstep_rl.run import resolve

    r = resolve(method, "glyphs")
    assert isinstance(r.world, GlyphsConfig)
    if registry.load("methods", method).reward_driven:
        assert [x[0] for x in r.rewards] == ["ocr_ctc"]
    assert r.trainer.max_minutes == 30
    if method == "flow_grpo":
        assert r.method.shared_init_noise and r.method.optim.lr == 1e-3
