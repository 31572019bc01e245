"""``LoraStore``: one peft LoRA adapter per role inside the shared frozen base (architecture.md §3).

The only module of fewstep-rl that imports peft (an import-linter contract).

* Adapters are added with the base's ``add_adapter`` (diffusers' ``PeftAdapterMixin``), ``init_lora_weights=True``;
  peft's own initialisation draws from the global RNG, so it runs inside ``fork_rng`` and is then overwritten:
  ``A ~ U(±1/√fan_in)`` (peft's kaiming-uniform law) from a generator seeded by (``seed_tag``, role, reset count,
  layer path), ``B = 0`` — every role starts exactly equal to the base, and the global RNG is never touched.
* Only the adapter of the role being evaluated is active (``None``: all off), together with the folds of that role
  (peft sums active adapters). peft's ``set_adapter``/``enable_adapters`` reset ``requires_grad`` of every adapter;
  after each switch the flags are restored from ``trainable``.
* :meth:`LoraStore._merge` folds ``scale·B·A`` into the base weights and records the factors in ``merged`` (one
  ``ModuleDict`` of :class:`Delta` buffers per merge, keyed by layer path); loading a state dict replays the records
  this store has not applied yet (:meth:`LoraStore.prepare_load`), before the base loads, so a full state dict (base
  weights included) still wins.
* A fold adds a frozen peft adapter ``fold<k>__<roles>`` holding a copy of the role's ``A``/``B``; loading a state
  dict creates the fold adapters it names.

Under FSDP2 sharding (:mod:`fewstep_rl.roles.shards`): reset writes each rank's chunk of the seeded full init; a
fold fills an empty fold adapter reserved before sharding (:meth:`RoleStore.reserve_fold`; creating one afterwards
is refused). Merges and loading merge records write new state into the base and stay refused there.
Activation checkpointing recomputes a forward at backward time, when another role may be active: it goes through
:func:`fewstep_rl.roles.checkpointing.checkpointed`, which re-activates the role of the forward.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from fewstep_rl.roles.shards import all_zero, assign_
from fewstep_rl.roles.store import RoleStore, parse_fold
from fewstep_rl.sampling.noise import stable_hash

_UNSET = object()


class Delta(nn.Module):
    """One merged LoRA delta of one layer: ``ΔW = up @ down`` (``up = scale·B``, ``down = A``), as buffers."""

    def __init__(self, up: Tensor, down: Tensor) -> None:
        super().__init__()
        self.register_buffer("up", up)
        self.register_buffer("down", down)


def _safe(path: str) -> str:
    """Module path → ModuleDict key (``.`` is not allowed there; module names of the families never hold ``__``)."""
    return path.replace(".", "__")


def fold_into(w: Tensor, up: Tensor, down: Tensor) -> None:
    """``W += up @ down`` in place, in ``W``'s dtype (computed in float32 or better)."""
    ct = torch.promote_types(w.dtype, torch.float32)
    w.copy_((w.to(ct) + up.to(ct) @ down.to(ct)).to(w.dtype))


def resolve_targets(base: nn.Module, targets: Sequence[str] | None, default: Sequence[str], family: str) -> list[str]:
    """The LoRA target module names: ``targets`` (each must exist), or those of ``default`` that exist."""
    names = [n for n, _ in base.named_modules()]

    def exists(t: str) -> bool:
        return any(n == t or n.endswith("." + t) for n in names)

    if targets is None:
        found = [t for t in default if exists(t)]
    else:
        missing = [t for t in targets if not exists(t)]
        if missing:
            raise ValueError(f"LoRA target modules {missing} do not exist in the {family} transformer")
        found = list(targets)
    if not found:
        raise ValueError(f"no LoRA target module exists in the {family} transformer")
    return found


