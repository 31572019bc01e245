"""Proxy calibration on the teacher's samples (second stage of ``world shapes build``)."""

import json

import torch

from fewstep_rl.worlds.shapes import calibrate, proxy, verify
from fewstep_rl.worlds.shapes.world import ShapesWorld


def test_pool_labels_are_exact_gold_for_own_and_hard_negative_prompts():
    w = ShapesWorld()
    x, ps = calibrate.teacher_pool(None, w.train_prompts, 6, seed=0, samplers=(("euler", 2, 2.0), ("cps(1.0)", 2, 1.0)),
                                   batch=3)
    assert x.shape == (6, 3, 16, 16) and len(ps) == 6 and set(ps) <= set(w.train_prompts)
    assert float(x.min()) >= 0.0 and float(x.max()) <= 1.0
    images, prompts, gold = calibrate.paired(x, ps, seed=1)
    assert images.shape[0] == 12 and prompts[:6] == ps and prompts[6:] != ps
    ref, _, _ = verify.score_batch(images, prompts)
    torch.testing.assert_close(gold, ref.float())


def test_calibration_fits_the_pool():
    g = torch.Generator().manual_seed(0)
    images = torch.rand(32, 3, 16, 16, generator=g)
    prompts = ["a red circle"] * 32
    gold = (images[:, 0].mean((1, 2)) > 0.5).float()  # an arbitrary learnable label on these images
    net = proxy.load_proxy()
    before = [p.clone() for p in net.parameters()]
    bce = lambda: torch.nn.functional.binary_cross_entropy_with_logits(  # noqa: E731
        net(images, proxy.tokenize(prompts)), gold).item()
    loss0 = bce()
    calibrate.calibrate_proxy(net, (images, prompts, gold), steps=30, batch=32, lr=2e-3, progress=False, pool_frac=0.75)
    assert any(not torch.equal(a, b) for a, b in zip(before, net.parameters()))
    assert bce() < loss0 and not net.training and not any(p.requires_grad for p in net.parameters())


def test_shipped_proxy_records_its_calibration():
    info = json.loads(proxy.DEFAULT_WEIGHTS.with_suffix(".json").read_text())
    after, before = info["metrics"]["teacher_samples"], info["metrics"]["teacher_samples_before"]
    assert after["spearman"] >= 0.6 > before["spearman"]
    assert info["training"]["calibration"]["pool"] > 0
