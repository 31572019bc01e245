"""How training scores rewards: weight-0 rewards are evaluation-only, and black-box scoring overlapped with the rest
of the rollout (``trainer.reward_overlap``) leaves every result unchanged."""

import threading

import lightning as L
import pytest
import torch

import fewstep_rl.testing.contract as contract
from fewstep_rl.eval.callbacks import RunCallback
from fewstep_rl.rewards import MultiReward, Reward, RolloutScores
from fewstep_rl.rewards.base import RewardError
from fewstep_rl.rewards.toy2d import LinearConfig, LinearReward
from fewstep_rl.testing.contract import run_fit

FAULTY = "fewstep_rl.testing.faulty:FaultyReward"  # the linear reward with a call counter (mode ok: never misbehaves)
REWARD_DRIVEN = ["crd", "di_star", "didr", "flow_grpo", "nft", "refl", "rtdmd", "tdm_r1"]
STAGE2 = {"rtdmd": {"method.stage1_iterations": 1}}  # rtdmd scores rewards in stage 2 only


class _AfterBatch(L.Callback):
    """Records ``probe(module)`` after every training batch (before the final evaluation scores anything)."""

    def __init__(self, probe) -> None:
        self.probe, self.seen = probe, []

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        self.seen.append(self.probe(module))


def _fit_probed(monkeypatch, probe, *args, **kwargs):
    """``run_fit`` with an :class:`_AfterBatch` callback; returns (module, trainer, logged, what it saw)."""
    cb = _AfterBatch(probe)
    real = contract.assemble
    monkeypatch.setattr(contract, "assemble", lambda r, d, cbs, **kw: real(r, d, [*cbs, cb], **kw))
    return (*run_fit(*args, **kwargs), cb.seen)


def _reward(module, name):
    return next(r for r in module.eval_rewards.rewards if r.name == name)


@pytest.mark.parametrize("method", REWARD_DRIVEN)
def test_weight0_reward_is_never_called_in_training_but_evaluated(method, tmp_path, monkeypatch):
    rewards = [{"name": "linear", "w": [1.0, 0.0]}, {"name": FAULTY, "weight": 0, "w": [0.0, 1.0]}]
    module, trainer, logged, seen = _fit_probed(
        monkeypatch, lambda m: _reward(m, "faulty").calls, method, tmp_path, steps=3,
        overrides={"rewards": rewards, "trainer.eval_every": 0, **STAGE2.get(method, {})})
    assert seen == [0, 0, 0], f"{method}: the weight-0 reward was scored in training ({seen})"
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


# --------------------------------------------------------------------------- trainer.reward_overlap
SLOW = "fewstep_rl.perf.bench_reward:SlowReward"  # black box (mean of the sample), records its scoring threads
CHUNKED = {  # every method that scores rollouts without gradients, with its rollout cut in two chunks
    "flow_grpo": {"method.opt_steps_per_epoch": 2},
    "crd": {"method.opt_steps_per_epoch": 2},
    "nft": {"method.opt_steps_per_epoch": 2},
    "tdm_r1": {"method.micro_batches": 2},
    "rtdmd": {"method.micro_batches": 2, "method.stage1_iterations": 1},
}


def _fit_overlap(monkeypatch, method, tmp_path, flag, world="toy2d", rewards=None):
    """(module, names of the threads that scored the ``slow`` reward in training) after 3 iterations."""
    over = {**CHUNKED[method], "trainer.eval_every": 0, "trainer.reward_overlap": flag}
    if rewards is not None:
        over["rewards"] = rewards
    slow = (lambda m: set(_reward(m, "slow").threads)) if rewards else (lambda m: None)
    module, _, _, seen = _fit_probed(monkeypatch, slow, method, tmp_path / f"overlap-{flag}", steps=3, world=world,
                                     overrides=over)
    return module, seen[-1]


