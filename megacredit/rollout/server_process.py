"""An inference server started as a subprocess and stopped by its PID (vLLM's and SGLang's
launchers share it), and the environment an engine starts with.

The server runs in its own process group (``start_new_session``), so :meth:`ServerProcess.stop`
ends it and every process it spawned (engine cores, schedulers, detokenizers) by that group's
id: SIGTERM, then SIGKILL. Nothing is looked up by name.
"""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

from megacredit.rollout.http_json import EngineHTTPError, JSONClient


def engine_environment(cpu_defaults: Mapping[str, str], environ: Mapping[str, str] | None = None,
                       defaults: Mapping[str, str] | None = None) -> dict[str, str]:
    """``environ`` (default: this process's) plus ``defaults`` and, where CUDA is absent,
    ``cpu_defaults``; settings already present win."""
    env = dict(os.environ if environ is None else environ)
    for key, value in (defaults or {}).items():
        env.setdefault(key, value)
    if not torch.cuda.is_available():
        for key, value in cpu_defaults.items():
            env.setdefault(key, value)
    return env


class ServerProcess:
    """A server subprocess on a free 127.0.0.1 port; subclasses give :meth:`command` and
    :meth:`environment`. Use as a context manager or ``start()`` / ``stop()``."""

    name = "server"
    health_path = "/health"

    def __init__(self, model_path: str | Path, *, port: int | None = None, log_path: str | Path | None = None,
                 extra_args: Sequence[str] = (), env: Mapping[str, str] | None = None,
                 startup_timeout: float = 600.0) -> None:
        from megacredit.rollout.weight_group import free_port  # noqa: PLC0415

        self.model_path, self.port = str(model_path), port or free_port("127.0.0.1")
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = Path(log_path) if log_path else Path(f"/tmp/megacredit-{self.name}-{self.port}.log")
        self.extra_args, self.env, self.startup_timeout = list(extra_args), dict(env or {}), startup_timeout
        self.process: subprocess.Popen | None = None

    def command(self) -> list[str]:
        raise NotImplementedError

    def environment(self) -> dict[str, str]:
        return {**os.environ, **self.env}

    def start(self) -> "ServerProcess":
        log = open(self.log_path, "wb")  # noqa: SIM115 - kept open for the server's lifetime
        self.process = subprocess.Popen(self.command(), stdout=log, stderr=subprocess.STDOUT,
                                        env=self.environment(), start_new_session=True)
        log.close()
        try:
            JSONClient().wait_healthy(self.url, self.health_path, timeout=self.startup_timeout,
                                      alive=lambda: self.process.poll() is None)
        except EngineHTTPError as error:
            self.stop()
            raise EngineHTTPError(f"{error}\n--- last lines of {self.log_path} ---\n{self.log_tail()}") from None
        return self

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def stop(self, timeout: float = 30.0) -> None:
        """SIGTERM to the server's process group (its PID), SIGKILL if it has not exited."""
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(process.pid, sig)
            except ProcessLookupError:
                return
            try:
                process.wait(timeout=timeout)
                break
            except subprocess.TimeoutExpired:
                continue
        try:  # anything the server spawned that outlived it (same process group)
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    def __enter__(self) -> "ServerProcess":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()
