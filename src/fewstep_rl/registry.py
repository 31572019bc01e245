"""Entry-point registries for methods, rewards and worlds.

Built-ins register exactly like third-party plugins, through the ``fewstep_rl.methods``, ``fewstep_rl.rewards``
and ``fewstep_rl.worlds`` entry-point groups of an installed distribution. Lookup order: a registered name, then a
``package.module:Attr`` path (the escape hatch for unpublished code), else :class:`UnknownName` listing what is
installed and the closest match. Two distributions registering one name is an error, never a silent override.
Entry points are only ``load()``-ed for the chosen name, so listing stays cheap.
"""

from __future__ import annotations

import importlib
from importlib.metadata import EntryPoint, entry_points
from typing import Any

from fewstep_rl.config import ConfigError, closest

GROUPS = {"methods": "fewstep_rl.methods", "rewards": "fewstep_rl.rewards", "worlds": "fewstep_rl.worlds"}


class UnknownName(ConfigError):
    """A name that no installed plugin provides."""


def _entry_points(kind: str) -> dict[str, EntryPoint]:
    if kind not in GROUPS:
        raise ValueError(f"unknown registry {kind!r}; choose one of {', '.join(GROUPS)}")
    found: dict[str, EntryPoint] = {}
    for ep in entry_points(group=GROUPS[kind]):
        if ep.name in found and found[ep.name].value != ep.value:
            a = getattr(found[ep.name].dist, "name", "?")
            b = getattr(ep.dist, "name", "?")
            raise ConfigError(f"{kind[:-1]} {ep.name!r} is registered twice: by {a} ({found[ep.name].value}) and {b} ({ep.value})")
        found[ep.name] = ep
    return found


def names(kind: str) -> list[str]:
    """Installed names of one registry, sorted."""
    return sorted(_entry_points(kind))


def describe(kind: str) -> list[tuple[str, str, str]]:
    """(name, target, distribution) for every installed entry of ``kind``."""
    return [(n, ep.value, getattr(ep.dist, "name", "?")) for n, ep in sorted(_entry_points(kind).items())]


def load(kind: str, name: str) -> Any:
    """The class registered as ``name`` in ``kind`` (or a ``module:Attr`` path)."""
    eps = _entry_points(kind)
    if name in eps:
        return eps[name].load()
    if ":" in name:
        module, _, attr = name.partition(":")
        try:
            obj: Any = importlib.import_module(module)
            for part in attr.split("."):
                obj = getattr(obj, part)
        except (ImportError, AttributeError) as e:
            raise UnknownName(f"cannot import {kind[:-1]} {name!r}: {e}") from None
        return obj
    best = closest(name, list(eps))
    hint = f"; did you mean {best!r}?" if best else ""
    raise UnknownName(f"unknown {kind[:-1]} {name!r}{hint} installed {kind}: {', '.join(sorted(eps)) or '(none)'}")
