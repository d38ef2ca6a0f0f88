"""Nothing green by skipping: with a dependency that `make test` installs removed on purpose,
`.ci/run`'s mode (MEGACREDIT_REQUIRE_ALL=1) fails the tests that need it and names it, while a
developer's run skips them; and tools/system_deps.sh exits non-zero when it cannot install.

The dependency is hidden, not uninstalled: pytest runs on one test file in a child process
whose ``sys.modules['nemo_run']`` is None (``importlib.util.find_spec`` and ``import`` both
then see no NeMo-Run), or system_deps.sh runs with a PATH of stand-ins."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from make_deps import DEPENDENCIES, REQUIRE_ALL

ROOT = Path(__file__).resolve().parents[2]
HIDE_NEMO_RUN = "import sys, pytest; sys.modules['nemo_run'] = None; sys.exit(pytest.main(sys.argv[1:]))"
NEMO_TESTS = [f"tests/unit/test_launchers_dryrun.py::{name}" for name in (
    "test_recipe_command_line_dryrun_with_local_executor_and_overrides", "test_recipe_is_the_config_tree_and_stays_editable")]


def _pytest_without_nemo_run(require_all: bool) -> subprocess.CompletedProcess:
    env = {key: value for key, value in os.environ.items() if key != REQUIRE_ALL}
    if require_all:
        env[REQUIRE_ALL] = "1"
    command = [sys.executable, "-c", HIDE_NEMO_RUN, "-q", "-ra", "-p", "no:cacheprovider", *NEMO_TESTS]
    return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def test_ci_mode_fails_and_names_a_hidden_dependency():
    result = _pytest_without_nemo_run(require_all=True)
    assert result.returncode != 0, result.stdout[-3000:]
    errors = [line for line in result.stdout.splitlines() if line.startswith("ERROR tests/unit/test_launchers_dryrun.py")]
    assert len(errors) == 2, result.stdout[-3000:]  # both tests, at setup
    message = f"{REQUIRE_ALL}=1 (.ci/run), so a missing dependency fails: missing {DEPENDENCIES['nemo_run']}"
    # Once per test in the ERRORS section (a line of its own); the short summary repeats it after
    # "- Failed: ", cut or not depending on the terminal's width, so it is not counted.
    assert [line.strip() for line in result.stdout.splitlines()].count(message) == 2, result.stdout[-3000:]
    assert "NeMo-Run (import nemo_run): `make env` installs the [nemo] extra" in message


def test_without_ci_mode_the_same_tests_skip_naming_the_dependency():
    result = _pytest_without_nemo_run(require_all=False)
    assert result.returncode == 0, result.stdout[-3000:]
    assert "2 skipped" in result.stdout and "missing NeMo-Run (import nemo_run)" in result.stdout


def test_ci_run_sets_the_variable_before_make_test():
    lines = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    assert lines.index(f"export {REQUIRE_ALL}=1") < lines.index("make test")


def _system_deps(tmp_path: Path, apt_get_status: int, mode: str) -> subprocess.CompletedProcess:
    """tools/system_deps.sh as root on a PATH with none of the packages: `id` says root, `apt-get
    update` works and `apt-get install` exits with ``apt_get_status`` installing nothing
    (libseccomp's check runs this Python, which finds it)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    for name, body in (("id", "echo 0"), ("apt-get", f'echo "$@" >> {tmp_path}/apt.log; [ "$1" = update ] || exit {apt_get_status}')):
        (bin_dir / name).write_text(f"#!/bin/sh\n{body}\n")
        (bin_dir / name).chmod(0o755)
    env = {"PATH": str(bin_dir), "PYTHON": sys.executable, "SYSTEM_DEPS": mode}
    return subprocess.run(["/bin/bash", str(ROOT / "tools" / "system_deps.sh")], env=env, capture_output=True,
                          text=True, timeout=60)


def test_system_deps_exits_non_zero_when_the_install_fails(tmp_path):
    result = _system_deps(tmp_path, apt_get_status=100, mode="required")
    assert result.returncode == 1, result.stdout + result.stderr
    assert "apt-get could not provide bubblewrap chromium slurmctld" in result.stdout
    assert "error: missing bubblewrap: without it the code sandbox uses its weaker fallback" in result.stderr
    assert "make test SYSTEM_DEPS=optional" in result.stderr
    assert "install -y -qq --no-install-recommends bubblewrap chromium" in (tmp_path / "apt.log").read_text()


def test_system_deps_optional_warns_and_goes_on(tmp_path):
    result = _system_deps(tmp_path, apt_get_status=100, mode="optional")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "warning: missing chromium: without it the token-heatmap screenshot test is skipped" in result.stdout


def test_system_deps_fails_when_apt_succeeds_but_the_pieces_are_still_missing(tmp_path):
    result = _system_deps(tmp_path, apt_get_status=0, mode="required")
    assert result.returncode == 1 and "apt-get could not provide bubblewrap" in result.stdout
