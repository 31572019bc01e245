"""Writing role state that FSDP2 may have sharded (issue 20 item 3).

Once ``fully_shard`` ran, role parameters are ``DTensor`` shards (``Shard(0)`` over the data-parallel mesh). Stores
write them in three ways only, all shard-local and identical on every rank:

* a *full* value every rank computes the same way (a seeded re-initialisation) → :func:`assign_` keeps the local
  chunk (no communication: ``distribute_tensor(..., src_data_rank=None)``);
* a copy between two parameters of the same shape (a fold, a snapshot copy): both are ``DTensor`` with the same
  placements once resharded, so ``copy_`` is a local copy;
* ``zero_()``.

Creating a parameter after sharding is not possible (FSDP2 does not manage it): a store must create everything it
will need before the backbone is sharded (:meth:`fewstep_rl.roles.store.RoleStore.reserve_fold`).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor


def is_sharded(t: Tensor) -> bool:
    """Whether ``t`` is an FSDP2 ``DTensor`` (has a device mesh)."""
    return hasattr(t, "device_mesh")


def any_sharded(params: Iterable[Tensor]) -> bool:
    """Whether any of ``params`` is a ``DTensor``."""
    return any(is_sharded(p) for p in params)


@torch.no_grad()
def assign_(dst: Tensor, value: Tensor) -> None:
    """``dst ← value`` in place; ``value`` is the *full* tensor (the same on every rank), ``dst`` may be a shard."""
    if is_sharded(dst):
        from torch.distributed.tensor import distribute_tensor

        value = distribute_tensor(value.to(device=dst.device, dtype=dst.dtype), dst.device_mesh, dst.placements,
                                  src_data_rank=None)  # every rank keeps its own chunk; no communication
        dst.copy_(value)
    else:
        dst.copy_(value.to(device=dst.device, dtype=dst.dtype))


@torch.no_grad()
def all_zero(params: Iterable[Tensor]) -> bool:
    """Whether every entry of ``params`` is zero, over every shard (a collective when any is a ``DTensor``: call it on
    every rank at the same point)."""
    params = list(params)
    nonzero = torch.zeros((), dtype=torch.float64)
    group = None
    for p in params:
        local = p.to_local() if is_sharded(p) else p
        if local.numel():
            nonzero = torch.maximum(nonzero, local.detach().abs().max().double().cpu())
        if is_sharded(p) and group is None:
            group = p.device_mesh.get_group()
    if group is not None:
        dev = params[0].to_local().device if is_sharded(params[0]) else params[0].device
        flag = nonzero.to(dev)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX, group=group)
        nonzero = flag.cpu()
    return bool(nonzero == 0)
