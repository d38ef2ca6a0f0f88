"""benchmarks/gpu_check.py on a CPU: the dry run, the offline install of missing wheels, and the
rl_step and topk_head checks at small sizes (their CUDA measurements, and ipc_handoff, need a GPU:
unrun here). Each run is a child process, ended by its pid if it outlives its timeout."""

from __future__ import annotations

import json
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "gpu_check.py"
pytestmark = [pytest.mark.integration]


def _script(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)


def _wheel(folder: Path, name: str, version: str = "0.1") -> Path:
    """A minimal pure-Python wheel: one module, its dist-info (PEP 427)."""
    path = folder / f"{name}-{version}-py3-none-any.whl"
    info = f"{name}-{version}.dist-info"
    with zipfile.ZipFile(path, "w") as wheel:
        wheel.writestr(f"{name}/__init__.py", "VALUE = 42\n")
        wheel.writestr(f"{info}/METADATA", f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
        wheel.writestr(f"{info}/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        wheel.writestr(f"{info}/RECORD", "")
    return path


@pytest.fixture
def wheels(tmp_path) -> Path:
    folder = tmp_path / "wheels"
    folder.mkdir()
    _wheel(folder, "megacredit_gpu_check_demo")
    (folder / "megatron_core-0.16.1-cp312-cp312-manylinux_2_28_x86_64.whl").write_bytes(b"")  # installed here
    return folder


def test_the_dry_run_prints_the_plan_without_cuda(wheels):
    results = ROOT / "benchmarks" / "results" / "gpu_check.json"
    before = results.read_bytes() if results.exists() else None
    result = _script("--dry-run", "--wheels", str(wheels))
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    for check in ("ipc_handoff", "topk_head", "rl_step"):
        assert f"check {check} (limit " in out
    assert "would install into" in out and "['megacredit_gpu_check_demo-0.1-py3-none-any.whl']" in out
    assert "rl_step config (validated): credit, tiny qwen3 hidden 512 x 4 layers, bfloat16" in out
    assert (results.read_bytes() if results.exists() else None) == before  # a dry run writes nothing
    refused = _script("--wheels", str(wheels), timeout=300)  # a real run, on this CPU machine
    assert refused.returncode == 2 and "no CUDA device here" in refused.stdout


def test_missing_wheels_are_installed_offline_into_the_site_folder(wheels, tmp_path, monkeypatch):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import gpu_check
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    site = tmp_path / "site"
    assert gpu_check.install_missing(wheels, site) == ["megacredit_gpu_check_demo-0.1-py3-none-any.whl"]
    assert (site / "megacredit_gpu_check_demo" / "__init__.py").read_text() == "VALUE = 42\n"
    monkeypatch.syspath_prepend(str(site))
    assert gpu_check.missing_wheels(wheels) == []  # a second run installs nothing


@pytest.mark.parametrize("check", ["rl_step", "topk_head"])
def test_a_small_check_runs_on_cpu(check, tmp_path):
    out = tmp_path / f"{check}.json"
    result = _script("--check", check, "--small", "--out", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["passed"], report
    if check == "rl_step":
        assert all(report["checks"].values()) and report["metrics"]["train/grad_norm"] > 0
        assert report["layer_spec"].startswith("Megatron-Core local layer spec: model.transformer_engine=auto")
    else:
        assert report["agreement"]["topk_ids_equal"] and set(report["peak_extra_gib"]) == {"chunked", "naive"}
