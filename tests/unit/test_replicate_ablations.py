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
