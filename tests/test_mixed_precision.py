"""bf16-mixed on CPU (issue 20 item 5): under autocast the PPO ratio at the first inner step is exactly 1, and the
log-probabilities, advantages, ratios and losses stay fp32 (flow_grpo, and RTDMD's stage-2 PPO branch)."""

import importlib

import pytest
import torch

from fewstep_rl.testing.contract import run_fit

CASES = {
    "flow_grpo": {},
    "rtdmd": {"method.stage1_iterations": 0, "method.batch_size": 4, "method.group_size": 4},
}


@pytest.mark.parametrize("method", sorted(CASES))
def test_bf16_mixed_keeps_ppo_in_fp32_and_first_ratio_exactly_one(method, tmp_path, monkeypatch):
    mod = importlib.import_module(f"fewstep_rl.methods.{method}")
    calls = []
    real = mod.ppo_clip_loss

    def recording(log_prob, old_log_prob, adv, *args, **kwargs):
        loss, m = real(log_prob, old_log_prob, adv, *args, **kwargs)
        calls.append({"autocast": torch.is_autocast_enabled("cpu"), "lp": log_prob.dtype, "old": old_log_prob.dtype,
                      "adv": adv.dtype, "loss": loss.dtype, "ratio": m["ratio_mean"].dtype,
                      "same_lp": torch.equal(log_prob.detach(), old_log_prob.detach()),
                      "ratio_one": bool((torch.exp(log_prob.detach() - old_log_prob) == 1).all())})
        return loss, m

    monkeypatch.setattr(mod, "ppo_clip_loss", recording)
    _, _, logged = run_fit(method, tmp_path, steps=1, overrides={"trainer.precision": "bf16-mixed", **CASES[method]})
    assert calls, f"{method}: no PPO step ran"
    first = calls[0]
    assert first["autocast"], "the training step did not run under CPU autocast (the test would prove nothing)"
    assert first["same_lp"] and first["ratio_one"], f"{method}: ratio at the first inner step is not exactly 1"
    for c in calls:
        assert (c["lp"], c["old"], c["adv"], c["loss"], c["ratio"]) == (torch.float32,) * 5, c
    assert logged["_all_finite"] == 1.0
