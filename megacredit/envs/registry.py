"""``make_env(name, **kwargs)``: build an environment by name, importing its module lazily.

The code environment (megacredit/envs/code.py, sandboxed execution) is only imported when
asked for, so the other environments work without it.
"""

from __future__ import annotations

import importlib
from typing import Any

from megacredit.envs.base import Environment

ENV_CLASSES: dict[str, tuple[str, str]] = {
    "arithmetic": ("megacredit.envs.arithmetic", "ArithmeticEnv"),
    "multiple_choice": ("megacredit.envs.multiple_choice", "MultipleChoiceEnv"),
    "tool_call": ("megacredit.envs.tool_call", "ToolCallEnv"),
    "code": ("megacredit.envs.code", "CodeEnv"),
}
"""Environment name -> (module, class name)."""

ENV_ALIASES: dict[str, str] = {
    "sciknoweval": "multiple_choice",
    "mcq": "multiple_choice",
    "toolalpaca": "tool_call",
    "tooluse": "tool_call",
    "livecodebench": "code",
    "lcb": "code",
}
"""Dataset-flavoured aliases accepted by :func:`make_env`."""


def valid_env_names() -> list[str]:
    """All names :func:`make_env` accepts (canonical names and aliases)."""
    return sorted(ENV_CLASSES) + sorted(ENV_ALIASES)


def make_env(name: str, **kwargs: Any) -> Environment:
    """Instantiate the environment called ``name`` with constructor keyword arguments ``kwargs``.

    ``name`` is a registered name (or alias), or ``"package.module:ClassName"`` for an
    environment of your own (a subclass of megacredit.envs.base.Environment).
    """
    canonical = ENV_ALIASES.get(name, name)
    if canonical in ENV_CLASSES:
        module_name, class_name = ENV_CLASSES[canonical]
    elif ":" in name:
        module_name, _, class_name = name.partition(":")
    else:
        raise ValueError(
            f"unknown environment {name!r}; valid names: {', '.join(valid_env_names())}, "
            f"or 'package.module:ClassName' for your own Environment subclass"
        )
    module = importlib.import_module(module_name)
    env_class = getattr(module, class_name, None)
    if not (isinstance(env_class, type) and issubclass(env_class, Environment)):
        raise ValueError(f"environment {name!r}: {module_name}.{class_name} is not an Environment subclass")
    try:
        return env_class(**kwargs)
    except TypeError as error:
        raise TypeError(f"make_env({name!r}): bad keyword arguments {sorted(kwargs)} for {class_name}: {error}") from error
