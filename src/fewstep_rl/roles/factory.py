"""Build the store a ``roles`` section asks for, over a diffusers-style base network."""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from fewstep_rl.roles import checkpointing
from fewstep_rl.roles.config import RolesConfig
from fewstep_rl.roles.full import FullCopyStore
from fewstep_rl.roles.lora import LoraStore, resolve_targets
from fewstep_rl.roles.store import RoleStore


def build_store(roles: RolesConfig | None, base: nn.Module, *, default_targets: Sequence[str], family: str) -> RoleStore:
    """``LoraStore`` (``roles.mode: lora``) or ``FullCopyStore`` (``full``) over ``base``, with the per-role
    activation checkpointing of ``roles.activation_checkpointing`` (:mod:`fewstep_rl.roles.checkpointing`).

    Args:
        roles: the ``roles`` section (``None``: LoRA with the default rank and alpha).
        base: the frozen base network (a diffusers model; the backbone registers it).
        default_targets: the family's LoRA target module names (those that exist in ``base`` are used).
        family: the backbone family (``"sd3"``): names the base in errors and seeds LoRA initialisations
            (``"<family>-lora"``).

    Raises:
        ValueError: for LoRA targets that do not exist in ``base``; for activation checkpointing of a network without
            transformer blocks.
    """
    roles = roles or RolesConfig()
    store: RoleStore
    if roles.mode == "full":
        store = FullCopyStore(base)
    elif roles.mode == "lora":
        targets = resolve_targets(base, roles.targets, default_targets, family)
        store = LoraStore(base, roles.lora_rank, roles.lora_alpha, targets, seed_tag=f"{family}-lora")
    else:
        raise ValueError(f"roles.mode must be 'lora' or 'full', got {roles.mode!r}")
    checkpointing.enable(store, base, roles.activation_checkpointing)  # full copies inherit it (deep copies)
    return store
