"""tools/replicate.py's single-factor ablations each change the loaded config of every method they
are run with, and only in the keys they name (an ablation equal to the defaults would be a no-op
reported as a finding)."""

import importlib.util
from pathlib import Path

import pytest

from megacredit.config import config_to_dict, load_config

REPO = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("replicate_tool", REPO / "tools" / "replicate.py")
replicate = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(replicate)


def _flat(tree: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


@pytest.mark.parametrize("ablation", sorted(replicate.ABLATIONS))
@pytest.mark.parametrize("method", ["sdpo", "credit"])
def test_each_ablation_changes_exactly_its_keys(ablation, method):
    level = [f"data.generator_kwargs.difficulty={replicate.LEVELS['hard']}"]
    path = str(replicate.config_path(method))
    baseline = _flat(config_to_dict(load_config(path, level)))
    ablated = _flat(config_to_dict(load_config(path, level + replicate.ABLATIONS[ablation])))
    changed = {key for key in baseline if baseline[key] != ablated.get(key)}
    named = {override.split("=", 1)[0] for override in replicate.ABLATIONS[ablation]}
    assert changed and changed <= named, (ablation, changed, named)


def _args(tmp_path, **changes):
    import argparse

    values = dict(level="hard", ablation=None, set=[], runs_dir=str(tmp_path / "runs"), steps=20, val_every=20,
                  archive=str(tmp_path / "archive"), commit="abc1234", seeds=[1], methods=["sdpo"])
    return argparse.Namespace(**{**values, **changes})


def test_set_overrides_get_their_own_folder_and_a_finished_run_is_never_overwritten(tmp_path):
    """--set used to share the experiment's folder: a run with other overrides was taken for an
    unfinished one and retrained over the finished run (its metrics lost)."""
    import json

    base, other = _args(tmp_path), _args(tmp_path, set=["algorithm.sdpo.alpha=0.0"])
    assert replicate.run_dir("sdpo", 2, base) != replicate.run_dir("sdpo", 2, other)
    assert replicate.run_dir("sdpo", 2, other).parent.name.startswith("hard_set-")
    assert replicate.run_dir("sdpo", 2, other) == replicate.run_dir("sdpo", 2, _args(tmp_path, set=list(other.set)))
    directory = replicate.run_dir("sdpo", 2, base)
    directory.mkdir(parents=True)
    command = replicate.run_command("sdpo", 2, base)
    assert replicate.overwrite_problem(directory, command) is None  # nothing finished there yet
    (directory / replicate.MARKER).write_text(json.dumps({"command": command[1:]}))
    assert replicate.is_finished(directory, command) and replicate.overwrite_problem(directory, command) is None
    changed = replicate.run_command("sdpo", 2, _args(tmp_path, steps=30))
    problem = replicate.overwrite_problem(directory, changed)
    assert problem and "--runs-dir" in problem and "--force" in problem
    with pytest.raises(SystemExit, match="refusing to overwrite"):
        replicate.run_all(_args(tmp_path, steps=30, methods=["sdpo"], seeds=[2], force=False))


def test_finished_runs_are_archived_and_reported_from_the_archive_without_the_runs_folder(tmp_path):
    """The runs folder is not committed (checkpoints); a later session found it gone and could not add
    a seed to the report. The archive keeps what the report needs, trained in another folder."""
    import json
    import shutil

    args = _args(tmp_path)
    directory = replicate.run_dir("sdpo", 1, args)
    directory.mkdir(parents=True)
    command = replicate.run_command("sdpo", 1, args)
    metrics = [{"step": 0, "val/avg_at_k": 0.25, "val/avg_at_k_ci_low": 0.1, "val/avg_at_k_ci_high": 0.4},
               {"step": 1, "train/loss": 0.5, "perf/time_step": 3.0, "rollout/leakage_count": 0.0},
               {"step": 1, "val/avg_at_k": 0.5, "val/avg_at_k_ci_low": 0.3, "val/avg_at_k_ci_high": 0.7}]
    (directory / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in metrics))
    (directory / "checkpoint.pt").write_bytes(b"large")
    (directory / replicate.MARKER).write_text(json.dumps({"command": command[1:], "wall_s": 9.0, "commit": "abc1234"}))
    replicate.archive_run(directory, replicate.archive_dir("sdpo", 1, args))
    shutil.rmtree(tmp_path / "runs")
    archived = replicate.archive_dir("sdpo", 1, args)
    assert sorted(p.name for p in archived.iterdir()) == ["metrics.jsonl", replicate.MARKER]
    assert replicate.finished_run("sdpo", 1, _args(tmp_path, runs_dir=str(tmp_path / "elsewhere"))) == archived
    [summary] = replicate.collect(_args(tmp_path, runs_dir=str(tmp_path / "elsewhere")))
    assert (summary.commit, summary.final.mean, summary.wall_s) == ("abc1234", 0.5, 9.0)
    assert replicate.finished_run("sdpo", 1, _args(tmp_path, steps=30)) is None  # another command
    marker = json.loads((archived / replicate.MARKER).read_text())
    marker["command"] = [part.replace(str(replicate.REPO), "/elsewhere/checkout") for part in marker["command"]]
    (archived / replicate.MARKER).write_text(json.dumps(marker))  # trained in another checkout
    assert replicate.finished_run("sdpo", 1, args) == archived


def test_the_recorded_commit_ignores_the_harness_reports_but_not_code(tmp_path, monkeypatch):
    """A second invocation found the first one's report (docs/results/) modified and recorded the
    runs' code at HEAD as changed."""
    import subprocess

    def git(*arguments):
        subprocess.run(["git", "-C", str(tmp_path), "-c", "user.name=t", "-c", "user.email=t@t", *arguments],
                       check=True, capture_output=True)

    (tmp_path / "docs" / "results").mkdir(parents=True)
    (tmp_path / "docs" / "results" / "hard.md").write_text("report\n")
    (tmp_path / "train.py").write_text("code\n")
    git("init", "-q")
    git("add", "-A")
    git("commit", "-qm", "start")
    monkeypatch.setattr(replicate, "REPO", tmp_path)
    (tmp_path / "docs" / "results" / "hard.md").write_text("a newer report\n")
    assert "uncommitted" not in replicate.git_commit()
    (tmp_path / "train.py").write_text("changed code\n")
    assert replicate.git_commit().endswith("(with uncommitted changes)")
