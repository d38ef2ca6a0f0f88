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

    values = dict(level="hard", ablation=None, set=[], runs_dir=str(tmp_path), steps=20, val_every=20)
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