@pytest.mark.parametrize("method", sorted(CHUNKED))
def test_reward_overlap_trains_the_same_weights_bit_for_bit(method, tmp_path, monkeypatch):
    """A differentiable (linear, scored on the whole rollout) and a black-box reward (scored per chunk, in the
    background with the flag on): every role equal to the flag-off run."""
    rewards = [{"name": "linear", "w": [1.0, 0.0]}, {"name": SLOW, "ms_per_sample": 0.0, "weight": 0.5}]
    (on, threads_on), (off, threads_off) = (_fit_overlap(monkeypatch, method, tmp_path, f, rewards=rewards)
                                            for f in (True, False))
    a, b = contract.role_state(on), contract.role_state(off)
    for role in a:
        assert contract.same(a, b, role), f"{method}: role {role} differs with trainer.reward_overlap"
    assert threads_off == {"MainThread"}
    assert threads_on and all(t.startswith("reward") for t in threads_on), threads_on


def test_reward_overlap_is_bit_exact_on_shapes_with_the_gold_verifier(tmp_path, monkeypatch):
    """The shapes preset (gold verifier, a black box; two rollout chunks) trains identically with the flag on."""
    (on, _), (off, _) = (_fit_overlap(monkeypatch, "nft", tmp_path, flag, world="shapes") for flag in (True, False))
    a, b = contract.role_state(on), contract.role_state(off)
    assert all(contract.same(a, b, role) for role in a)


class _Gate(Reward):
    """Black box that waits (up to 10 s) for the caller to open a gate: scoring overlaps the caller only if
    ``add`` returns before the reward finishes."""

    name = "gate"
    differentiable = False

    def __init__(self) -> None:
        super().__init__()
        self.gate, self.opened_in_time = threading.Event(), None

    def score(self, samples, prompts, meta):
        self.opened_in_time = self.gate.wait(timeout=10.0)
        return samples.sum(1)


def test_rollout_scores_overlap_the_callers_next_chunk():
    gate, lin = _Gate(), LinearReward(LinearConfig(w=[1.0, 2.0]))
    scores = RolloutScores(MultiReward([gate, lin], [1.0, 0.5]), decode=lambda x: 2 * x, overlap=True)
    x = [torch.arange(6.0).reshape(3, 2), torch.ones(2, 2)]
    scores.add(x[0], ["a"] * 3)  # returns while the gate is shut: the black box scores in the background
    scores.add(x[1], ["b"] * 2)
    gate.gate.set()
    out = scores.result()
    assert gate.opened_in_time is True
    images = 2 * torch.cat(x)
    assert torch.equal(out["gate"], images.sum(1)) and torch.equal(out["linear"], lin(images, ["a"] * 5))
    assert torch.equal(scores.combined(), out["gate"] + 0.5 * out["linear"])


class _MatMul(Reward):
    """Black box whose scores depend on the autocast state (a bf16 matmul rounds differently)."""

    name = "matmul"
    differentiable = False

    def score(self, samples, prompts, meta):
        w = torch.linspace(-1, 1, samples.shape[1] * 7).reshape(samples.shape[1], 7)
        return (samples @ w).float().pow(2).sum(1) / 3


def test_background_scoring_runs_under_the_callers_autocast():
    r, x = _MatMul(), torch.randn(5, 16, generator=torch.Generator().manual_seed(0))
    plain = r.submit(x, ["p"] * 5).result()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        direct = r(x, ["p"] * 5)
        background = r.submit(x, ["p"] * 5).result()
    assert not torch.equal(direct, plain)  # autocast matters here ...
    assert torch.equal(background, direct)  # ... and the thread used the caller's
    assert torch.equal(plain, r(x, ["p"] * 5))


class _Broken(Reward):
    name = "broken"
    differentiable = False

    def score(self, samples, prompts, meta):
        return torch.full((samples.shape[0],), float("nan"))


@pytest.mark.parametrize("overlap", [True, False])
def test_background_errors_surface_at_result(overlap):
    """With overlap a black box's failure is raised by ``result`` (before any optimiser step), otherwise by ``add``;
    malformed input is refused at ``add`` either way, on the caller's thread."""
    scores = RolloutScores(MultiReward([_Broken()]), overlap=overlap)
    with pytest.raises(RewardError, match="broken.*NaN"):
        scores.add(torch.zeros(2, 2), ["a", "b"])
        scores.result()
    with pytest.raises(ValueError, match="2 samples, 3 prompts"):
        scores.add(torch.zeros(2, 2), ["a", "b", "c"])
