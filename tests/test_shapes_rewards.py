"""Rewards of the ``shapes`` world: the shipped proxy (learned, differentiable) and the gold verifier wrapper."""

import json
import math

import numpy as np
import pytest
import torch

from fewstep_rl.rewards.shapes import GoldConfig, GoldReward, ProxyReward
from fewstep_rl.worlds.shapes import grammar, proxy, render, verify


@pytest.fixture(scope="module")
def reward() -> ProxyReward:
    return ProxyReward()


@pytest.fixture(scope="module")
def scenes() -> tuple[torch.Tensor, list[str], list[str]]:
    rng = np.random.default_rng(123)
    pool = grammar.all_prompts()
    prompts = [pool[i] for i in rng.integers(len(pool), size=64)]
    images = render.render_batch(prompts, seed=7)
    wrong = [proxy.perturb(p, rng) if k % 2 else pool[rng.integers(len(pool))] for k, p in enumerate(prompts)]
    return images, prompts, wrong


def test_shipped_weights_load_and_are_small():
    net = proxy.load_proxy()
    assert proxy.num_params(net) <= 250_000 and not net.training
    assert proxy.DEFAULT_WEIGHTS.stat().st_size <= 1_000_000
    info = json.loads(proxy.DEFAULT_WEIGHTS.with_suffix(".json").read_text())
    assert info["arch"]["image_size"] == 16 and info["metrics"]["spearman"] >= 0.8


def test_proxy_scores_matched_high_and_mismatched_low(reward, scenes):
    images, prompts, wrong = scenes
    gold_wrong, _, _ = verify.score_batch(images, wrong)
    with torch.no_grad():
        right, bad = reward(images, prompts), reward(images, wrong)
    assert right.shape == (64,) and right.dtype == torch.float32
    assert float(right.mean()) > 0.8, right
    fully_wrong = gold_wrong < 0.5
    assert float(bad[fully_wrong].mean()) < 0.4, bad
    # pairs the verifier separates (gold gap > 0.25): the proxy orders them the same way
    gold_right, _, _ = verify.score_batch(images, prompts)
    clear = (gold_right - gold_wrong) > 0.25
    assert float((right[clear] > bad[clear]).float().mean()) >= 0.85


def test_proxy_gradient_flows_to_images(reward, scenes):
    images, prompts, _ = scenes
    x = (0.5 * images[:8] + 0.25).requires_grad_(True)
    out = reward(x, prompts[:8])
    (grad,) = torch.autograd.grad(out.sum(), x)
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0
    assert ProxyReward.differentiable and not GoldReward.differentiable


def test_proxy_resizes_other_sizes_differentiably(reward, scenes):
    _, prompts, _ = scenes
    big = render.render_batch(prompts[:8], seed=3, size=32).requires_grad_(True)
    out = reward(big, prompts[:8])
    assert out.shape == (8,) and torch.isfinite(out).all()
    (grad,) = torch.autograd.grad(out.sum(), big)
    assert grad.shape == big.shape and grad.abs().sum() > 0
    scaled = ProxyReward(ProxyReward.Config(scale=2.0))
    with torch.no_grad():
        torch.testing.assert_close(scaled(big.detach(), prompts[:8]), 2 * out.detach())
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        reward(torch.zeros(2, 16, 16), ["a red circle"] * 2)


def test_tokenize_canonicalises_aliases():
    t = proxy.tokenize(["a red circle to the left of a blue square", "one red circle left of a blue square.", "xyz"])
    assert t.shape == (3, proxy.MAX_TOKENS) and t.dtype == torch.long
    assert torch.equal(t[0], t[1]) and t[0, 0] == proxy.CLS
    # mirrored wordings of one scene ("A right of B" = "B left of A") share their tokens
    m = proxy.tokenize(
        [
            "a blue square right of a red circle",
            "a red circle left of a blue square",
            "a red circle above a blue square",
        ]
    )
    assert torch.equal(m[0], m[1]) and not torch.equal(m[1], m[2])
    assert torch.equal(
        proxy.tokenize(["a red circle above a blue square"]), proxy.tokenize(["a blue square below a red circle"])
    )
    assert t[2, :3].tolist() == [proxy.CLS, proxy.UNK, proxy.PAD]


def test_gold_reward_matches_verifier_and_strict(scenes):
    images, prompts, wrong = scenes
    x = torch.cat([images[:16], images[:16]]).requires_grad_(True)
    ps = prompts[:16] + wrong[:16]
    out = GoldReward()(x, ps)
    expect, strict, _ = verify.score_batch(x.detach(), ps)
    assert torch.equal(out, expect) and not out.requires_grad
    s = GoldReward(GoldConfig(strict=True))(x, ps)
    assert torch.equal(s, strict.float()) and set(s.tolist()) == {0.0, 1.0}
    assert s[:16].sum() == 16


