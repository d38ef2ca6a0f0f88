"""The weight manifest (HF name -> shape) of a Hugging Face checkpoint folder, read from the
safetensors headers only (no tensor is loaded).

Engines that cannot list their parameters from the trainer's process (SGLang's scheduler
processes, a remote server) accept exactly the names of the checkpoint they were started
from, so that checkpoint's manifest is what a weight update is checked against before any
tensor moves (``RolloutEngine.weight_manifest``).
"""

from __future__ import annotations

import json
from pathlib import Path

from megacredit.rollout.base import WeightManifest


def checkpoint_manifest(hf_dir: str | Path) -> WeightManifest:
    """HF name -> shape of every tensor in ``hf_dir``'s safetensors (sharded or not)."""
    from safetensors import safe_open  # noqa: PLC0415

    folder = Path(hf_dir)
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    else:
        files = sorted(p.name for p in folder.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(
            f"no safetensors weights in {folder}: the engine's model_path must be a Hugging Face "
            f"folder with model.safetensors (or an index); convert other formats first"
        )
    manifest: WeightManifest = {}
    for file in files:
        with safe_open(str(folder / file), framework="pt") as handle:
            for name in handle.keys():
                manifest[name] = tuple(handle.get_slice(name).get_shape())
    return manifest
