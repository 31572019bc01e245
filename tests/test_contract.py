"""Contract tests, parametrised over every registered method (architecture.md §5)."""

import pytest
import torch

from fewstep_rl import registry
from fewstep_rl.testing.contract import role_state, run_fit, run_interrupted_and_resumed, same, teacher_probe

METHODS = registry.names("methods")


@pytest.mark.parametrize("method", METHODS)
def test_trainable_roles_change_frozen_do_not(method, tmp_path):
    from fewstep_rl.run import build_method, resolve
    from fewstep_rl.testing.contract import TINY

    fresh = build_method(resolve(method, "toy2d", (), TINY))
    fresh.configure_model()
    before, probe = role_state(fresh), teacher_probe(fresh)
    module, _, logged = run_fit(method, tmp_path, steps=6)
    after = role_state(module)
    assert logged["_all_finite"] == 1.0
    assert any(k.endswith("loss") for k in logged), logged
    for role in module.trainable_roles:
        assert not same(before, after, role), f"{method}: trainable role {role} did not change"
    assert torch.equal(probe, teacher_probe(module)), f"{method}: the frozen teacher changed"


@pytest.mark.parametrize("method", METHODS)
def test_checkpoint_holds_only_role_weights(method, tmp_path):
    ck = tmp_path / "a.ckpt"
    module, _, _ = run_fit(method, tmp_path, steps=2, save_as=str(ck))
    sd = torch.load(ck, weights_only=False)["state_dict"]
    assert sd, "empty checkpoint"
    for key in sd:
        assert key.startswith("backbone."), key
        assert module.backbone.is_role_key(key[len("backbone."):]), f"frozen weight {key} in checkpoint"
    n_role = sum(p.numel() for r in module.backbone.roles for p in module.backbone.role_parameters(r))
    assert sum(v.numel() for v in sd.values()) == n_role


@pytest.mark.parametrize("method", METHODS)
def test_resume_reproduces_next_steps_bit_for_bit(method, tmp_path):
    full, _, _ = run_fit(method, tmp_path / "full", steps=7)
    resumed = run_interrupted_and_resumed(method, tmp_path, steps=7, interrupt_after=3)
    a, b = role_state(full), role_state(resumed)
    for role in a:
        assert same(a, b, role), f"{method}: role {role} differs after resume"
    assert resumed.iteration == full.iteration and resumed.updates == full.updates
