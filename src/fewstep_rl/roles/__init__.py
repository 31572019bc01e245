"""Roles over one frozen base (architecture.md §3): stores, the ``roles`` config section, snapshots and EMA.

* :class:`RoleStore` (:mod:`fewstep_rl.roles.store`) — the storage interface a backbone owns: ``add``,
  ``role_parameters``, ``reset``, ``merge``, ``fold``, ``reserve_fold``, ``activate``, ``set_trainable``,
  ``folds_of`` and the state-dict hooks ``is_base_key`` / ``prepare_load``; with :class:`LoraStore` (peft),
  :class:`FullCopyStore` and :class:`ResidualStore` (toy2d), and :func:`build_store` choosing one from a
  :class:`RolesConfig`.
* :mod:`fewstep_rl.roles.snapshots` — ``add_roles``, ``copy_role``, ``blend_role``, :class:`EMA` and the decay
  schedules, written against a backbone's ``role_parameters`` so they are the same for every family.
* :mod:`fewstep_rl.roles.shards` — writing role state that FSDP2 sharded; :mod:`fewstep_rl.roles.checkpointing` —
  per-role activation checkpointing (``roles.activation_checkpointing``).

Names are imported lazily (PEP 562): resolving a config imports :class:`RolesConfig` without importing torch.
"""

from __future__ import annotations

import importlib
from typing import Any

from fewstep_rl.roles.config import RolesConfig

_LAZY = {
    "RoleStore": "store", "BASE_ROLES": "store", "parse_fold": "store",
    "LoraStore": "lora", "FullCopyStore": "full", "ResidualStore": "residual", "build_store": "factory",
    "add_roles": "snapshots", "copy_role": "snapshots", "blend_role": "snapshots", "EMA": "snapshots",
    "warmup_decay": "snapshots", "schedule_decay": "snapshots", "reshard": "snapshots",
}

__all__ = ["RolesConfig", *_LAZY]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'fewstep_rl.roles' has no attribute {name!r}")
    return getattr(importlib.import_module(f"fewstep_rl.roles.{module}"), name)
