"""Trust the engine, but check it: compare an engine's log-probs of a fixed probe with the
trainer's after a weight sync, and name the tensor that differs most when they disagree.

Megatron-free: the trainer computes its own log-probs of :func:`probe_token_ids` (its usual
forward pass) and hands them here with the engine. The check passes when the mean absolute
per-token difference is at most ``rollout.check_weight_sync_tolerance`` (CPU float32: about
1e-5; a wrong or stale tensor typically gives 0.1 to 10). On failure, if the engine can read
its weights back (``RolloutEngine.read_weights``), :func:`largest_weight_difference` compares
them with the trainer's export and the error names that tensor and its layer.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Sequence

import torch

from megacredit.rollout.base import NamedTensor

PROBE_TEXT = (
    "Weight sync probe. The quick brown fox jumps over the lazy dog; 12 + 30 = 42. "
    "def add(a, b):\n    return a + b\n"
)
"""Fixed text whose tokens every engine and the trainer score after a sync (plain prose, digits
and code, so most layers and a spread of vocabulary rows matter)."""


def probe_token_ids(tokenizer: Any, text: str = PROBE_TEXT) -> list[int]:
    """The probe sequence in ``tokenizer``'s ids (BOS first when the tokenizer has one)."""
    ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is not None:
        ids = [bos, *ids]
    if len(ids) < 2:
        raise ValueError("the weight-sync probe must have at least 2 tokens")
    return ids


@dataclass(frozen=True)
class ProbeComparison:
    """Engine vs trainer log-probs of the probe's tokens."""

    mean_abs_diff: float
    """Mean over the probe's tokens of |engine - trainer| (what the tolerance bounds)."""
    max_abs_diff: float
    """Largest per-token |engine - trainer|."""
    worst_position: int
    """Index in the probe of the token with the largest difference."""
    tolerance: float
    """The bound on ``mean_abs_diff``."""

    @property
    def ok(self) -> bool:
        return math.isfinite(self.mean_abs_diff) and self.mean_abs_diff <= self.tolerance


def compare_probe(engine_logprobs: Sequence[float], trainer_logprobs: Sequence[float],
                  tolerance: float) -> ProbeComparison:
    """Compare two equally long lists of per-token log-probs (a NaN counts as a failure)."""
    if len(engine_logprobs) != len(trainer_logprobs) or not engine_logprobs:
        raise ValueError(f"probe log-probs differ in length: engine {len(engine_logprobs)}, "
                         f"trainer {len(trainer_logprobs)}")
    diff = (torch.tensor(engine_logprobs, dtype=torch.float64)
            - torch.tensor(trainer_logprobs, dtype=torch.float64)).abs()
    diff = torch.nan_to_num(diff, nan=math.inf)
    worst = int(diff.argmax())
    return ProbeComparison(float(diff.mean()), float(diff[worst]), worst + 1, tolerance)


def largest_weight_difference(reference: Iterable[NamedTensor],
                              engine_weights: Mapping[str, torch.Tensor]) -> tuple[str, float] | None:
    """(HF name, max |difference|) of the tensor that differs most between the trainer's
    export (``reference``, streamed) and what the engine read back; only names both have
    count. None when nothing could be compared."""
    worst: tuple[str, float] | None = None
    for name, tensor in reference:
        theirs = engine_weights.get(name)
        if theirs is None or tuple(theirs.shape) != tuple(tensor.shape):
            continue
        value = float((theirs.detach().double().cpu() - tensor.detach().double().cpu()).abs().max())
        value = math.inf if math.isnan(value) else value
        if worst is None or value > worst[1]:
            worst = (name, value)
    return worst


def layer_of(hf_name: str) -> str:
    """'model.layers.12.mlp.down_proj.weight' -> 'layer 12'; embeddings / head / final norm by
    their role."""
    match = re.search(r"\.layers\.(\d+)\.", hf_name)
    if match:
        return f"layer {match.group(1)}"
    if "embed" in hf_name:
        return "the input embedding"
    if "lm_head" in hf_name:
        return "the LM head"
    return "the final norm" if "norm" in hf_name else "outside the decoder layers"


def sync_check_error(engine: str, comparison: ProbeComparison, sync_index: int,
                     worst: tuple[str, float] | None, readable: bool) -> str:
    """The message the run stops with."""
    text = (f"weight sync check failed after sync {sync_index} on {engine}: the engine's log-probs of "
            f"the probe differ from the trainer's by {comparison.mean_abs_diff:.4g} on average (max "
            f"{comparison.max_abs_diff:.4g} at token {comparison.worst_position}), above "
            f"rollout.check_weight_sync_tolerance={comparison.tolerance:g}. ")
    if worst is not None and worst[1] > 0:
        text += (f"Largest-differing tensor read back from the engine: '{worst[0]}' ({layer_of(worst[0])}), "
                 f"max |engine - trainer| = {worst[1]:.4g}. ")
    elif readable:
        text += ("Every tensor the engine could read back equals the trainer's; the difference comes "
                 "from the tensors it cannot read back or from its kernels (dtype?). ")
    else:
        text += "This engine cannot read its weights back, so the tensor cannot be named. "
    return text + ("Check the engine's model / dtype against the trainer's, or raise the tolerance "
                   "if the engine runs in a lower precision.")