def test_spearman_hand_checked():
    assert proxy.spearman([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    assert proxy.spearman([1, 2, 3, 4], [10, 20, 30, 1000]) == pytest.approx(1.0)
    assert proxy.rankdata([10, 20, 20, 5]).tolist() == [2.0, 3.5, 3.5, 1.0]
    # ranks x = (1, 2.5, 2.5, 4), y = (1, 2, 3, 4); centred: (-1.5, 0, 0, 1.5), (-1.5, -.5, .5, 1.5) → 4.5 / √(4.5 · 5)
    assert proxy.spearman([1, 2, 2, 3], [1, 2, 3, 4]) == pytest.approx(4.5 / math.sqrt(22.5))
    assert math.isnan(proxy.spearman([1, 1, 1], [1, 2, 3]))
    assert proxy.pearson(torch.tensor([1.0, 2.0, 3.0]), torch.tensor([2.0, 4.0, 6.0])) == pytest.approx(1.0)


def test_load_proxy_errors_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing.safetensors"):
        proxy.load_proxy(tmp_path / "nothing.safetensors")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "proxy.safetensors").write_bytes(b"not a safetensors file")
    (bad / "proxy.json").write_text(proxy.DEFAULT_WEIGHTS.with_suffix(".json").read_text())
    with pytest.raises(ValueError, match="bad/proxy.safetensors"):
        proxy.load_proxy(bad)
    other = tmp_path / "other"
    small = proxy.ProxyNet(proxy.ProxyConfig(text_dim=32, channels=(8, 8, 16, 16), hidden=32))
    proxy.save_proxy(small, other)
    info = json.loads((other / "proxy.json").read_text())
    info["arch"]["hidden"] = 64
    (other / "proxy.json").write_text(json.dumps(info))
    with pytest.raises(ValueError, match="other/proxy.safetensors"):
        proxy.load_proxy(other / "proxy.safetensors")
    with pytest.raises(FileNotFoundError, match="proxy.safetensors"):
        ProxyReward(ProxyReward.Config(path=str(tmp_path)))


def test_make_batch_labels_are_exact_gold():
    x, prompts, gold = proxy.make_batch(32, seed=5)
    assert x.shape == (32, 3, 16, 16) and float(x.min()) >= 0 and float(x.max()) <= 1
    assert torch.equal(gold, verify.score_batch(x, prompts)[0])
    x2, _, _ = proxy.make_batch(32, seed=5)
    assert torch.equal(x, x2)
    # hard-negative prompt pairs and mirrored copies keep the labels exact
    x, prompts, gold = proxy.make_batch(16, seed=6, pair=True, mirror=True)
    assert x.shape[0] == len(prompts) == 64 and torch.equal(x[:16], x[16:32]) and torch.equal(x[32:], x[:32].flip(-1))
    assert torch.equal(gold, verify.score_batch(x, prompts)[0])
    assert all(p != q for p, q in zip(prompts[:16], prompts[16:32]))


def test_perturb_jitter_and_mirror_stay_exact():
    rng = np.random.default_rng(0)
    for p in grammar.all_prompts()[::5]:
        q = proxy.perturb(p, rng)
        assert q != p and grammar.format_prompt(grammar.parse(q)) == q
    img = proxy.render_jittered("three red circles", rng)
    assert img.shape == (3, 16, 16) and set(np.unique(img)) <= {0.0, 1.0}
    assert proxy.mirror_lr("a red circle left of a blue square") == "a red circle right of a blue square"
    assert proxy.mirror_lr("a red circle above a blue square") == "a red circle above a blue square"
    assert proxy.mirror_lr("two red circles") == "two red circles"


def test_train_proxy_smoke(tmp_path):
    metrics = proxy.train_proxy(tmp_path, seed=1, steps=20, batch=16, eval_n=64, progress=False)
    assert (tmp_path / "proxy.safetensors").is_file() and (tmp_path / "proxy.json").is_file()
    assert set(metrics) >= {"spearman", "pearson", "mae", "train_seconds"}
    net = proxy.load_proxy(tmp_path)
    assert torch.isfinite(net.score(torch.rand(2, 3, 16, 16), ["a red circle", "two blue squares"])).all()


def test_proxy_variant_selects_the_render_only_weights(scenes):
    from fewstep_rl.rewards.shapes import ProxyConfig

    imgs, prompts, _ = scenes
    renders = ProxyReward(ProxyConfig(variant="renders"))
    by_path = ProxyReward(ProxyConfig(path=str(proxy.ASSETS / "proxy-renders")))
    calibrated = ProxyReward()
    r = renders(imgs, prompts)
    assert torch.equal(r, by_path(imgs, prompts)) and not torch.allclose(r, calibrated(imgs, prompts))
    with pytest.raises(ValueError, match="either path or variant"):
        ProxyReward(ProxyConfig(path=str(proxy.ASSETS / "proxy-renders"), variant="renders"))
