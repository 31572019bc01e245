"""Method contract helpers, shipped so plugin authors can run the same checks on their methods.

``run_fit`` trains a method for a few iterations through the real assembly code (config resolution, roles,
prompt stream, Trainer, callbacks, checkpoints); ``role_state`` snapshots every role; the contract tests in
``tests/test_contract.py`` use them for every registered method:

* losses finite, every trainable role changes, the frozen base does not;
* the checkpoint holds only role weights (no frozen base, no reward models);
* save → load → continue reproduces the uninterrupted run bit for bit on CPU.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch

from fewstep_rl.run import assemble, resolve

TINY = {"world.hidden": 32, "method.batch_size": 8, "trainer.eval_samples": 64, "trainer.progress_bar": False}
TINY_BY_WORLD = {
    "toy2d": TINY,
    "shapes": {"roles.rank": 2, "method.batch_size": 2, "trainer.eval_samples": 8, "trainer.progress_bar": False},
    "glyphs": {"roles.rank": 2, "method.batch_size": 2, "trainer.eval_samples": 8, "trainer.progress_bar": False},
}


def run_fit(
    method: str, run_dir: Path, steps: int, world: str = "toy2d", overrides: dict[str, Any] | None = None,
    ckpt_path: str | None = None, save_as: str | None = None, interrupt_after: int | None = None,
) -> tuple[Any, Any, dict[str, float]]:
    """Fit ``method`` for ``steps`` iterations; returns (module, trainer, logged metrics).

    ``interrupt_after=k`` stops the run after k iterations as if it had been killed (the configured run length,
    and so every schedule, stays ``steps``).
    """
    import lightning as L

    class Interrupt(L.Callback):
        def on_train_batch_end(self, trainer: Any, module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
            if interrupt_after is not None and int(batch["pos"]) + 1 >= interrupt_after:
                trainer.should_stop = True

    over = {**TINY_BY_WORLD.get(world, {}), "trainer.max_steps": steps, "trainer.run_dir": str(run_dir), **(overrides or {})}
    module, dm, trainer = assemble(resolve(method, world, (), over), Path(run_dir), [Interrupt()])
    logged: dict[str, list[float]] = {}

    orig = module.log_metrics

    def collect(metrics: dict[str, Any], prefix: str = "train") -> None:
        for k, v in metrics.items():
            if v is not None:
                logged.setdefault(f"{prefix}/{k}", []).append(float(v))
        orig(metrics, prefix)

    module.log_metrics = collect  # type: ignore[method-assign]
    trainer.fit(module, datamodule=dm, ckpt_path=ckpt_path)
    if save_as:
        trainer.save_checkpoint(save_as, weights_only=False)
    return module, trainer, {k: v[-1] for k, v in logged.items()} | {"_all_finite": all_finite(logged)}


def run_interrupted_and_resumed(
    method: str, tmp_dir: Path, steps: int, interrupt_after: int, world: str = "toy2d",
    overrides: dict[str, Any] | None = None,
) -> Any:
    """Run ``method`` as if killed after ``interrupt_after`` of ``steps`` iterations (checkpoint
    ``tmp_dir/part/k.ckpt``), resume it to ``steps`` from that checkpoint (``tmp_dir/resumed``); returns the resumed
    module.

    Compare it with a full run of the same ``steps`` (``role_state`` / ``same``) to check bit-exact resume.
    """
    ck = Path(tmp_dir) / "part" / "k.ckpt"
    run_fit(method, Path(tmp_dir) / "part", steps, world, overrides, interrupt_after=interrupt_after, save_as=str(ck))
    resumed, _, _ = run_fit(method, Path(tmp_dir) / "resumed", steps, world, overrides, ckpt_path=str(ck))
    return resumed


def all_finite(logged: dict[str, list[float]]) -> float:
    return float(all(math.isfinite(x) for vs in logged.values() for x in vs))


def role_state(module: Any) -> dict[str, list[torch.Tensor]]:
    """Detached copies of every role's parameters."""
    return {r: [p.detach().clone() for p in module.backbone.role_parameters(r)] for r in module.backbone.roles}


def teacher_probe(module: Any, n: int = 16, seed: int = 0) -> torch.Tensor:
    """Teacher velocities on fixed inputs (the frozen base must never change)."""
    g = torch.Generator().manual_seed(seed)
    bb = module.backbone
    x = torch.randn((n, *bb.sample_shape), generator=g)
    sigma = torch.rand(n, generator=g) * 0.98 + 0.01
    prompts = [module.world.train_prompts[i % len(module.world.train_prompts)] for i in range(n)]
    with torch.no_grad():
        return bb.velocity(x, sigma, bb.encode_prompts(prompts), role="teacher").clone()


def same(a: dict[str, list[torch.Tensor]], b: dict[str, list[torch.Tensor]], role: str) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a[role], b[role], strict=True))
