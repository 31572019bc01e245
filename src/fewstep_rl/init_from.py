"""Initialise role weights from another run's checkpoint (RTDMD stage 2 from a stage-1 run, baselines from the same
start).

A fewstep-rl checkpoint holds only role weights and merged deltas (``FewStepMethod.state_dict``). :func:`load_roles`
copies chosen roles of such a checkpoint into roles of a freshly built backbone (``{dst: src}``, e.g.
``{"generator": "ema"}`` starts the generator from the earlier run's EMA weights) and folds the checkpoint's merge
records (merged deltas) into the base first. The key of a source role's parameter is found through the *current*
backbone: the parameter names of role ``src`` here must be the names it had there, so the source role must exist in
the current backbone too (same world, same adapter settings) — the error says which roles exist otherwise.

Call it after ``configure_model`` built the roles; under FSDP2 each full tensor is re-distributed with the target
parameter's mesh and placements.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

_BACKBONE = "backbone."


def read_role_state(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """``(backbone state dict without the 'backbone.' prefix, fewstep section)`` of a checkpoint file.

    Raises:
        FileNotFoundError: If ``path`` does not exist.
        ValueError: If the file is not a fewstep-rl checkpoint.
    """
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"init_from: no checkpoint at {str(p)!r}")
    ckpt = torch.load(p, map_location="cpu", weights_only=False)
    if not isinstance(ckpt, dict) or "fewstep" not in ckpt or "state_dict" not in ckpt:
        raise ValueError(f"init_from: {str(p)!r} is not a fewstep-rl checkpoint (no 'fewstep' section)")
    sd = {k[len(_BACKBONE):]: v for k, v in ckpt["state_dict"].items() if k.startswith(_BACKBONE)}
    return sd, ckpt["fewstep"]


@torch.no_grad()
def load_roles(backbone: Any, path: str | Path, roles: Mapping[str, str]) -> dict[str, Any]:
    """Copy roles ``{dst: src}`` of checkpoint ``path`` into ``backbone`` (after folding its merge records in).

    Args:
        backbone: A built backbone whose roles include every ``dst`` and every ``src``.
        path: A fewstep-rl checkpoint (``checkpoints/last.ckpt`` of a run).
        roles: Destination role → source role in the checkpoint.

    Returns:
        The checkpoint's ``fewstep`` section (method, iteration, roles, config of the source run).

    Raises:
        KeyError: If a role is missing here or in the checkpoint.
        ValueError: If shapes differ (different adapter settings).
    """
    sd, meta = read_role_state(path)
    backbone.upgrade_state_dict(sd)  # role keys of earlier versions
    names = {id(p): n for n, p in backbone.named_parameters(remove_duplicate=False)}
    role_keys: set[str] = set()
    for r in backbone.roles:
        role_keys.update(names[id(p)] for p in backbone.role_parameters(r) if id(p) in names)
    # merged deltas (role keys that belong to no role) first: they define the base the roles sit on
    merged = {k: v for k, v in sd.items() if backbone.is_role_key(k) and k not in role_keys}
    if merged:
        backbone.load_state_dict(merged, strict=False)
    src_roles = meta.get("roles", [])
    for dst, src in roles.items():
        for role in (dst, src):
            if role not in backbone.roles:
                raise KeyError(f"init_from: role {role!r} is not a role of this run; roles here: {backbone.roles}")
        if src_roles and src not in src_roles:
            raise KeyError(f"init_from: checkpoint {str(path)!r} has no role {src!r}; its roles: {src_roles}")
        for p_dst, p_src in zip(backbone.role_parameters(dst), backbone.role_parameters(src), strict=True):
            key = names[id(p_src)]
            if key not in sd:
                raise KeyError(f"init_from: checkpoint {str(path)!r} lacks {key!r} of role {src!r}")
            value = sd[key]
            full_shape = tuple(p_dst.shape)
            if tuple(value.shape) != full_shape:
                raise ValueError(
                    f"init_from: {key!r} has shape {tuple(value.shape)} in the checkpoint but {full_shape} here "
                    "(different adapter settings?)"
                )
            if hasattr(p_dst, "device_mesh"):  # FSDP2 DTensor: shard the full tensor like the target
                from torch.distributed.tensor import distribute_tensor

                value = distribute_tensor(value.to(p_dst.dtype), p_dst.device_mesh, p_dst.placements)
                p_dst.copy_(value)
            else:
                p_dst.copy_(value.to(device=p_dst.device, dtype=p_dst.dtype))
    return meta
