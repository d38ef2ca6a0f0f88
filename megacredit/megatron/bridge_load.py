"""Load Hugging Face safetensors into a Megatron ``GPTModel`` of any TP x PP layout.

Every rank reads, tensor by tensor (``safetensors.safe_open``, never the whole checkpoint),
only the HF tensors its own parameters are made of and copies its TP slice in place. No
collective is needed: each rank knows its TP rank and, from each layer's ``layer_number``,
the global index of the layers it holds.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import torch

from megacredit.megatron.distributed import ParallelContext
from megacredit.megatron.hf_mapping import (
    EMBEDDING,
    EXPERT_PREFIX,
    FINAL_NORM,
    LAYER_PREFIX,
    OUTPUT_LAYER,
    AttentionShape,
    mapping_for,
    shard_for_rank,
)
from megacredit.rollout.expert_names import per_expert_views
from megacredit.utils.errors import SetupError, one_line


class HFCheckpointError(SetupError, FileNotFoundError):
    """A Hugging Face folder has no (readable) safetensors weights."""


def unwrap_model(model: torch.nn.Module) -> torch.nn.Module:
    """The bare ``GPTModel`` inside Megatron's DDP / Float16Module wrappers."""
    while hasattr(model, "module") and not hasattr(model, "decoder"):
        model = model.module
    return model


def global_named_parameters(model_chunks: Sequence[torch.nn.Module]) -> dict[str, torch.nn.Parameter]:
    """This rank's parameters keyed by GLOBAL Megatron name: layer indices shifted by the
    pipeline stage's offset (``layer_number`` is Megatron's 1-based global layer index), MoE
    expert indices by the expert-parallel rank's (``MoELayer.local_expert_indices``)."""
    named: dict[str, torch.nn.Parameter] = {}
    for chunk in model_chunks:
        model = unwrap_model(chunk)
        layers = model.decoder.layers
        for name, param in model.named_parameters():
            if name.startswith(LAYER_PREFIX):
                local_index, _, suffix = name[len(LAYER_PREFIX):].partition(".")
                layer = layers[int(local_index)]
                if suffix.startswith(EXPERT_PREFIX):
                    expert, _, rest = suffix[len(EXPERT_PREFIX):].partition(".")
                    suffix = f"{EXPERT_PREFIX}{layer.mlp.local_expert_indices[int(expert)]}.{rest}"
                name = f"{LAYER_PREFIX}{layer.layer_number - 1}.{suffix}"
            named[name] = param
    return named


def canonical_order(name: str) -> tuple[int, int, str]:
    """Sort key putting parameters in HF checkpoint order: embedding, layers, norm, lm_head."""
    if name == EMBEDDING:
        return (0, 0, name)
    if name.startswith(LAYER_PREFIX):
        index, _, suffix = name[len(LAYER_PREFIX):].partition(".")
        return (1, int(index), suffix)
    return (2, 0 if name == FINAL_NORM else 1 if name == OUTPUT_LAYER else 2, name)


