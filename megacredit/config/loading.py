"""Loading a run's configuration: YAML file (with ``base:`` files) + ``key.sub=value`` overrides.

``load_config(path, overrides)`` builds a :class:`MegacreditConfig` in four layers, later
layers winning: the dataclass defaults (the CREDIT paper's Table 3 values), the preset of the
chosen ``algorithm.name`` (megacredit/algorithms/methods.py, e.g. RLSD's clip 0.2/0.28 and
hard-copy teacher), the YAML file, the command-line overrides. The result is validated
(megacredit/config/validation.py) and can be written back with :func:`config_to_yaml`.
"""

from __future__ import annotations

import copy
import warnings
from pathlib import Path
from typing import Any

import yaml

from megacredit.algorithms.methods import ALGORITHM_SECTIONS, METHODS
from megacredit.config.parsing import (
    ConfigError,
    ConfigWarning,
    build_dataclass,
    dataclass_to_dict,
    deep_merge,
    explicit_keys,
    nest_dotted,
    parse_override,
    read_yaml_with_bases,
    set_dotted,
)
from megacredit.config.schema import AlgorithmConfig, MegacreditConfig
from megacredit.config.validation import inapplicable_keys, validate_config


def load_config(
    path: str | Path | None, overrides: list[str] | None = None, check_paths: bool = True
) -> MegacreditConfig:
    """Load a YAML config, apply ``key.sub=value`` overrides, apply presets, validate.

    ``check_paths=False`` skips the existence checks of data files and the resume path
    (for configs meant for another machine, e.g. the paper-scale examples).
    """
    user, explicit = read_user_config(path, overrides or [])
    name_override = any(o.split("=", 1)[0].strip() == "algorithm.name" for o in overrides or [])
    if name_override:
        explicit = _drop_other_methods_settings(user, explicit, path, overrides or [])
    cfg = resolve_config(user)
    validate_config(cfg, explicit, check_paths=check_paths)
    return cfg


def _drop_other_methods_settings(
    user: dict[str, Any], explicit: set[str], path: str | Path | None, overrides: list[str]
) -> set[str]:
    """When ``algorithm.name`` is overridden on the command line, settings in the FILE that the
    new method does not read are dropped with a warning (so a CREDIT file can be re-run as
    SDPO or GRPO); such settings given as overrides still raise in validation."""
    name = (user.get("algorithm") or {}).get("name")
    if name not in METHODS:
        return explicit
    from_overrides = {o.split("=", 1)[0].strip() for o in overrides}
    dropped = [key for key, _ in inapplicable_keys(name, explicit) if key not in from_overrides]
    for key in dropped:
        *parents, leaf = key.split(".")
        node = user
        for part in parents:
            node = node[part]
        node.pop(leaf, None)
    if dropped:
        warnings.warn(
            f"algorithm.name={name} (override) does not read {', '.join(dropped)} set in "
            f"'{path}'; those settings are ignored", ConfigWarning, stacklevel=3,
        )
    return explicit - set(dropped)


def read_user_config(path: str | Path | None, overrides: list[str]) -> tuple[dict, set[str]]:
    """The user's nested dict (file + bases + overrides) and the dotted keys it sets."""
    data = read_yaml_with_bases(path) if path is not None else {}
    explicit = explicit_keys(MegacreditConfig, data)
    for text in overrides:
        segments, value = parse_override(text)
        explicit.add(set_dotted(MegacreditConfig, data, segments, value))
    return data, explicit


def resolve_config(user: dict[str, Any]) -> MegacreditConfig:
    """Defaults, then the chosen method's preset, then ``user`` (nested dict)."""
    base = dataclass_to_dict(MegacreditConfig())
    algorithm = user.get("algorithm")
    if algorithm is not None and not isinstance(algorithm, dict):
        raise ConfigError(f"config key 'algorithm' must be a mapping, got {algorithm!r}")
    name = (algorithm or {}).get("name", base["algorithm"]["name"])
    if name not in METHODS:
        # Let the typed conversion produce the did-you-mean message for the Literal.
        build_dataclass(AlgorithmConfig, {"name": name}, "algorithm")
    merged = deep_merge(deep_merge(base, nest_dotted(dict(METHODS[name].preset))), user)
    return build_dataclass(MegacreditConfig, merged)


def config_to_dict(cfg: MegacreditConfig) -> dict[str, Any]:
    """Plain nested dict, without the algorithm settings the chosen method does not read."""
    data = dataclass_to_dict(cfg)
    method = METHODS[cfg.algorithm.name]
    for section in ALGORITHM_SECTIONS:
        if section not in method.config_sections:
            del data["algorithm"][section]
    for key in method.ignored_keys:
        *parents, leaf = key.split(".")
        node = data
        for part in parents:
            node = node[part]
        node.pop(leaf, None)
    return data


def config_to_yaml(cfg: MegacreditConfig) -> str:
    """YAML text that :func:`load_config` reads back into an equal config."""
    return yaml.safe_dump(config_to_dict(cfg), sort_keys=False, default_flow_style=False)


def save_config(cfg: MegacreditConfig, path: str | Path) -> Path:
    """Write :func:`config_to_yaml` to ``path`` (e.g. ``<run_dir>/config.yaml``)."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(config_to_yaml(cfg))
    return out


def replace(cfg: MegacreditConfig, **dotted: Any) -> MegacreditConfig:
    """A validated copy with dotted keys changed: ``replace(cfg, **{"training.steps": 3})``."""
    data = dataclass_to_dict(copy.deepcopy(cfg))
    for key, value in dotted.items():
        set_dotted(MegacreditConfig, data, key.split("."), value)
    new = build_dataclass(MegacreditConfig, data)
    validate_config(new, set(), check_paths=False)
    return new
