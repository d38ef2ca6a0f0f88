"""Generic, schema-agnostic machinery behind :mod:`megacredit.config`.

Turns nested plain dicts (from YAML) into typed dataclasses with errors that name the full
dotted key, and applies ``key.sub=value`` command-line overrides whose values are parsed as
YAML scalars (the dotlist convention of Hydra, which verl's trainers and NeMo-RL's
``nemo_rl/utils/config.py::parse_hydra_overrides`` use).

Supported field types: ``int``, ``float``, ``str``, ``bool``, ``Literal[...]``,
``Optional[X]`` (``X | None``), ``list[X]``, ``dict[str, Any]`` and nested dataclasses.

Why not OmegaConf (tried with omegaconf 2.4.0, which builds structured configs from these same
dataclasses and accepts ``key=value`` dotlists): it would replace the conversion and merging
below, but not the rest, and it changes what a config means. (1) It coerces: ``flag=yes`` and
``flag=1`` become True, ``steps='7'`` becomes 7, where this module rejects a value of the wrong
type with the key, the expected type and the value. (2) Its errors span several lines
(``full_key:``, ``reference_type=``, ``object_type=``) and a wrong ``Literal`` value gets no
did-you-mean, so each error would be re-parsed into our one line. (3) ``base:`` files and the set
of keys the user wrote (needed to reject another method's settings, config/validation.py) are not
OmegaConf's: both would stay. The saving would be about 150 of these 330 lines, for a new
dependency and a looser config.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from pathlib import Path
from typing import Any, Iterable, Literal, Union

import yaml

from megacredit.utils.errors import SetupError


class ConfigError(SetupError, ValueError):
    """A configuration problem; the message names the dotted key and how to fix it."""


class ConfigWarning(UserWarning):
    """A configuration setting that is ignored (e.g. another method's settings)."""


def did_you_mean(word: str, candidates: Iterable[str]) -> str:
    """Return ``" Did you mean 'x'?"`` for the closest candidate, or ``""`` if none is close."""
    matches = difflib.get_close_matches(word, list(candidates), n=1, cutoff=0.6)
    return f" Did you mean '{matches[0]}'?" if matches else ""


def _join(prefix: str, key: str) -> str:
    return f"{prefix}.{key}" if prefix else key


def _field_types(cls: type) -> dict[str, Any]:
    """Resolved type hints of a dataclass (handles ``from __future__ import annotations``)."""
    return typing.get_type_hints(cls)


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if tp is type(None):
        return "null"
    if origin is list:
        return f"list of {_type_name(typing.get_args(tp)[0])}"
    if origin is dict:
        return "mapping"
    if dataclasses.is_dataclass(tp):
        return f"mapping ({tp.__name__})"
    return getattr(tp, "__name__", str(tp))


def _wrong_type(key: str, tp: Any, value: Any) -> ConfigError:
    return ConfigError(
        f"config key '{key}' expects {_type_name(tp)}, got {value!r} ({type(value).__name__})"
    )


def convert_value(key: str, tp: Any, value: Any) -> Any:
    """Check ``value`` against type ``tp`` and return it converted; errors name ``key``."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return convert_value(key, arg, value)
            except ConfigError:
                continue
        raise _wrong_type(key, tp, value)
    if origin is Literal:
        choices = typing.get_args(tp)
        if isinstance(value, bool) and ("on" if value else "off") in choices:  # YAML 1.1 reads bare on/off as bools
            return "on" if value else "off"
        if value in choices and type(value) in {type(c) for c in choices}:
            return value
        hint = did_you_mean(str(value), [str(c) for c in choices])
        raise ConfigError(
            f"config key '{key}' must be {_type_name(tp)}, got {value!r}.{hint}"
        )
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise _wrong_type(key, tp, value)
        (item_tp,) = typing.get_args(tp)
        return [convert_value(f"{key}[{i}]", item_tp, v) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise _wrong_type(key, tp, value)
        return dict(value)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise _wrong_type(key, tp, value)
        return build_dataclass(tp, value, key)
    return _convert_scalar(key, tp, value)


def _convert_scalar(key: str, tp: Any, value: Any) -> Any:
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise _wrong_type(key, tp, value)
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise _wrong_type(key, tp, value)
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            # PyYAML (YAML 1.1) reads "1e-6" as a string; accept any float literal here.
            try:
                return float(value)
            except ValueError:
                pass
        raise _wrong_type(key, tp, value)
    if tp is str:
        if isinstance(value, str):
            return value
        raise _wrong_type(key, tp, value)
    raise TypeError(f"config_parsing: unsupported field type {tp!r} for '{key}'")


def build_dataclass(cls: type, data: dict[str, Any], prefix: str = "") -> Any:
    """Build dataclass ``cls`` from ``data``; missing keys take the field defaults."""
    check_keys(cls, data, prefix)
    hints = _field_types(cls)
    kwargs = {
        name: convert_value(_join(prefix, name), hints[name], value)
        for name, value in data.items()
    }
    return cls(**kwargs)


def check_keys(cls: type, data: dict[str, Any], prefix: str = "") -> None:
    """Raise a did-you-mean ConfigError for the first key of ``data`` that ``cls`` lacks."""
    names = [f.name for f in dataclasses.fields(cls)]
    for key in data:
        if key not in names:
            full = _join(prefix, str(key))
            hint = did_you_mean(str(key), names)
            raise ConfigError(
                f"unknown config key '{full}'.{hint} Valid keys under "
                f"'{prefix or '<root>'}': {', '.join(names)}"
            )


def dataclass_to_dict(obj: Any) -> Any:
    """Plain nested dicts/lists of a dataclass instance (for YAML)."""
    if dataclasses.is_dataclass(obj):
        return {f.name: dataclass_to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [dataclass_to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: dataclass_to_dict(v) for k, v in obj.items()}
    return obj


def parse_override(text: str) -> tuple[list[str], Any]:
    """Split ``"a.b.c=value"`` into ``(["a", "b", "c"], yaml_scalar(value))``."""
    if "=" not in text:
        raise ConfigError(
            f"override '{text}' is not of the form key.sub=value (e.g. training.steps=10)"
        )
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key or any(part == "" for part in key.split(".")):
        raise ConfigError(f"override '{text}' has an empty key part")
    try:
        value = yaml.safe_load(raw) if raw.strip() != "" else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"override '{text}': value is not valid YAML ({_yaml_problem(exc)}); "
                          f"quote it to pass a string: {key}='\"...\"'") from None
    return key.split("."), value


def set_dotted(root_cls: type, data: dict[str, Any], path: list[str], value: Any) -> str:
    """Set ``data[path]`` creating dicts as needed, checking each segment against the schema.

    Returns the dotted key recorded as explicitly set: the full path, or the path up to a
    free-form ``dict`` field when the override reaches inside one (``env.kwargs.seed``).
    """
    cls: Any = root_cls
    node = data
    for depth, part in enumerate(path):
        prefix = ".".join(path[:depth])
        check_keys(cls, {part: None}, prefix)
        tp = _field_types(cls)[part]
        inner = _strip_optional(tp)
        last = depth == len(path) - 1
        if last:
            node[part] = value
            return ".".join(path)
        if typing.get_origin(inner) is dict:
            sub = node.setdefault(part, {})
            if not isinstance(sub, dict):
                sub = node[part] = {}
            _set_free(sub, path[depth + 1 :], value)
            return ".".join(path[: depth + 1])
        if not dataclasses.is_dataclass(inner):
            raise ConfigError(
                f"config key '{'.'.join(path[: depth + 1])}' is of type {_type_name(tp)}, "
                f"it has no sub-key '{path[depth + 1]}'"
            )
        sub = node.get(part)
        if not isinstance(sub, dict):
            sub = node[part] = {}
        node, cls = sub, inner
    raise AssertionError("unreachable")


def _set_free(node: dict[str, Any], path: list[str], value: Any) -> None:
    for part in path[:-1]:
        nxt = node.get(part)
        if not isinstance(nxt, dict):
            nxt = node[part] = {}
        node = nxt
    node[path[-1]] = value


def _strip_optional(tp: Any) -> Any:
    if typing.get_origin(tp) in (Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return tp


def explicit_keys(cls: type, data: dict[str, Any], prefix: str = "") -> set[str]:
    """Dotted keys present in ``data`` (leaves, or free-form dict fields as a whole)."""
    check_keys(cls, data, prefix)
    hints = _field_types(cls)
    keys: set[str] = set()
    for name, value in data.items():
        full = _join(prefix, name)
        inner = _strip_optional(hints[name])
        if dataclasses.is_dataclass(inner) and isinstance(value, dict):
            keys |= explicit_keys(inner, value, full)
        else:
            keys.add(full)
    return keys


def deep_merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    """Recursive merge; values of ``top`` win, nested dicts merge key by key."""
    out = dict(base)
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def nest_dotted(flat: dict[str, Any]) -> dict[str, Any]:
    """``{"a.b": 1}`` -> ``{"a": {"b": 1}}``."""
    out: dict[str, Any] = {}
    for key, value in flat.items():
        _set_free(out, key.split("."), value)
    return out


BASE_KEY = "base"
"""Top-level YAML key naming other config files (relative paths) merged under this one."""


def _yaml_problem(error: yaml.YAMLError) -> str:
    """A YAML parser error in one line: its problem and where (line, column, 1-based)."""
    problem = getattr(error, "problem", None) or str(error).splitlines()[0]
    mark = getattr(error, "problem_mark", None)
    return f"{problem} at line {mark.line + 1}, column {mark.column + 1}" if mark else problem


def read_yaml_with_bases(path: str | Path, _chain: tuple[Path, ...] = ()) -> dict[str, Any]:
    """A YAML mapping with its ``base:`` file(s) merged underneath (this file wins)."""
    file = Path(path).expanduser()
    if file.is_dir():
        raise ConfigError(f"config file '{path}' is a directory; give the path of a YAML file "
                          f"(e.g. {path}/config.yaml of a run directory)")
    if not file.is_file():
        raise ConfigError(f"config file '{path}' does not exist")
    if file.resolve() in _chain:
        raise ConfigError(f"config file '{path}' includes itself through '{BASE_KEY}:'")
    try:
        loaded = yaml.safe_load(file.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file '{path}' is not valid YAML: {_yaml_problem(exc)}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"config file '{path}' cannot be read as UTF-8 text: {exc}") from None
    if loaded is not None and not isinstance(loaded, dict):
        raise ConfigError(f"config file '{path}' must hold a mapping at the top level")
    data = dict(loaded or {})
    bases = data.pop(BASE_KEY, None) or []
    if isinstance(bases, str):
        bases = [bases]
    if not isinstance(bases, list) or not all(isinstance(b, str) for b in bases):
        raise ConfigError(f"config file '{path}': '{BASE_KEY}' must be a path or a list of paths")
    merged: dict[str, Any] = {}
    for base in bases:
        merged = deep_merge(merged, read_yaml_with_bases(file.parent / base,
                                                         _chain + (file.resolve(),)))
    return deep_merge(merged, data)