class HFTensorSource:
    """Reads named HF tensors one at a time from a folder of safetensors or a state dict."""

    def __init__(self, hf_dir_or_state_dict: str | Path | Mapping[str, torch.Tensor]):
        self._state_dict: Mapping[str, torch.Tensor] | None = None
        self._file_of: dict[str, Path] = {}
        self._handles: dict[Path, Any] = {}
        self._stack = contextlib.ExitStack()
        if isinstance(hf_dir_or_state_dict, Mapping):  # a transformers model's: experts under checkpoint names
            self._state_dict = per_expert_views(hf_dir_or_state_dict)
            return
        folder = Path(hf_dir_or_state_dict)
        if not folder.is_dir():
            raise HFCheckpointError(f"Hugging Face checkpoint folder {folder} does not exist")
        index = folder / "model.safetensors.index.json"
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            self._file_of = {name: folder / file for name, file in weight_map.items()}
        else:
            files = sorted(folder.glob("*.safetensors"))
            if not files:
                raise HFCheckpointError(
                    f"no *.safetensors in {folder}; megacredit loads safetensors checkpoints only "
                    f"(convert .bin files with transformers' save_pretrained(safe_serialization=True))"
                )
            for file in files:
                for name in self._open(file).keys():
                    self._file_of[name] = file

    def _open(self, file: Path):
        from safetensors import safe_open

        if file not in self._handles:
            try:
                handle = safe_open(str(file), framework="pt", device="cpu")
            except Exception as error:  # noqa: BLE001 - safetensors raises its own error types
                raise HFCheckpointError(f"cannot read the weights file {file}: {one_line(error)}") from error
            self._handles[file] = self._stack.enter_context(handle)
        return self._handles[file]

    def names(self) -> set[str]:
        """Every tensor name the source holds."""
        return set(self._state_dict.keys() if self._state_dict is not None else self._file_of)

    def get(self, name: str) -> torch.Tensor:
        """One tensor by HF name (KeyError naming it when absent)."""
        if self._state_dict is not None:
            if name not in self._state_dict:
                raise KeyError(f"Hugging Face tensor {name!r} missing from the given state dict")
            return self._state_dict[name]
        if name not in self._file_of:
            raise KeyError(f"Hugging Face tensor {name!r} missing from the checkpoint")
        return self._open(self._file_of[name]).get_tensor(name)

    def close(self) -> None:
        """Close the open safetensors files."""
        self._stack.close()
        self._handles.clear()

    def __enter__(self) -> "HFTensorSource":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def iter_local_shards(
    model_chunks: Sequence[torch.nn.Module],
    source: HFTensorSource,
    hf_config: Any,
    ctx: ParallelContext,
) -> Iterator[tuple[str, torch.nn.Parameter, torch.Tensor]]:
    """(global megatron name, parameter, this rank's slice from HF) for every local parameter."""
    shape = AttentionShape.from_hf(hf_config)
    tied = bool(getattr(hf_config, "tie_word_embeddings", False))
    params = global_named_parameters(model_chunks)
    for name in sorted(params, key=canonical_order):
        param = params[name]
        mapping = mapping_for(name, tied, hf_config.model_type)
        hf_tensors = [source.get(hf_name) for hf_name in mapping.hf_names]
        padded_vocab = param.shape[0] * ctx.tp_size
        shard = shard_for_rank(mapping, hf_tensors, ctx.tp_rank, ctx.tp_size, padded_vocab, shape)
        if tuple(shard.shape) != tuple(param.shape):
            raise ValueError(
                f"shape mismatch loading {name} (tp_rank {ctx.tp_rank}/{ctx.tp_size}) from "
                f"{list(mapping.hf_names)}: HF gives {tuple(shard.shape)}, the model expects "
                f"{tuple(param.shape)}; does the checkpoint match hf_config?"
            )
        yield name, param, shard


@torch.no_grad()
def load_hf_weights(
    model_chunks: torch.nn.Module | Sequence[torch.nn.Module],
    hf_dir_or_state_dict: str | Path | Mapping[str, torch.Tensor],
    hf_config: Any,
    ctx: ParallelContext,
) -> list[str]:
    """Copy HF weights into this rank's model chunks (in place, cast to each parameter's dtype).

    hf_dir_or_state_dict: a folder with ``*.safetensors`` (sharded with an index or not), or an
    in-memory HF state dict. Returns the global Megatron names loaded on this rank.
    """
    chunks = [model_chunks] if isinstance(model_chunks, torch.nn.Module) else list(model_chunks)
    loaded = []
    with HFTensorSource(hf_dir_or_state_dict) as source:
        for name, param, shard in iter_local_shards(chunks, source, hf_config, ctx):
            param.copy_(shard.to(device=param.device, dtype=param.dtype))
            loaded.append(name)
    return loaded
