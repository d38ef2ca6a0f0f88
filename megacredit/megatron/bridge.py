"""The Hugging Face <-> Megatron-Core weight bridge (public entry points).

- :func:`load_hf_weights`: HF safetensors (folder or state dict) -> any TP x PP layout.
- :func:`export_hf_weights` / :func:`iter_hf_weight_buckets`: a Megatron model (any layout) ->
  a stream of full HF tensors (per tensor or in bounded-size buckets), the path used to sync
  trained weights into the rollout engine every step. Collective: every rank iterates.
- :func:`export_plan` / :func:`hf_export_manifest`: what the export will yield (HF names and
  shapes), computed without moving data, to check an engine before a sync.
- :func:`save_hf_pretrained`: a folder ``transformers.AutoModelForCausalLM.from_pretrained``
  loads.

The name/layout mapping lives in :mod:`megacredit.megatron.hf_mapping`.
"""

from megacredit.megatron.bridge_export import (
    DEFAULT_BUCKET_BYTES,
    DEFAULT_MAX_SHARD_BYTES,
    RECEIVERS,
    ExportItem,
    export_hf_weights,
    export_plan,
    hf_export_manifest,
    iter_hf_weight_buckets,
    save_hf_pretrained,
)
from megacredit.megatron.bridge_load import (
    HFTensorSource,
    global_named_parameters,
    load_hf_weights,
    unwrap_model,
)

__all__ = [
    "DEFAULT_BUCKET_BYTES",
    "DEFAULT_MAX_SHARD_BYTES",
    "RECEIVERS",
    "ExportItem",
    "HFTensorSource",
    "export_hf_weights",
    "export_plan",
    "hf_export_manifest",
    "global_named_parameters",
    "iter_hf_weight_buckets",
    "load_hf_weights",
    "save_hf_pretrained",
    "unwrap_model",
]
