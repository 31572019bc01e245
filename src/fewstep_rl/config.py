"""Typed configuration: dataclasses that reject unknown keys and wrong types, with a clear message.

Every configurable thing (a method, a world, a reward, the trainer section) has a ``Config`` dataclass. Field
help text lives in ``field(metadata={"help": ...})`` (use :func:`knob`). :func:`build` turns a plain mapping
(from YAML or dotted CLI overrides) into the dataclass, checking every key and value; errors are
:class:`ConfigError` naming the dotted key, what was wrong and what is allowed (with the closest valid key).
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import math
import types
import typing
from collections.abc import Mapping
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

_MISSING = dataclasses.MISSING


class ConfigError(ValueError):
    """A configuration problem found before any model is built (the CLI exits with code 2)."""


def knob(default: Any = _MISSING, help: str = "", *, factory: Any = None, merge: bool = True) -> Any:  # noqa: A002
    """A dataclass field with help text (shown by ``fewstep-rl fit --method NAME --help``).

    ``merge`` (a field holding a nested config dataclass): a mapping given for it is merged over the field's default
    (:func:`build`); ``False``: it replaces the default whole (built over the nested class's own defaults), for a
    config whose keys exclude each other (e.g. a budget of exactly one of iterations / seconds / samples).
    """
    meta = {"help": help} if merge else {"help": help, "merge": False}
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata=meta)
    if isinstance(default, (list, dict)):
        value = default
        return dataclasses.field(default_factory=lambda: typing.cast(Any, type(value))(value), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def closest(name: str, options: list[str] | tuple[str, ...]) -> str | None:
    """The closest valid option to a misspelt ``name`` (or None)."""
    match = difflib.get_close_matches(name, list(options), n=1, cutoff=0.4)
    return match[0] if match else None


def unknown_key_message(where: str, key: str, options: list[str]) -> str:
    best = closest(key, options)
    hint = f"; did you mean '{where}.{best}'?" if best else ""
    return f"unknown key '{where}.{key}'{hint} valid keys: {', '.join(sorted(options))}"


def field_types(cls: type) -> dict[str, Any]:
    hints = get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls) if f.init}


def type_name(tp: Any) -> str:
    origin = get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in get_args(tp))
    if origin in (Union, types.UnionType):
        return " | ".join(type_name(a) for a in get_args(tp))
    if origin is not None:
        args = ", ".join(type_name(a) for a in get_args(tp))
        return f"{getattr(origin, '__name__', str(origin))}[{args}]"
    if tp is type(None):
        return "None"
    return getattr(tp, "__name__", str(tp))


def coerce(value: Any, tp: Any, where: str) -> Any:
    """Check ``value`` against the annotation ``tp`` (int→float widening allowed); return the typed value."""
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin is Literal:
        allowed = get_args(tp)
        if value not in allowed:
            best = closest(str(value), [str(a) for a in allowed])
            hint = f" (did you mean {best!r}?)" if best else ""
            raise ConfigError(f"'{where}': {value!r} is not allowed{hint}; choose one of {', '.join(map(repr, allowed))}")
        return value
    if origin in (Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return coerce(value, a, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(f"'{where}': {value!r} is not a valid {type_name(tp)}")
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"'{where}': expected a list ({type_name(tp)}), got {value!r}")
        args = get_args(tp)
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(args) != len(value):
                raise ConfigError(f"'{where}': expected {len(args)} items ({type_name(tp)}), got {len(value)}")
            return tuple(coerce(v, a, f"{where}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
        inner = args[0] if args else Any
        out = [coerce(v, inner, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(out) if origin is tuple else out
    if origin is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"'{where}': expected a mapping ({type_name(tp)}), got {value!r}")
        kt, vt = get_args(tp) or (Any, Any)
        return {coerce(k, kt, where): coerce(v, vt, f"{where}.{k}") for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        if dataclasses.is_dataclass(value):
            return value
        if not isinstance(value, Mapping):
            raise ConfigError(f"'{where}': expected a mapping, got {value!r}")
        return build(typing.cast(type, tp), value, where)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"'{where}': expected true or false, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "3e-4" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"'{where}': expected a number (float), got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"'{where}': expected an integer, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"'{where}': expected a string, got {value!r}")
    if isinstance(tp, type) and not isinstance(value, tp):
        raise ConfigError(f"'{where}': expected {type_name(tp)}, got {value!r}")
    return value


def check_value(key: str, value: Any, where: str) -> None:
    """Value checks every config shares: no NaN anywhere; a learning rate (a key ``lr`` or ``lr_*``, at any depth, e.g.
    ``method.optim.lr`` and ``method.optim.roles.<role>.lr``) is finite and > 0."""
    if isinstance(value, float) and math.isnan(value):
        raise ConfigError(f"'{where}': NaN is not a valid value; give a number")
    if isinstance(value, (list, tuple)) and any(isinstance(v, float) and math.isnan(v) for v in value):
        raise ConfigError(f"'{where}': NaN is not a valid value; give numbers")
    is_lr = (key == "lr" or key.startswith("lr_")) and isinstance(value, (int, float)) and not isinstance(value, bool)
    if is_lr and not (0 < value < math.inf):
        raise ConfigError(f"'{where}': a learning rate must be a finite number > 0, got {value}")


def renamed_message(renamed: Mapping[str, str], where: str, key: str, value: Any, known: bool) -> str | None:
    """The message for a retired key (or key value) that a config class's ``RENAMED`` lists, else None.

    ``RENAMED`` maps an old key ``"old"`` to its new (dotted) key ``"new"`` (same meaning), or to ``"new1,new2"``
    when one old key became several (the same value in each), or an old ``"key=value"`` to a phrase naming the setting
    that now says it. Old configs then fail with the fix, not a bare unknown key.
    ``known``: ``key`` is still a field of the class (then only its retired values are reported).
    """
    if isinstance(value, str) and f"{key}={value}" in renamed:
        return f"'{where}.{key}: {value}' is now {renamed[f'{key}={value}']}; change it in your config"
    if key in renamed and not known:
        new = [f"'{where}.{n.strip()}'" for n in renamed[key].split(",")]
        if len(new) > 1:
            return (f"'{where}.{key}' was split into {', '.join(new[:-1])} and {new[-1]} (same values); set each in "
                    "your config")
        return f"'{where}.{key}' was renamed {new[0]} (same values); rename it in your config"
    return None


def deep_merge(base: Mapping[str, Any], over: Mapping[str, Any]) -> dict:
    """Merge mappings recursively (lists and scalars are replaced)."""
    out = copy.deepcopy(dict(base))
    for k, v in over.items():
        if isinstance(v, Mapping) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def dataclass_type(tp: Any) -> type | None:
    """The dataclass an annotation ``tp`` holds (``C`` or ``C | None``), else None."""
    if get_origin(tp) in (Union, types.UnionType):
        inner = [a for a in get_args(tp) if a is not type(None)]
        return dataclass_type(inner[0]) if len(inner) == 1 else None
    return typing.cast(type, tp) if isinstance(tp, type) and dataclasses.is_dataclass(tp) else None


def field_default(f: dataclasses.Field) -> Any:
    """The default value of dataclass field ``f`` (a fresh one from its factory), or ``MISSING``."""
    if f.default is not _MISSING:
        return f.default
    if f.default_factory is not _MISSING:
        return f.default_factory()
    return _MISSING


def init_dict(obj: Any) -> dict[str, Any]:
    """``to_dict`` of a config dataclass instance, keeping only the fields its constructor takes."""
    return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj) if f.init}


def build(cls: type, data: Mapping[str, Any] | None, where: str) -> Any:
    """Build dataclass ``cls`` from ``data``; unknown keys and wrong types raise :class:`ConfigError`.

    A field that is itself a config dataclass and has a default (or default factory) is built from ``data``'s mapping
    deep-merged over that default (:func:`deep_merge`), so a partial ``optim: {lr: ...}`` keeps the rest of the
    method's own ``optim`` default instead of falling back to the nested class's defaults (unless the field says
    ``knob(..., merge=False)``).
    """
    data = dict(data or {})
    types_ = field_types(cls)
    renamed: Mapping[str, str] = getattr(cls, "RENAMED", {})
    for key, value in data.items():
        moved = renamed_message(renamed, where, key, value, key in types_)
        if moved:
            raise ConfigError(moved)
        if key not in types_:
            raise ConfigError(unknown_key_message(where, key, list(types_)))
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key, value in list(data.items()):  # a nested config merges over the field's own default (e.g. a method's optim)
        nested = dataclass_type(types_[key]) is not None and fields[key].metadata.get("merge", True)
        if nested and isinstance(value, Mapping):
            default = field_default(fields[key])
            if dataclasses.is_dataclass(default) and not isinstance(default, type):
                data[key] = deep_merge(init_dict(default), value)
    kwargs = {k: coerce(v, types_[k], f"{where}.{k}") for k, v in data.items()}
    for k, v in kwargs.items():
        check_value(k, v, f"{where}.{k}")
    missing = [
        f.name
        for f in dataclasses.fields(cls)
        if f.init and f.name not in kwargs and f.default is _MISSING and f.default_factory is _MISSING
    ]
    if missing:
        raise ConfigError(f"'{where}': missing required key(s) {', '.join(missing)}")
    try:
        return cls(**kwargs)
    except (ValueError, TypeError) as e:  # __post_init__ checks
        raise ConfigError(f"'{where}': {e}") from None


def to_dict(obj: Any) -> Any:
    """Plain (YAML-safe) representation of a config dataclass."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


def _default_repr(value: Any) -> str:
    if isinstance(value, dict) and value and all(dataclasses.is_dataclass(v) for v in value.values()):
        value = {k: {f: x for f, x in to_dict(v).items() if x is not None} for k, v in value.items()}  # set fields only
    return repr(to_dict(value)) if dataclasses.is_dataclass(value) or isinstance(value, dict) else repr(value)


def help_lines(cls: type, prefix: str, defaults: Any = None) -> list[str]:
    """``--prefix.key TYPE (default: …) help`` lines for every field of ``cls``.

    A field that is a config dataclass lists its own fields (``--prefix.key.sub``) with the field's default values
    (``defaults``: the instance whose values are shown); a ``dict[str, <config dataclass>]`` field (such as
    ``optim.roles``) also lists the fields of one entry as ``--prefix.key.<name>.sub``.
    """
    lines = []
    types_ = field_types(cls)
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        default = getattr(defaults, f.name) if defaults is not None else field_default(f)
        help_ = f.metadata.get("help")
        sub = dataclass_type(types_[f.name])
        if sub is not None and dataclasses.is_dataclass(default):
            lines.append(f"  --{prefix}.{f.name}.*  {help_}" if help_ else f"  --{prefix}.{f.name}.*")
            lines += help_lines(sub, f"{prefix}.{f.name}", default)
            continue
        shown = "required" if default is _MISSING else _default_repr(default)
        lines.append(f"  --{prefix}.{f.name} {type_name(types_[f.name])}  (default: {shown})")
        if help_:
            lines.append(f"      {help_}")
        args = get_args(types_[f.name]) if get_origin(types_[f.name]) is dict else ()
        if len(args) == 2 and (entry := dataclass_type(args[1])) is not None:
            lines += help_lines(entry, f"{prefix}.{f.name}.<{f.name[:-1] if f.name.endswith('s') else 'key'}>")
    return lines


PRESET_GROUP = "fewstep_rl.presets"


def plugin_preset(method: str, world: str) -> Any:
    """A preset ``<world>.yaml`` shipped by a plugin package, or None.

    A plugin registers, in the ``fewstep_rl.presets`` entry-point group, the method's name with the package that
    holds its presets (``mymethod = "my_plugin.presets"``; the package holds ``toy2d.yaml``, ``shapes.yaml``, ...).
    Returns an ``importlib.resources`` traversable (works from wheels and editable installs alike).
    """
    from importlib import import_module, resources
    from importlib.metadata import entry_points

    for ep in entry_points(group=PRESET_GROUP):
        if ep.name != method:
            continue
        try:
            pkg = import_module(ep.value.split(":")[0])
        except ImportError as e:
            raise ConfigError(f"preset package {ep.value!r} of method {method!r} cannot be imported: {e}") from None
        p = resources.files(pkg).joinpath(f"{world}.yaml")
        if p.is_file():
            return p
    return None
