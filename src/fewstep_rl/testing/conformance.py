"""The backbone conformance suite: what every backbone family must pass to ship (issue 16, architecture.md §3).

A family enters with one :class:`BackboneCase` in :data:`fewstep_rl.testing.cases.CASES` (a plugin builds its own
and calls :meth:`Conformance.run_all`): how to write a tiny model directory of the family's real classes in its real
diffusers layout, how to load it through the family's real loading code with a given ``roles`` section, and how the
family's diffusers pipeline samples from that directory. ``tests/test_conformance.py`` runs every applicable check
(:func:`checks_for`) of every case in ``make test`` (the CLI fits: ``tests/test_conformance_fit.py``). The checks,
with their tolerances (``atol`` is the case's float32 rounding allowance, default 1e-5 in velocity units):

* ``pipeline_parity`` — k-step Euler sampling of the teacher equals the family's diffusers pipeline at equal noise
  and σ grid (``σ = 1, 0.9, 0.75, 0.5, 0``, guidance 1 and ``cfg_scale``): latents and decoded images within
  ``pipeline_atol``.
* ``cfg`` — ``velocity(guidance=w)`` equals ``v(∅) + w (v(c) − v(∅))`` from two separate passes (teacher and a
  perturbed generator), within ``atol``·(1 + w)·(1 + max |v|); guidance 1 is exactly the conditional pass.
* ``roles_start_equal[mode]`` — adding roles leaves the global RNG alone (unless the case says otherwise); every
  role (and ``reference``, ``None``) is *bit-identical* to the teacher, with and without CFG; a perturbed generator
  differs while the other roles stay bit-identical; a loss through the generator reaches only its parameters.
* ``stores_agree`` — LoRA and full-copy stores give bit-identical outputs at init, and after one identical SGD step
  (lr 0.01 on a summed squared error) agree within ``100·atol`` while each moved by more than ``10³·atol`` and by
  more than 10³ times their difference: a LoRA of rank ≥ fan-in with orthonormal ``A`` and ``alpha = rank``
  (scale 1) makes the first SGD step on ``B`` change the weight by exactly ``−η ∇_W L``, the step a full copy takes
  on the same adapted weights (``∇_A = 0`` while ``B = 0``).
* ``merge_fold[mode]`` — a merge makes the teacher the old role (``atol``) and resets the role to it (exactly); a
  reset makes any role the base again (exactly); a fold keeps the folded roles' functions (``atol``) and leaves the
  teacher bit-identical; a fresh backbone that loads the role keys reproduces every role bit for bit (merge records
  and folds come back from the state dict).
* ``state_dict[mode]`` — role keys hold every role parameter, otherwise only buffers (of full copies, counters),
  and no frozen base weight (before any merge); a fresh backbone that loads them, or the whole state dict strictly,
  reproduces every role bit for bit.
* ``save_pretrained`` — the family writes its (merged) base in its own layout and loads it back to the same teacher.
* ``export[mode]`` — after a merge and a fold, a plain freshly loaded backbone whose base network loads
  ``store.role_state_dict(role)`` computes that role (``atol``); for LoRA, the weights as loaded plus
  ``up @ down`` of ``store.lora_delta(role)`` do too (what an exported LoRA or merged pipeline holds).
* ``log_prob_batch`` — the log-probabilities ``recompute_log_prob`` gives a flow-SDE rollout are batch-size
  invariant: batch of 4 vs each sample alone vs halves, within ``logp_atol``·(1 + |log p|).
* ``ppo_ratio`` — the PPO ratio ``exp(log p_new − log p_old)`` is 1 at the first inner step (rollout without
  gradient, recompute with) at every step, within ``ratio_atol`` (default 0: exactly 1); its gradient reaches the
  generator only.
* ``cli_fit[method]`` — ``fewstep-rl fit`` of every registered method for 2 iterations on the case's world through
  the real CLI (no preset; batch 2, groups of 2; RTDMD crosses its stage boundary), finishing with a checkpoint.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from fewstep_rl.roles import RolesConfig, add_roles
from fewstep_rl.sampling import Transition, recompute_log_prob, sample, sigma_grid

TRAINABLE = ("generator", "fake_score")
SNAPSHOTS = {"ema": "generator"}
ROLES = ("generator", "fake_score", "ema")

#: ``(model directory, prompts, noise, σ grid, guidance) -> (latents, images in [0, 1])`` of a diffusers pipeline.
PipelineFn = Callable[[Path, Sequence[str], Tensor, Tensor, float], tuple[Tensor, Tensor]]


@dataclass(frozen=True)
class BackboneCase:
    """One backbone family (or one world over a family) under the suite.

    Attributes:
        name: test id.
        prepare: writes the model directory under the given scratch folder (or returns a shipped one).
        load: ``(model directory, roles section) -> backbone`` through the family's real loading code.
        prompts: prompts the checks use (at least 2).
        modes: the ``roles.mode`` values the family supports.
        lora: the ``roles`` section of the checks' ``lora`` backbones (small rank: fast, still non-trivial).
        pipeline: the family's diffusers pipeline run (``None``: no pipeline parity, e.g. an analytic teacher).
        world: the world the CLI fit runs on (``None``: no CLI fit).
        world_args: ``(model directory, prompts file) -> CLI arguments`` selecting and sizing that world.
        rewards: ``--rewards`` of the CLI fit (``None``: the world's defaults).
        save: writes the backbone's (merged) base in the family's layout (``None``: no such export).
        cfg_scale: the CFG scale the checks use.
        atol: float32 rounding allowance of outputs that are equal up to rounding (velocity units).
        pipeline_atol: pipeline parity tolerance (latents and images).
        logp_atol: batch-size invariance of log-probabilities, relative to ``1 + |log p|``.
        ratio_atol: ``|ratio − 1|`` allowed at the first inner step.
        exports: the store has a base network to export (``role_state_dict``; not toy2d's analytic teacher).
        roles_draw_global_rng: adding a role draws from the global RNG (toy2d: its adapters are built with
            ``nn.Linear``'s default initialisation before being re-initialised from a seeded generator; kept so
            runs stay bit-identical to earlier versions). Diffusers families must not.
    """

    name: str
    prepare: Callable[[Path], Path]
    load: Callable[[Path, RolesConfig | None], Any]
    prompts: tuple[str, ...]
    modes: tuple[str, ...] = ("lora", "full")
    lora: RolesConfig = field(default_factory=lambda: RolesConfig("lora", 4, 8.0))
    pipeline: PipelineFn | None = None
    world: str | None = None
    world_args: Callable[[Path, Path], list[str]] = field(default=lambda d, p: [])
    rewards: str | None = None
    save: Callable[[Any, Path], None] | None = None
    cfg_scale: float = 3.0
    atol: float = 1e-5
    pipeline_atol: float = 1e-5
    logp_atol: float = 1e-6
    ratio_atol: float = 0.0
    roles_draw_global_rng: bool = False
    exports: bool = True


def checks_for(case: BackboneCase, methods: Sequence[str] = ()) -> list[tuple[str, str | None]]:
    """``(check, argument)`` pairs that apply to ``case`` (``methods``: the methods of the CLI fit)."""
    out: list[tuple[str, str | None]] = []
    if case.pipeline is not None:
        out.append(("pipeline_parity", None))
    out.append(("cfg", None))
    out += [("roles_start_equal", m) for m in case.modes]
    if {"lora", "full"} <= set(case.modes):
        out.append(("stores_agree", None))
    out += [("merge_fold", m) for m in case.modes]
    out += [("state_dict", m) for m in case.modes]
    if case.save is not None:
        out.append(("save_pretrained", None))
    if case.exports:
        out += [("export", m) for m in case.modes]
    out += [("log_prob_batch", None), ("ppo_ratio", None)]
    if case.world is not None:
        out += [("cli_fit", m) for m in methods]
    return out


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@torch.no_grad()
def perturb(bb: Any, role: str, seed: int = 1, scale: float = 0.05) -> None:
    """Random non-zero weights for ``role`` (every parameter of its adapter or copy)."""
    g = _gen(seed)
    for p in bb.role_parameters(role):
        p.add_(scale * torch.randn(p.shape, generator=g).to(p))


def _max(a: Tensor, b: Tensor) -> float:
    return float((a.double() - b.double()).abs().max())


class Conformance:
    """The checks of one :class:`BackboneCase` (each ``check_*`` raises ``AssertionError`` on a failure).

    Args:
        case: the case.
        workdir: a scratch folder (the model directory is prepared there once, on first use).
    """

    def __init__(self, case: BackboneCase, workdir: Path) -> None:
        self.case, self.workdir = case, Path(workdir)
        self._dir: Path | None = None

    @property
    def model_dir(self) -> Path:
        if self._dir is None:
            self.workdir.mkdir(parents=True, exist_ok=True)
            self._dir = Path(self.case.prepare(self.workdir))
        return self._dir

    def backbone(self, roles: RolesConfig | str = "lora", with_roles: bool = True) -> Any:
        """A freshly loaded backbone (``roles``: a section, or a mode: ``case.lora`` / full copies), with a
        generator, a fake score and an EMA of the generator unless ``with_roles`` is false."""
        if isinstance(roles, str):
            roles = self.case.lora if roles == "lora" else RolesConfig(mode=roles)
        bb = self.case.load(self.model_dir, roles)
        if with_roles:
            add_roles(bb, TRAINABLE, SNAPSHOTS)
        return bb

    def inputs(self, bb: Any, n: int = 2, seed: int = 0) -> tuple[Tensor, Tensor, Any]:
        """``(x, σ, cond)``: noise-level inputs for ``n`` samples of the case's prompts."""
        g = _gen(seed)
        x = torch.randn((n, *bb.sample_shape), generator=g)
        sigma = 0.1 + 0.8 * torch.rand(n, generator=g)
        prompts = [self.case.prompts[i % len(self.case.prompts)] for i in range(n)]
        return x, sigma, bb.encode_prompts(prompts)

    def run_all(self, methods: Sequence[str] = ()) -> None:
        """Every applicable check, in order (for plugins; ``tests/test_conformance.py`` runs them one by one)."""
        for check, arg in checks_for(self.case, methods):
            getattr(self, f"check_{check}")(*(() if arg is None else (arg,)))

    # ------------------------------------------------------------------------------------------------ checks
    @torch.no_grad()
    def check_pipeline_parity(self) -> None:
        """k-step Euler of the teacher = the family's diffusers pipeline (equal noise and σ grid)."""
        c = self.case
        assert c.pipeline is not None
        bb = self.backbone("lora")
        perturb(bb, "generator")  # roles exist and are non-zero: the teacher must still be the plain base
        sig = sigma_grid(4, shift=3.0)
        noise = torch.randn((2, *bb.sample_shape), generator=_gen(0))
        prompts = list(c.prompts[:2])
        cond = bb.encode_prompts(prompts)
        for w in (1.0, c.cfg_scale):
            traj = sample(lambda x, s, w=w: bb.velocity(x, s, cond, role="teacher", guidance=w), noise, sig,
                          Transition("euler"))
            latents, images = c.pipeline(self.model_dir, prompts, noise.clone(), sig, w)
            assert latents.shape == traj.final.shape, (latents.shape, traj.final.shape)
            err = _max(latents, traj.final)
            assert err < c.pipeline_atol, f"{c.name}: latents differ from the pipeline by {err:.3g} (guidance {w})"
            ours = bb.decode(traj.final)
            assert ours.shape == images.shape, (ours.shape, images.shape)
            err = _max(images, ours)
            assert err < c.pipeline_atol, f"{c.name}: images differ from the pipeline by {err:.3g} (guidance {w})"

    @torch.no_grad()
    def check_cfg(self) -> None:
        """Batched CFG = ``v(∅) + w (v(c) − v(∅))`` from separate passes; guidance 1 = the conditional pass."""
        bb = self.backbone("lora")
        perturb(bb, "generator")
        x, sigma, cond = self.inputs(bb, n=3)
        w = self.case.cfg_scale
        for role in ("teacher", "generator"):
            v_c = bb.velocity(x, sigma, cond, role=role)
            v_u = bb.velocity(x, sigma, bb.null_cond(x.shape[0]), role=role)
            assert _max(v_c, v_u) > 1e3 * self.case.atol, f"{self.case.name}: conditioning has no effect"
            assert torch.equal(bb.velocity(x, sigma, cond, role=role, guidance=1.0), v_c)
            err = _max(bb.velocity(x, sigma, cond, role=role, guidance=w), v_u + w * (v_c - v_u))
            scale = 1 + max(float(v_c.abs().max()), float(v_u.abs().max()))
            assert err <= self.case.atol * (1 + w) * scale, f"{self.case.name}: CFG of {role} off by {err:.3g}"

    def check_roles_start_equal(self, mode: str) -> None:
        """Every role bit-identical to the teacher at creation; roles train separately."""
        state = torch.get_rng_state()
        bb = self.backbone(mode)
        if not self.case.roles_draw_global_rng:
            assert torch.equal(torch.get_rng_state(), state), f"{self.case.name}: adding roles drew from the global RNG"
        x, sigma, cond = self.inputs(bb)
        w = self.case.cfg_scale
        with torch.no_grad():
            teacher = bb.velocity(x, sigma, cond, role="teacher")
            teacher_w = bb.velocity(x, sigma, cond, role="teacher", guidance=w)
            for role in (*ROLES, "reference", None):
                assert torch.equal(bb.velocity(x, sigma, cond, role=role), teacher), role
                assert torch.equal(bb.velocity(x, sigma, cond, role=role, guidance=w), teacher_w), role
            perturb(bb, "generator")
            assert _max(bb.velocity(x, sigma, cond, role="generator"), teacher) > 1e3 * self.case.atol
            for role in ("fake_score", "ema", "teacher"):
                assert torch.equal(bb.velocity(x, sigma, cond, role=role), teacher), role
        role_ids = {r: {id(p) for p in bb.role_parameters(r)} for r in bb.roles}
        assert all(role_ids.values()) and not role_ids["generator"] & role_ids["fake_score"]
        assert all(p.requires_grad for r in TRAINABLE for p in bb.role_parameters(r))
        assert not any(p.requires_grad for p in bb.role_parameters("ema"))
        loss = bb.velocity(x, sigma, cond, role="generator", guidance=w).square().mean()
        (loss + 0 * bb.velocity(x, sigma, cond, role="ema").sum()).backward()
        assert any(p.grad is not None and bool(p.grad.abs().sum() > 0) for p in bb.role_parameters("generator"))
        others = {id(p) for r in ("fake_score", "ema") for p in bb.role_parameters(r)}
        frozen = [p for p in bb.parameters() if id(p) not in role_ids["generator"]]
        assert others <= {id(p) for p in frozen} and all(p.grad is None for p in frozen)

    def check_stores_agree(self) -> None:
        """LoRA vs full copy: equal at init, equal after one identical SGD step (see the module docstring)."""
        probe = self.backbone("lora")
        rank = max(layer.in_features for _, layer in probe.store.layers())
        del probe
        lora = self.backbone(RolesConfig("lora", rank, float(rank)), with_roles=False)
        full = self.backbone(RolesConfig("full"), with_roles=False)
        lora.add_role("generator")
        full.add_role("generator")
        g = _gen(7)
        with torch.no_grad():
            for _, layer in lora.store.layers():
                a = layer.lora_A["generator"].weight  # (r, fan_in), r >= fan_in: orthonormal columns
                q, _ = torch.linalg.qr(torch.randn(a.shape, generator=g, dtype=torch.float64))
                a.copy_(q.to(a))
        x, sigma, cond = self.inputs(lora, n=2)
        target = torch.randn(x.shape, generator=g)
        with torch.no_grad():
            before = lora.velocity(x, sigma, cond, role="generator")
            assert torch.equal(before, full.velocity(x, sigma, cond, role="generator"))
            assert torch.equal(before, lora.velocity(x, sigma, cond, role="teacher"))
        adapted = [full.store.copies["generator"].get_submodule(path).weight for path, _ in lora.store.layers()]
        lr = 0.01
        for bb, params in ((lora, lora.role_parameters("generator")), (full, adapted)):
            opt = torch.optim.SGD(params, lr=lr)
            loss = (bb.velocity(x, sigma, cond, role="generator") - target).square().sum()
            loss.backward()
            opt.step()
        with torch.no_grad():
            v_l = lora.velocity(x, sigma, cond, role="generator")
            v_f = full.velocity(x, sigma, cond, role="generator")
        moved, err = _max(v_l, before), _max(v_l, v_f)
        assert moved > 1e3 * self.case.atol, f"{self.case.name}: the SGD step moved the output by only {moved:.3g}"
        assert err < min(100 * self.case.atol, 1e-3 * moved), f"{self.case.name}: LoRA and full copy differ by " \
                                                              f"{err:.3g} after one identical SGD step (moved {moved:.3g})"

    def check_merge_fold(self, mode: str) -> None:
        """Merge and fold keep the functions they promise, and come back from the state dict."""
        c = self.case
        # merge
        bb = self.backbone(mode)
        perturb(bb, "generator")
        perturb(bb, "fake_score", seed=2)
        x, sigma, cond = self.inputs(bb)
        with torch.no_grad():
            old_gen = bb.velocity(x, sigma, cond, role="generator")
            old_teacher = bb.velocity(x, sigma, cond, role="teacher")
            bb.merge_role("generator")
            teacher = bb.velocity(x, sigma, cond, role="teacher")
            assert _max(teacher, old_gen) < c.atol and _max(teacher, old_teacher) > 1e3 * c.atol
            assert torch.equal(bb.velocity(x, sigma, cond, role="generator"), teacher)
            assert _max(bb.velocity(x, sigma, cond, role="fake_score"), teacher) > 1e3 * c.atol
        self._reloads(bb, mode, x, sigma, cond)
        bb.reset_role("fake_score")  # a reset makes a role the (merged) base again
        with torch.no_grad():
            assert torch.equal(bb.velocity(x, sigma, cond, role="fake_score"), teacher)
        # fold
        bb = self.backbone(mode)
        for i, r in enumerate(ROLES):
            perturb(bb, r, seed=i + 1)
        with torch.no_grad():
            before = {r: bb.velocity(x, sigma, cond, role=r) for r in ("teacher", *ROLES)}
            bb.fold_role("generator", into=["ema"])
            bb.fold_role("fake_score")
            after = {r: bb.velocity(x, sigma, cond, role=r) for r in ("teacher", *ROLES)}
        assert torch.equal(after["teacher"], before["teacher"])
        for r, src in (("generator", "generator"), ("ema", "generator"), ("fake_score", "fake_score")):
            assert _max(after[r], before[src]) < c.atol, f"{c.name}: fold changed {r} by {_max(after[r], before[src])}"
        perturb(bb, "generator", seed=9)
        self._reloads(bb, mode, x, sigma, cond)

    def check_state_dict(self, mode: str) -> None:
        """Role keys = role parameters (+ counters), never a frozen base weight; round trips bit for bit."""
        bb = self.backbone(mode)
        for i, r in enumerate(ROLES):
            perturb(bb, r, seed=i + 1)
        names = {id(p): n for n, p in bb.named_parameters()}
        role_names = {names[id(p)] for r in bb.roles for p in bb.role_parameters(r)}
        sd = bb.state_dict()
        keys = {k for k in sd if bb.is_role_key(k)}
        assert role_names <= keys, sorted(role_names - keys)[:3]
        buffers = {n for n, _ in bb.named_buffers()}
        assert keys - role_names <= buffers, sorted(keys - role_names - buffers)[:3]
        frozen = {n for n in names.values() if n not in role_names}
        assert not frozen & keys, sorted(frozen & keys)[:3]
        x, sigma, cond = self.inputs(bb)
        self._reloads(bb, mode, x, sigma, cond)
        whole = self.backbone(mode)
        whole.load_state_dict(sd)  # strict, base weights included
        with torch.no_grad():
            for r in ("teacher", *ROLES):
                assert torch.equal(whole.velocity(x, sigma, cond, role=r), bb.velocity(x, sigma, cond, role=r)), r

    @torch.no_grad()
    def check_save_pretrained(self) -> None:
        """The family's export of the (merged) base loads back to the same teacher."""
        assert self.case.save is not None
        bb = self.backbone("lora")
        perturb(bb, "generator")
        bb.merge_role("generator")
        out = self.workdir / "saved"
        self.case.save(bb, out)
        back = self.case.load(out, None)
        assert not back.roles
        x, sigma, cond = self.inputs(bb)
        err = _max(back.velocity(x, sigma, cond, role="teacher"), bb.velocity(x, sigma, cond, role="teacher"))
        assert err < self.case.atol, f"{self.case.name}: saved base differs by {err:.3g}"

    @torch.no_grad()
    def check_export(self, mode: str) -> None:
        """A plain backbone loading ``role_state_dict`` (or the loaded weights + ``lora_delta``) computes the role."""
        bb = self.backbone(mode)
        perturb(bb, "generator")
        bb.merge_role("generator")
        perturb(bb, "generator", seed=2)
        bb.fold_role("generator", into=["ema"])
        perturb(bb, "generator", seed=3)
        x, sigma, cond = self.inputs(bb)
        exports = {r: bb.store.role_state_dict(r) for r in ("generator", "ema")}
        if mode == "lora":
            plain = self.case.load(self.model_dir, None).store.base.state_dict()  # the weights as loaded
            for path, (up, down) in bb.store.lora_delta("generator").items():
                w = plain[f"{path}.weight"]
                plain[f"{path}.weight"] = (w.double() + up.double() @ down.double()).to(w.dtype)
            exports["generator (loaded + lora_delta)"] = plain
        for name, sd in exports.items():
            fresh = self.case.load(self.model_dir, None)
            fresh.store.base.load_state_dict(sd)
            role = name.split(" ")[0]
            err = _max(fresh.velocity(x, sigma, cond, role="teacher"), bb.velocity(x, sigma, cond, role=role))
            assert err < self.case.atol, f"{self.case.name}: export of {name} differs from the role by {err:.3g}"

    def check_log_prob_batch(self) -> None:
        """Log-probabilities of a flow-SDE rollout: batch of 4 = each sample alone = halves."""
        bb = self.backbone("lora")
        perturb(bb, "generator")
        traj, fn = self._rollout(bb, n=4)
        with torch.no_grad():
            for step in range(traj.stop):
                full = recompute_log_prob(fn(range(4)), traj, step)[0]
                for idx in ([0], [1], [2], [3], [0, 1], [2, 3]):
                    part = recompute_log_prob(fn(idx), _rows(traj, idx), step)[0]
                    err = float(((part.double() - full[idx].double()).abs() / (1 + full[idx].double().abs())).max())
                    assert err <= self.case.logp_atol, f"{self.case.name}: log p of rows {idx} at step {step} " \
                                                       f"depends on the batch (relative {err:.3g})"

    def check_ppo_ratio(self) -> None:
        """``exp(log p_new − log p_old) = 1`` at the first inner step, at every step; its gradient reaches the
        generator only."""
        bb = self.backbone("lora")
        perturb(bb, "generator")
        traj, fn = self._rollout(bb, n=3)
        total = 0
        for step in range(traj.stop):
            new = recompute_log_prob(fn(range(3)), traj, step)[0]
            ratio = torch.exp(new - traj.log_prob[step])
            err = float((ratio.detach().double() - 1).abs().max())
            assert err <= self.case.ratio_atol, f"{self.case.name}: PPO ratio {err:.3g} from 1 at step {step}"
            total = total + ratio.sum()
        total.backward()
        gen = {id(p) for p in bb.role_parameters("generator")}
        assert any(p.grad is not None for p in bb.role_parameters("generator"))
        assert all(p.grad is None for p in bb.parameters() if id(p) not in gen)

    def check_cli_fit(self, method: str, run_dir: Path | None = None) -> None:
        """``fewstep-rl fit --method METHOD`` for 2 iterations on the case's world, through the real CLI."""
        from fewstep_rl import registry
        from fewstep_rl.cli import main
        from fewstep_rl.config import field_types

        c = self.case
        assert c.world is not None
        run = Path(run_dir or self.workdir / f"fit-{method}")
        model_dir = self.model_dir  # (creates the scratch folder)
        prompts = self.workdir / "prompts.txt"
        prompts.write_text("\n".join(c.prompts) + "\n")
        fields = field_types(registry.load("methods", method).Config)
        args = ["fit", "--method", method, "--world", c.world, *c.world_args(model_dir, prompts), "--no_preset",
                "--method.batch_size", "2", "--trainer.max_steps", "2", "--trainer.eval_samples", "2",
                "--trainer.run_dir", str(run), "--trainer.progress_bar", "false"]
        if "group_size" in fields:
            args += ["--method.group_size", "2"]
        if "stage1_iterations" in fields:  # RTDMD: iteration 1 in stage 1, iteration 2 in stage 2 (fold at the boundary)
            args += ["--method.stage1_iterations", "1"]
        if c.rewards is not None:
            args += ["--rewards", c.rewards]
        env = os.environ.get("FEWSTEP_RUN_DIR")
        try:
            rc = main(args)
        finally:  # the in-process CLI exports the run directory for child ranks: do not leak it into later runs
            os.environ.pop("FEWSTEP_RUN_DIR", None)
            if env is not None:
                os.environ["FEWSTEP_RUN_DIR"] = env
        assert rc == 0, f"{c.name}: fewstep-rl fit --method {method} exited with {rc}"
        final = json.loads((run / "final_metrics.json").read_text())
        assert final and all(math.isfinite(v) for v in final.values() if isinstance(v, float)), final
        ckpt = run / "checkpoints" / "last.ckpt"
        assert ckpt.is_file()
        if "stage1_iterations" in fields:  # the stage boundary folded the stage-1 roles, and the checkpoint has them
            assert any("fold0__generator" in k for k in torch.load(ckpt, weights_only=False)["state_dict"])

    # ------------------------------------------------------------------------------------------------ helpers
    def _reloads(self, bb: Any, mode: str, x: Tensor, sigma: Tensor, cond: Any) -> None:
        """A fresh backbone loading ``bb``'s role keys reproduces every role (and the teacher) bit for bit."""
        kept = {k: v for k, v in bb.state_dict().items() if bb.is_role_key(k)}
        fresh = self.backbone(mode)
        fresh.load_state_dict(kept, strict=False)
        assert fresh.folds == bb.folds
        with torch.no_grad():
            for r in ("teacher", *ROLES):
                assert torch.equal(fresh.velocity(x, sigma, cond, role=r), bb.velocity(x, sigma, cond, role=r)), \
                    f"{self.case.name}: role {r} differs after a state-dict round trip"

    def _rollout(self, bb: Any, n: int) -> tuple[Any, Callable[[Sequence[int]], Any]]:
        """A 3-step flow-SDE rollout of the generator (no gradient) and ``rows -> velocity function`` over it."""
        prompts = [self.case.prompts[i % len(self.case.prompts)] for i in range(n)]
        cond_rows = [bb.encode_prompts([p]) for p in prompts]

        def fn(rows: Sequence[int]) -> Callable[[Tensor, Tensor], Tensor]:
            cond = cond_rows[rows[0]] if len(rows) == 1 else bb.encode_prompts([prompts[i] for i in rows])
            return lambda x, s: bb.velocity(x, s, cond, role="generator")

        noise = torch.randn((n, *bb.sample_shape), generator=_gen(3))
        with torch.no_grad():
            traj = sample(fn(range(n)), noise, sigma_grid(3, shift=3.0), Transition("flow_sde", 0.7),
                          generator=_gen(4))
        return traj, fn


def _rows(traj: Any, idx: Sequence[int]) -> Any:
    """The trajectory of rows ``idx`` only."""
    from dataclasses import replace

    i = torch.tensor(list(idx))
    pick = ("x_in", "x_out", "sigma", "sigma_next", "v", "mean", "std", "log_prob")
    return replace(traj, **{k: [t[i] for t in getattr(traj, k)] for k in pick}, final=traj.final[i])