def add_lora_adapter(model: nn.Module, name: str, rank: int, alpha: float, targets: Sequence[str]) -> None:
    """Add a peft LoRA adapter ``name`` to a diffusers model (its ``add_adapter``), without touching the global RNG."""
    from peft import LoraConfig

    cfg = LoraConfig(r=int(rank), lora_alpha=float(alpha), target_modules=list(targets), init_lora_weights=True)
    dev = next(model.parameters()).device
    with torch.random.fork_rng(devices=[dev] if dev.type != "cpu" else [], device_type=dev.type), \
            warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Already found a `peft_config`")  # several adapters: intended
        model.add_adapter(cfg, adapter_name=name)  # peft's own init draws from the global RNG


class LoraStore(RoleStore):
    """peft LoRA roles inside ``base`` (see the module docstring).

    Args:
        base: a diffusers model with ``add_adapter`` (frozen; registered by the backbone).
        rank: LoRA rank r.
        alpha: LoRA alpha (scale = alpha / r).
        targets: module names to adapt (each must exist in ``base``).
        seed_tag: first part of the seed of every ``A`` initialisation (e.g. ``"sd3-lora"``).

    Attributes:
        merged: merge records (one ``ModuleDict`` of :class:`Delta` per merge, keyed by layer path).
        base_merges: number of merges folded into the base so far (a persistent buffer).
    """

    kind: ClassVar[str] = "lora"

    def __init__(self, base: nn.Module, rank: int, alpha: float, targets: Sequence[str], seed_tag: str) -> None:
        super().__init__(base)
        self.rank, self.alpha = int(rank), float(alpha)
        self.targets = list(targets)
        self.seed_tag = seed_tag
        self.merged = nn.ModuleList()
        self.register_buffer("base_merges", torch.zeros((), dtype=torch.long))
        self._active: Any = _UNSET
        self._layers: list[tuple[str, nn.Module]] | None = None

    # ---------------------------------------------------------------- RoleStore
    def _create(self, name: str, trainable: bool) -> None:
        self._add_adapter(name)
        self._init_lora(name)
        self._restore_grad()

    def _parameters_of(self, name: str) -> list[nn.Parameter]:
        """The role's LoRA ``A``/``B`` weights, in module order."""
        keys = (f".lora_A.{name}.", f".lora_B.{name}.")
        return [p for n, p in self.base.named_parameters() if any(k in n for k in keys)]

    def _reinit(self, name: str) -> None:
        self._init_lora(name)

    @torch.no_grad()
    def _merge(self, name: str) -> None:
        """``W += scale·B·A`` on every adapted layer, recorded in ``merged``."""
        if self._sharded():
            raise RuntimeError("merge_role is not supported once the backbone is sharded with FSDP2 (a merge record "
                               "is new state; fold_role with a reserved fold is)")
        record = nn.ModuleDict()
        for path, layer in self.layers():
            up = (layer.lora_B[name].weight * layer.scaling[name]).detach().clone()
            down = layer.lora_A[name].weight.detach().clone()
            fold_into(layer.get_base_layer().weight, up, down)
            record[_safe(path)] = Delta(up, down)
        self.merged.append(record)
        self.base_merges += 1

    @torch.no_grad()
    def _fold(self, name: str, members: tuple[str, ...], fold_name: str) -> None:
        """A frozen adapter ``fold_name`` = copy of ``name``'s; every member gets a fresh adapter."""
        self._refuse_new_fold_if_sharded(members)
        self._add_adapter(fold_name)
        self._register_fold(fold_name)
        self._fill_fold(name, members, fold_name)

    @torch.no_grad()
    def _fill_fold(self, name: str, members: tuple[str, ...], fold_name: str) -> None:
        """``A``/``B`` of fold ``fold_name`` ← ``name``'s (shard-local under FSDP2); fresh adapters for the members."""
        for _, layer in self.layers():
            layer.lora_A[fold_name].weight.copy_(layer.lora_A[name].weight)
            layer.lora_B[fold_name].weight.copy_(layer.lora_B[name].weight)
        for r in members:
            self.reset(r)
        self._active = _UNSET
        self._restore_grad()

    @torch.no_grad()
    def _reserve(self, fold_name: str) -> bool:
        """An empty fold adapter: ``A = B = 0`` (its product is exactly zero), frozen."""
        self._add_adapter(fold_name)
        for _, layer in self.layers():
            layer.lora_A[fold_name].weight.zero_()
            layer.lora_B[fold_name].weight.zero_()
        self._register_fold(fold_name)
        self._restore_grad()
        return True

    def _fold_is_empty(self, fold_name: str) -> bool:
        return all_zero(w for _, layer in self.layers() for w in (layer.lora_A[fold_name].weight,
                                                                    layer.lora_B[fold_name].weight))

    def activate(self, role: str | None) -> nn.Module:
        """Only ``role``'s adapter (and its folds) active, ``None``: all off; returns the base to call."""
        self.active_role = role
        if role != self._active and self.roles:
            active = None if role is None else [role, *self.folds_of(role)]
            for _, layer in self.layers():
                if active is None:
                    layer.enable_adapters(False)
                else:
                    layer.set_adapter(active if len(active) > 1 else role)
                    if layer.disable_adapters:
                        layer.enable_adapters(True)
            self._active = role
            self._restore_grad()
        return self.base

    def is_base_key(self, key: str) -> bool:
        """The LoRA weights inside the base (roles and folds)."""
        return ".lora_A." in key or ".lora_B." in key

    def prepare_load(self, state_dict: dict, prefix: str, base_prefix: str | None) -> None:
        """Replay the incoming merge records not applied yet, then create the fold adapters the state dict names."""
        self._replay_merges(state_dict, prefix + "merged.")
        if base_prefix is not None:
            self._grow_folds(state_dict, base_prefix)

    # ---------------------------------------------------------------- LoRA mechanics
    def layers(self) -> list[tuple[str, nn.Module]]:
        """``(path, layer)`` of every peft LoRA layer of the base (cached; reset when adapters are added)."""
        if self._layers is None:
            if not self.roles:
                return []
            from peft.tuners.lora import LoraLayer

            self._layers = [(n, m) for n, m in self.base.named_modules() if isinstance(m, LoraLayer)]
        return self._layers

    def wraps_base(self) -> bool:
        """Whether peft LoRA layers sit in the base (once a role exists)."""
        return bool(self.layers())

    def base_state_dict(self) -> dict[str, Tensor]:
        """The base's weights (merges folded in) under the names of the plain model: LoRA layers stripped."""
        sd = self.base.state_dict()
        if not self.wraps_base():
            return sd
        return {k.replace(".base_layer.", "."): v for k, v in sd.items() if ".lora_" not in k}

    @torch.no_grad()
    def lora_delta(self, role: str, since_load: bool = True) -> dict[str, tuple[Tensor, Tensor]]:
        """Role ``role``'s weight change as one low-rank product per adapted layer, for export as a plain LoRA.

        ``W_role = W + up @ down`` for every layer path (``up``: (out, k), ``down``: (k, in), float32 copies; alpha =
        k gives scale 1): ``W`` is the base as loaded (``since_load``: the merge records are included) or as it is
        now; the role's folds and its own adapter (each with its ``scale``) are always included.
        """
        self._check_role(role)
        out = {}
        for path, layer in self.layers():
            ups, downs = [], []
            if since_load:
                for rec in self.merged:
                    ups.append(rec[_safe(path)].up)
                    downs.append(rec[_safe(path)].down)
            for name in (*self.folds_of(role), role):
                ups.append(layer.lora_B[name].weight * layer.scaling[name])
                downs.append(layer.lora_A[name].weight)
            out[path] = (torch.cat(ups, 1).float().clone(), torch.cat(downs, 0).float().clone())
        return out

    @torch.no_grad()
    def role_state_dict(self, role: str) -> dict[str, Tensor]:
        """:meth:`base_state_dict` with ``up @ down`` of :meth:`lora_delta` (since now) added to each layer."""
        sd = {k: v.detach().clone() for k, v in self.base_state_dict().items()}
        for path, (up, down) in self.lora_delta(role, since_load=False).items():
            fold_into(sd[f"{path}.weight"], up, down)
        return sd

    def _add_adapter(self, name: str) -> None:
        add_lora_adapter(self.base, name, self.rank, self.alpha, self.targets)
        self._layers = None
        self._active = _UNSET

    def _restore_grad(self) -> None:
        for _, layer in self.layers():
            for r in self.roles:
                flag = self.trainable[r]
                layer.lora_A[r].requires_grad_(flag)
                layer.lora_B[r].requires_grad_(flag)
            for f in self.folds:
                layer.lora_A[f].requires_grad_(False)
                layer.lora_B[f].requires_grad_(False)

    @torch.no_grad()
    def _init_lora(self, name: str) -> None:
        """``A ~ U(±1/√fan_in)`` (peft's kaiming-uniform law) from a seeded generator, ``B = 0``."""
        for path, layer in self.layers():
            a, b = layer.lora_A[name].weight, layer.lora_B[name].weight
            gen = torch.Generator().manual_seed(stable_hash(self.seed_tag, name, self._resets[name], path))
            u = torch.rand(a.shape, generator=gen, dtype=torch.float64, device="cpu")
            assign_(a, (2 * u - 1) / math.sqrt(a.shape[1]))  # the full init on every rank; a shard keeps its chunk
            b.zero_()

    def _grow_folds(self, state_dict: dict, base_prefix: str) -> None:
        """Create the (frozen) fold adapters the incoming state dict names and this store lacks."""
        found = set()
        for k in state_dict:
            if k.startswith(base_prefix) and ".lora_A." in k:
                name = k.split(".lora_A.", 1)[1].split(".", 1)[0]
                if parse_fold(name) is not None:
                    found.add(name)
        for name in sorted(found - set(self.folds), key=lambda f: parse_fold(f)[0]):  # type: ignore[index]
            missing = [r for r in parse_fold(name)[1] if r not in self.roles]  # type: ignore[index]
            if missing:
                raise RuntimeError(f"state dict has fold {name!r} for role(s) {missing} this backbone lacks "
                                   f"(roles here: {self.roles})")
            if self._sharded():
                raise RuntimeError(f"state dict has fold {name!r}, which this FSDP2-sharded backbone lacks (folds "
                                   f"here: {self.folds}; reserve it before sharding)")
            self._add_adapter(name)
            self._register_fold(name)
            self._restore_grad()

    def _replay_merges(self, state_dict: dict, head: str) -> None:
        """Fold the incoming merge records this store has not applied yet into the base."""
        incoming: dict[int, dict[str, dict[str, Tensor]]] = {}
        for k, v in state_dict.items():
            if k.startswith(head):
                idx, layer, which = k[len(head):].split(".")
                incoming.setdefault(int(idx), {}).setdefault(layer, {})[which] = v
        if not incoming:
            return
        if len(incoming) > len(self.merged) and self._sharded():
            raise RuntimeError("state dict has merge records this FSDP2-sharded backbone has not applied (load them "
                               "before sharding)")
        if sorted(incoming) != list(range(len(incoming))) or len(incoming) < len(self.merged):
            raise RuntimeError(f"state dict has merge records {sorted(incoming)}; this backbone has "
                               f"{len(self.merged)} (load merges into a fresh backbone)")
        for i, rec in enumerate(self.merged):
            same = set(rec.keys()) == set(incoming[i]) and all(
                torch.equal(rec[k].up.cpu(), incoming[i][k]["up"].cpu()) for k in rec)
            if not same:
                raise RuntimeError(f"merge record {i} of the state dict differs from the one already applied here "
                                   "(load merges into a fresh backbone)")
        with torch.no_grad():
            for i in range(len(self.merged), len(incoming)):
                record = nn.ModuleDict()
                for key, t in incoming[i].items():
                    path = key.replace("__", ".")
                    try:
                        layer = self.base.get_submodule(path)
                    except AttributeError:
                        raise RuntimeError(f"merge record {i} has a delta for {path}, which this transformer lacks") \
                            from None
                    w = layer.get_base_layer().weight if hasattr(layer, "get_base_layer") else layer.weight
                    up = t["up"].to(device=w.device)
                    down = t["down"].to(device=w.device, dtype=up.dtype)
                    fold_into(w, up, down)
                    record[key] = Delta(up.clone(), down.clone())
                self.merged.append(record)
