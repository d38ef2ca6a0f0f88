"""Environments with verifiable rewards and feedback z for the self-teacher (issue 5).

Public API: :class:`Environment`, :class:`EnvResult`, :func:`make_env` (by name, lazily
importing the code environment), and the concrete environments in their modules.
"""

from megacredit.envs.base import EnvResult, Environment
from megacredit.envs.registry import make_env, valid_env_names

__all__ = ["EnvResult", "Environment", "make_env", "valid_env_names"]
