"""A minimal JSON-over-HTTP client for remote engines (stdlib only: no extra dependency)."""

from __future__ import annotations

import http.client
import json
import time
import urllib.error
import urllib.request
from typing import Any
from urllib.parse import urlsplit

from megacredit.rollout.base import EngineUnavailableError

HEALTH_TIMEOUT_S = 30.0
"""How long a server's ``GET /health`` may take before it counts as unhealthy (a trivial
endpoint: seconds even on a loaded machine)."""


class EngineHTTPError(RuntimeError):
    """A server answered with an error status (``status``), or could not be reached
    (``status`` None)."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class EngineUnreachableError(EngineHTTPError, EngineUnavailableError):
    """A server could not be reached, dropped the connection or did not answer within the
    client's timeout: it died or hangs."""


def normalize_url(url: str, field: str = "rollout.urls") -> str:
    """'host:port' or 'http(s)://host:port[/]' -> 'http(s)://host:port' (errors name ``field``)."""
    text = str(url).strip().rstrip("/")
    if "://" not in text:
        text = "http://" + text
    parts = urlsplit(text)
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.port is None:
        raise ValueError(f"{field}: {url!r} is not a server address; write 'http://host:port' or 'host:port'")
    return f"{parts.scheme}://{parts.netloc}{parts.path}"


class JSONClient:
    """``get`` / ``post`` JSON bodies; errors name the URL, the status and the server's answer."""

    def __init__(self, timeout: float = 600.0) -> None:
        self.timeout = timeout

    def request(self, method: str, url: str, path: str, body: Any | None = None) -> Any:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(f"{url}{path}", data=data, method=method,
                                         headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                raw = response.read()
        except urllib.error.HTTPError as error:
            detail = error.read().decode(errors="replace")[:2000]
            raise EngineHTTPError(f"{method} {url}{path} -> HTTP {error.code}: {detail}", error.code) from error
        except (urllib.error.URLError, OSError, http.client.HTTPException) as error:  # refused, reset, timed out
            reason = getattr(error, "reason", None) or error or type(error).__name__
            raise EngineUnreachableError(f"{method} {url}{path} failed: {reason}; is the server up?") from error
        if not raw:
            return None
        try:
            return json.loads(raw)
        except json.JSONDecodeError:
            return raw.decode(errors="replace")

    def get(self, url: str, path: str) -> Any:
        return self.request("GET", url, path)

    def post(self, url: str, path: str, body: Any | None = None) -> Any:
        return self.request("POST", url, path, {} if body is None else body)

    def health_problem(self, url: str, path: str = "/health", timeout: float = 10.0) -> str | None:
        """None when ``GET url+path`` answers with a success status within ``timeout`` seconds,
        else what happened (refused, timed out, an error status)."""
        try:
            urllib.request.urlopen(f"{url}{path}", timeout=timeout).read()
            return None
        except urllib.error.HTTPError as error:
            return f"GET {url}{path} -> HTTP {error.code}"
        except (urllib.error.URLError, OSError, http.client.HTTPException) as error:
            return f"GET {url}{path} failed: {getattr(error, 'reason', None) or error or type(error).__name__}"

    def wait_healthy(self, url: str, path: str = "/health", timeout: float = 300.0,
                     alive: Any = None) -> None:
        """Poll ``GET url+path`` until it answers; ``alive()`` returning False (the server
        process died) stops the wait early. Raises ``EngineHTTPError`` on timeout."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                urllib.request.urlopen(f"{url}{path}", timeout=5).read()
                return
            except (urllib.error.URLError, OSError):
                pass
            if alive is not None and not alive():
                raise EngineHTTPError(f"the server for {url} exited before {path} answered")
            if time.monotonic() > deadline:
                raise EngineHTTPError(f"{url}{path} did not answer within {timeout:.0f} s")
            time.sleep(0.5)
