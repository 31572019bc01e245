"""Strict resume: a checkpoint continues only the run it came from, unless a change is asked for by name.

The checkpoint records the resolved config (``checkpoint["fewstep"]["config"]``). Resuming compares it, key by
key, with the config resolved now (both filled with today's defaults, so a key added since only differs when set):

* keys that only say how to run (:data:`FREE_KEYS`: run length, directory, logging, evaluation and checkpoint
  cadence, threads, accelerator) may differ freely — ``trainer.max_steps`` is how a run is extended;
* any other difference is refused with a diff, unless every changed key is named in ``--allow_changes
  KEY,...`` (a dotted key, or a prefix such as ``method`` or ``rewards``); allowed changes then take effect for
  real (the method is built from the new config, and :class:`fewstep_rl.guards.SafetyCallback` re-applies the
  optimiser's lr/betas/weight decay over those restored from the checkpoint) and are recorded in the run
  directory's ``resume.jsonl`` and in the new ``config.yaml`` / checkpoints;
* ``trainer.max_steps`` may not be below the iterations the checkpoint has completed (equal: the run only
  does its final evaluation, e.g. after a kill during that evaluation).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from fewstep_rl.config import ConfigError

FREE_KEYS = frozenset({
    "trainer.max_steps", "trainer.max_minutes", "trainer.run_dir", "trainer.progress_bar", "trainer.num_threads", "trainer.log_every",
    "trainer.eval_every", "trainer.eval_samples", "trainer.ckpt_every", "trainer.ckpt_last_every",
    "trainer.ckpt_last_minutes", "trainer.nonfinite_limit", "trainer.accelerator", "trainer.logger",
    "trainer.reward_overlap",
})


@dataclass
class ResumePlan:
    """What a validated checkpoint resumes: completed iterations, its config, and the allowed changes."""

    path: str
    done: int
    method: str
    config: dict
    changes: dict[str, tuple[Any, Any]] = field(default_factory=dict)


def flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}, "l": [{"x": 2}]}`` → ``{"a.b": 1, "l.0.x": 2}`` (lists of scalars stay values)."""
    out: dict[str, Any] = {}
    if isinstance(d, dict):
        for k, v in d.items():
            out.update(flatten(v, f"{prefix}{k}."))
    elif isinstance(d, list) and any(isinstance(v, (dict, list)) for v in d):
        for i, v in enumerate(d):
            out.update(flatten(v, f"{prefix}{i}."))
        if not d:
            out[prefix[:-1]] = []
    else:
        out[prefix[:-1]] = d
    return out


def _allowed(key: str, allow: list[str]) -> bool:
    return any(key == a or key.startswith(a + ".") for a in allow)


def parse_allow(text: str | None) -> list[str]:
    return [k.strip() for k in (text or "").split(",") if k.strip()]


def diff_configs(old: dict, new: dict) -> dict[str, tuple[Any, Any]]:
    """Changed dotted keys (excluding :data:`FREE_KEYS`) → (old, new); absent values show as ``<absent>``."""
    a, b = flatten(old), flatten(new)
    out = {}
    for k in sorted(set(a) | set(b)):
        if k in FREE_KEYS:
            continue
        va, vb = a.get(k, "<absent>"), b.get(k, "<absent>")
        if va != vb:
            out[k] = (va, vb)
    return out


def plan_resume(ckpt_path: str, resolved: Any, allow_changes: str | None = None) -> ResumePlan:
    """Validate a checkpoint against the run about to resume it (raises :class:`ConfigError`; writes nothing)."""
    from fewstep_rl.ckpt_io import CheckpointError, load_checkpoint
    from fewstep_rl.run import resolve

    ckpt = load_checkpoint(ckpt_path)
    state = ckpt.get("fewstep")
    if not isinstance(state, dict) or "config" not in state:
        raise CheckpointError(f"{ckpt_path} is not a fewstep-rl checkpoint (no 'fewstep' section)")
    method = str(state.get("method"))
    want = getattr(resolved.method_cls, "name", resolved.method_name)
    if method != want:
        raise ConfigError(f"checkpoint {ckpt_path} was written by method {method!r}, not {want!r}; resume it with "
                          f"--method {method} or start a fresh run without --ckpt_path")
    done = int(state.get("stream_pos", int(state.get("iteration", -1)) + 1))
    max_steps = resolved.trainer.max_steps
    if max_steps < done:
        raise ConfigError(f"--trainer.max_steps {max_steps} is below the {done} iterations checkpoint {ckpt_path} "
                          f"has completed; give --trainer.max_steps >= {done} ({done}: only the final evaluation)")
    try:
        old = resolve(None, raw=state["config"]).to_dict()
    except ConfigError as e:
        raise ConfigError(f"checkpoint {ckpt_path} records a config this version rejects ({e})") from None
    changes = diff_configs(old, resolved.to_dict())
    allow = parse_allow(allow_changes)
    refused = {k: v for k, v in changes.items() if not _allowed(k, allow)}
    if refused:
        shown = "; ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in list(refused.items())[:6])
        more = f" (+{len(refused) - 6} more)" if len(refused) > 6 else ""
        raise ConfigError(f"resume changes the config of checkpoint {ckpt_path}: {shown}{more}; undo the change, or "
                          f"accept it with --allow_changes {','.join(refused)}")
    return ResumePlan(str(ckpt_path), done, method, state["config"], changes)
