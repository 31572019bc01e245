"""The roles layer: the ``roles`` config section (world defaults, world checks, the keys of earlier versions) and
checkpoints written before role stores existed."""

import pytest
import torch

from fewstep_rl.config import ConfigError
from fewstep_rl.roles import RolesConfig, add_roles
from fewstep_rl.run import resolve

SD3 = {"world.path": ".", "world.prompts": __file__}


def test_roles_section_defaults_come_from_the_world():
    assert resolve("dmd2", "shapes", (), {}, use_preset=False).roles == RolesConfig("lora", 16, 32.0, None)
    assert resolve("dmd2", "sd3", (), SD3, use_preset=False).roles == RolesConfig("lora", 32, 64.0, None)
    assert resolve("dmd2", "toy2d", (), {}).roles == RolesConfig()
    r = resolve("dmd2", "shapes", (), {"roles.mode": "full", "roles.rank": 4}, use_preset=False)
    assert (r.roles.mode, r.roles.rank, r.roles.alpha) == ("full", 4, 32.0)
    assert r.to_dict()["roles"] == {"mode": "full", "rank": 4, "alpha": 32.0, "targets": None,
                                    "activation_checkpointing": []}
    assert resolve("dmd2", "sd3", (), SD3).roles.rank == 64  # the preset's roles section


@pytest.mark.parametrize(("over", "match"), [
    ({"roles.rnak": 4}, "roles.rank"),
    ({"roles.mode": "lorra"}, "'lora'"),
    ({"roles.rank": 0}, "rank must be >= 1"),
    ({"roles.alpha": -1.0}, "alpha must be > 0"),
])
def test_bad_roles_keys_are_config_errors(over, match):
    with pytest.raises(ConfigError, match=match):
        resolve("dmd2", "shapes", (), over)


def test_toy2d_refuses_roles_that_do_not_apply():
    with pytest.raises(ConfigError, match="roles.mode must be 'lora'"):
        resolve("dmd2", "toy2d", (), {"roles.mode": "full"})
    with pytest.raises(ConfigError, match="roles.rank does not apply to toy2d"):
        resolve("dmd2", "toy2d", (), {"roles.rank": 8})


def test_world_keys_of_earlier_versions_are_read_as_roles(capsys):
    r = resolve("dmd2", "shapes", (), {"world.roles_mode": "full", "world.lora_rank": 4, "world.lora_alpha": 8})
    assert r.roles == RolesConfig("full", 4, 8.0, None)
    assert "note: world.roles_mode is now roles.mode" in capsys.readouterr().err
    assert "roles_mode" not in r.to_dict()["world"]
    with pytest.raises(ConfigError, match="same setting"):
        resolve("dmd2", "shapes", (), {"world.lora_rank": 4, "roles.rank": 8})
    old = resolve("dmd2", "shapes", (), {}).to_dict()  # a checkpoint's recorded config from before the section
    old["world"].update(roles_mode="full", lora_rank=2, lora_alpha=4)
    del old["roles"]
    assert resolve(None, raw=old).roles == RolesConfig("full", 2, 4.0, None)


def _legacy(sd: dict) -> dict:
    """The state dict as versions before the role stores wrote it (store state directly under the backbone)."""
    return {k.removeprefix("store."): v for k, v in sd.items()}


def test_toy2d_checkpoint_of_earlier_versions_loads():
    from fewstep_rl.worlds.toy2d import Toy2DWorld

    world = Toy2DWorld()
    bb = world.build_backbone()
    add_roles(bb, ["generator", "fake_score"], {"ema": "generator"})
    with torch.no_grad():
        for r in ("generator", "fake_score"):
            for p in bb.role_parameters(r):
                p.add_(0.1 * torch.randn(p.shape, generator=torch.Generator().manual_seed(1)))
    bb.merge_role("fake_score")
    bb.fold_role("generator", into=["ema"])
    with torch.no_grad():
        bb.role_parameters("generator")[-1].add_(0.3)
    legacy = _legacy(bb.state_dict())
    assert {"adapters.generator.net.0.weight", "merged.0.net.0.weight", "folded.fold0__generator__ema.net.0.weight"} \
        <= set(legacy)
    fresh = world.build_backbone()
    add_roles(fresh, ["generator", "fake_score"], {"ema": "generator"})
    fresh.load_state_dict(legacy)  # strict
    assert fresh.folds == bb.folds and len(fresh.store.merged) == 1
    x, c = torch.randn(8, 2, generator=torch.Generator().manual_seed(2)), bb.encode_prompts(["left", "right"] * 4)
    for r in ("teacher", "generator", "fake_score", "ema"):
        assert torch.equal(fresh.velocity(x, 0.6, c, r), bb.velocity(x, 0.6, c, r)), r


def test_shapes_checkpoint_of_earlier_versions_loads_through_the_method(tmp_path):
    """A LoRA run's checkpoint with ``merged.*``/``base_merges`` keys (before role stores) resumes and samples."""
    from fewstep_rl.cli import load_checkpoint
    from fewstep_rl.testing.contract import run_fit

    ck = tmp_path / "a.ckpt"
    module, _, _ = run_fit("dmd2", tmp_path / "run", steps=1, world="shapes", save_as=str(ck))
    module.backbone.merge_role("fake_score")  # a merge record in the file
    ckpt = torch.load(ck, weights_only=False)
    sd = {f"backbone.{k}": v for k, v in module.backbone.state_dict().items() if module.backbone.is_role_key(k)}
    ckpt["state_dict"] = {k.replace("backbone.store.", "backbone."): v for k, v in sd.items()}
    assert "backbone.base_merges" in ckpt["state_dict"] and "backbone.merged.0" in "|".join(ckpt["state_dict"])
    ckpt["fewstep"]["config"]["world"].update(roles_mode="lora", lora_rank=2)  # the config keys of then
    del ckpt["fewstep"]["config"]["roles"]
    torch.save(ckpt, ck)
    back = load_checkpoint(str(ck))
    assert int(back.backbone.store.base_merges) == 1
    g = torch.Generator().manual_seed(0)
    x, cond = torch.randn(2, 3, 16, 16, generator=g), module.backbone.encode_prompts(["a red circle", ""])
    with torch.no_grad():
        for r in ("teacher", "generator", "fake_score", "ema"):
            assert torch.equal(back.backbone.velocity(x, 0.5, cond, r), module.backbone.velocity(x, 0.5, cond, r)), r
