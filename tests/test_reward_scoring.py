"""How training scores rewards: weight-0 rewards are evaluation-only, and black-box scoring overlapped with the rest
of the rollout (``trainer.reward_overlap``) leaves every result unchanged."""

import lightning as L
import pytest

import fewstep_rl.testing.contract as contract
from fewstep_rl.eval.callbacks import RunCallback
from fewstep_rl.testing.contract import run_fit

FAULTY = "fewstep_rl.testing.faulty:FaultyReward"  # the linear reward with a call counter (mode ok: never misbehaves)
REWARD_DRIVEN = ["crd", "di_star", "didr", "flow_grpo", "nft", "refl", "rtdmd", "tdm_r1"]
STAGE2 = {"rtdmd": {"method.stage1_iterations": 1}}  # rtdmd scores rewards in stage 2 only


class _CallsPerBatch(L.Callback):
    """Records the counter of the eval-only reward after every training batch."""

    def __init__(self) -> None:
        self.seen: list[int] = []

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        self.seen.append(_reward(module, "faulty").calls)


def _reward(module, name):
    return next(r for r in module.eval_rewards.rewards if r.name == name)


@pytest.mark.parametrize("method", REWARD_DRIVEN)
def test_weight0_reward_is_never_called_in_training_but_evaluated(method, tmp_path, monkeypatch):
    rewards = [{"name": "linear", "w": [1.0, 0.0]}, {"name": FAULTY, "weight": 0, "w": [0.0, 1.0]}]
    probe = _CallsPerBatch()
    real = contract.assemble
    monkeypatch.setattr(contract, "assemble", lambda r, d, cbs, **kw: real(r, d, [*cbs, probe], **kw))
    module, trainer, logged = run_fit(
        method, tmp_path, steps=3, overrides={"rewards": rewards, "trainer.eval_every": 0, **STAGE2.get(method, {})})
    assert probe.seen == [0, 0, 0], f"{method}: the weight-0 reward was scored in training ({probe.seen})"
    assert module.rewards.names == ["linear"] and module.eval_rewards.names == ["linear", "faulty"]
    assert logged["_all_finite"] == 1.0
    final = next(c for c in trainer.callbacks if isinstance(c, RunCallback)).final
    assert _reward(module, "faulty").calls > 0, "evaluation did not score the weight-0 reward"
    assert "reward/faulty" in final and "reward/linear" in final, sorted(final)
    assert final["reward/total"] == pytest.approx(final["reward/linear"], abs=1e-6)  # weight 0: not in the total


def test_all_weights_zero_is_a_clear_error():
    from fewstep_rl.config import ConfigError
    from fewstep_rl.run import build_method, resolve
    from fewstep_rl.testing.contract import TINY

    with pytest.raises(ConfigError, match="nonzero weight"):
        build_method(resolve("flow_grpo", "toy2d", (), {**TINY, "rewards": [{"name": "linear", "weight": 0}]}))
