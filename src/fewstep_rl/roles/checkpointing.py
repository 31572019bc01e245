"""Activation checkpointing per role (``roles.activation_checkpointing``, issue 20 item 5).

The gradient passes of the listed roles run each transformer block through ``torch.utils.checkpoint``
(non-reentrant): autograd keeps the block's inputs only and recomputes the block in backward. Passes of other roles,
and every pass without gradient (rollouts, the teacher, snapshots), run as usual.

The hazard: roles share one base network and a LoRA store switches the active adapter in place
(:meth:`~fewstep_rl.roles.lora.LoraStore.activate`). A method routinely runs the generator's forward, then the fake
score's or the teacher's, then calls backward — so a recomputation that simply re-ran the block would use whichever
adapter is active *at backward time*, and silently differentiate the wrong function. Here the role active at
forward time is captured, and the recomputation runs inside a context that re-activates it (and restores the role
active before, afterwards): ``checkpoint(..., context_fn=...)``, whose second context wraps the recomputation.

The blocks are the diffusers transformer's own (``enable_gradient_checkpointing(gradient_checkpointing_func=...)``:
the model calls the function for each block when gradients are enabled); full copies of the base (``roles.mode:
full``) are deep copies and inherit it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
from torch import nn

from fewstep_rl.roles.store import RoleStore


@contextlib.contextmanager
def _active(store: RoleStore, role: str | None) -> Iterator[None]:
    """``role`` active inside, the previously active role again afterwards."""
    before = store.active_role
    store.activate(role)
    try:
        yield
    finally:
        store.activate(before)


def checkpointed(store: RoleStore, roles: Iterable[str]) -> Callable[..., Any]:
    """The per-block function a diffusers transformer calls under gradient checkpointing: checkpoint the block when
    the active role is one of ``roles`` (recomputing it under that role), else run it plainly."""
    roles = frozenset(roles)

    def run_block(block: nn.Module, *args: Any) -> Any:
        role = store.active_role
        if role not in roles:
            return block(*args)
        return torch.utils.checkpoint.checkpoint(
            block.__call__, *args, use_reentrant=False,
            context_fn=lambda: (contextlib.nullcontext(), _active(store, role)),
        )

    return run_block


def enable(store: RoleStore, network: nn.Module, roles: Iterable[str]) -> None:
    """Checkpoint the transformer blocks of ``network`` in the gradient passes of ``roles`` (see the module doc).

    Raises:
        ValueError: if ``network`` has no block-level gradient checkpointing (not a diffusers transformer).
    """
    roles = list(roles)
    if not roles:
        return
    if not getattr(network, "_supports_gradient_checkpointing", False):
        raise ValueError(f"roles.activation_checkpointing: {type(network).__name__} has no transformer blocks to "
                         "checkpoint")
    network.enable_gradient_checkpointing(gradient_checkpointing_func=checkpointed(store, roles))
