"""The SGLang adapter without SGLang (the main environment has none): request bodies, result
parsing, flattened buckets and their exact inverse, the checkpoint manifest (names the engine
accepts), and the colocated engine's call sequence against a fake ``sglang`` module that unpacks
the payloads the way SGLang's ModelRunner does, as SGLang 0.5.23 (update session) and 0.5.20
(none). The real SGLang 0.5.23 runs in tests/sglang_cpu/ (its own environment)."""

from __future__ import annotations

import base64
import dataclasses
import pickle
import sys
import types

import pytest
import torch

from megacredit.rollout import sglang as sglang_adapter
from megacredit.rollout.base import SamplingParams, manifest_of, request_seed
from megacredit.rollout.checkpoint_manifest import checkpoint_manifest
from megacredit.rollout.flat_buckets import FlatTensorMeta, flatten_tensors, split_by_dtype, unflatten_tensors


def _pairs():
    generator = torch.Generator().manual_seed(3)
    return [
        ("a", torch.randn(3, 5, generator=generator)),
        ("b", torch.randn(7, generator=generator).to(torch.bfloat16)),
        ("c", torch.randn(2, 2, 2, generator=generator)),
        ("d", torch.tensor(1.5)),  # 0-d
        ("e", torch.randn(4, 6, generator=generator).t()),  # not contiguous
    ]


def test_flatten_is_exactly_inverted_and_uses_sglangs_layout():
    for group in split_by_dtype(_pairs()):
        flat, metadata = flatten_tensors(group)
        # SGLang's FlattenedTensorBucket: torch.cat of the flattened tensors, in order
        assert torch.equal(flat, torch.cat([t.flatten() for _, t in group]))
        assert [(m.name, m.start_idx, m.end_idx, m.numel) for m in metadata][:1] == \
            [(group[0][0], 0, group[0][1].numel(), group[0][1].numel())]
        back = unflatten_tensors(flat, metadata)
        assert [n for n, _ in back] == [n for n, _ in group]
        for (_, got), (_, original) in zip(back, group):
            assert got.dtype == original.dtype and got.shape == original.shape and torch.equal(got, original)


def test_flatten_refuses_mixed_dtypes_and_bad_metadata():
    assert [[n for n, _ in g] for g in split_by_dtype(_pairs())] == [["a", "c", "d", "e"], ["b"]]
    with pytest.raises(ValueError, match="split_by_dtype"):
        flatten_tensors(_pairs())
    with pytest.raises(ValueError, match="empty"):
        flatten_tensors([])
    flat, metadata = flatten_tensors(split_by_dtype(_pairs())[0])
    with pytest.raises(ValueError, match="covers"):
        unflatten_tensors(flat[:-1], metadata)


def test_generate_request_expands_samples_with_split_independent_seeds():
    params = SamplingParams(temperature=0.0, max_new_tokens=4, n=2, seed=9, seed_offset=3)
    body = sglang_adapter.generate_request([[1, 2], [3]], params)
    assert body["input_ids"] == [[1, 2], [1, 2], [3], [3]] and body["return_logprob"] is True
    assert [s["sampling_seed"] for s in body["sampling_params"]] == [request_seed(9, row) for row in (6, 7, 8, 9)]
    assert body["sampling_params"][0]["temperature"] == 0.0  # SGLang: temperature 0 is greedy
    assert "sampling_seed" not in sglang_adapter.generate_request([[1]], SamplingParams())["sampling_params"][0]
    # the second prompt sent alone with seed_offset + 1 gets the same seeds
    alone = sglang_adapter.generate_request([[3]], dataclasses.replace(params, seed_offset=4))
    assert alone["sampling_params"] == body["sampling_params"][2:]


def test_parse_generate_results_checks_counts_and_ids():
    good = {"output_ids": [4, 2], "meta_info": {"finish_reason": {"type": "stop", "matched": 2},
                                                 "output_token_logprobs": [[-0.1, 4, None], [-0.2, 2, None]]}}
    out = sglang_adapter.parse_generate_results([good, good], [[7]], n=2)
    assert [o.prompt_index for o in out] == [0, 0] and out[1].token_ids == [4, 2]
    with pytest.raises(RuntimeError, match="returned 1 results for 2"):
        sglang_adapter.parse_generate_results([good], [[7]], n=2)
    bad = {**good, "output_ids": [4]}
    with pytest.raises(RuntimeError, match="disagree"):
        sglang_adapter.parse_generate_results([bad], [[7]], n=1)


def test_score_request_and_parsing():
    body = sglang_adapter.score_request([[5, 6, 7]])
    assert body == {"input_ids": [[5, 6, 7]], "return_logprob": True, "logprob_start_len": 0,
                    "sampling_params": {"max_new_tokens": 0, "temperature": 1.0, "top_p": 1.0, "top_k": -1}}
    result = {"meta_info": {"input_token_logprobs": [[None, 5, None], [-0.5, 6, None], [-1.5, 7, None]]}}
    assert sglang_adapter.parse_score_results([result], [[5, 6, 7]]) == [[-0.5, -1.5]]
    with pytest.raises(RuntimeError, match="not the 3"):
        sglang_adapter.parse_score_results([result], [[5, 6, 8]])
    with pytest.raises(ValueError, match=">= 2 tokens"):
        sglang_adapter.score_request([[5]])


@pytest.mark.parametrize("tied", [False, True])
def test_checkpoint_manifest_lists_the_names_the_engine_loads(tmp_path, tied):
    from transformers import AutoModelForCausalLM

    from megacredit.models.tiny import tiny_config

    model = AutoModelForCausalLM.from_config(tiny_config("qwen3", tie_word_embeddings=tied))
    model.save_pretrained(tmp_path, max_shard_size="50KB")  # sharded: an index + several files
    assert (tmp_path / "model.safetensors.index.json").is_file()
    manifest = checkpoint_manifest(tmp_path)
    expected = {n: tuple(t.shape) for n, t in model.state_dict().items()}
    if tied:
        expected.pop("lm_head.weight")
    assert manifest == expected
    with pytest.raises(FileNotFoundError, match="safetensors"):
        checkpoint_manifest(tmp_path / "missing")


# ---------------------------------------------------------------- colocated engine, faked
@dataclasses.dataclass(frozen=True)
class _FakeMetadata(FlatTensorMeta):
    """Stands for SGLang's FlattenedTensorMetadata (same fields), a type of its own so the test
    sees that the adapter builds SGLang's class, not megacredit's."""


class _FakeSerializer:
    @staticmethod
    def serialize(obj, output_str=False):
        data = pickle.dumps(obj)
        return base64.b64encode(data).decode() if output_str else data


class _FakeEngine:
    """Records calls; unpacks update payloads like ModelRunner._update_weights_from_flattened_bucket."""

    def __init__(self, **kwargs):
        self.kwargs, self.calls, self.weights = kwargs, [], {}

    def update_weights_from_tensor(self, named_tensors, load_format=None, flush_cache=True):
        self.calls.append(("update", len(named_tensors), load_format, flush_cache))
        if load_format == "flattened_bucket":
            data = pickle.loads(base64.b64decode(named_tensors[0]))
            flat = data["flattened_tensor"]
            for meta in data["metadata"]:
                assert type(meta) is _FakeMetadata
                self.weights[meta.name] = flat[meta.start_idx:meta.end_idx].reshape(meta.shape).clone()
        else:
            self.weights.update({n: t.clone() for n, t in named_tensors})
        return True, "Success"

    def flush_cache(self):
        self.calls.append(("flush",))
        return types.SimpleNamespace(success=True)

    def begin_weight_update(self):
        self.calls.append(("begin",))
        return True, "Success"

    def end_weight_update(self):
        self.calls.append(("end",))
        return True, "Success"

    def generate(self, **body):
        self.calls.append(("generate", body))
        if body["sampling_params"] and isinstance(body["sampling_params"], dict):
            return [{"meta_info": {"input_token_logprobs": [[None, s[0], None]] + [[-1.0, t, None] for t in s[1:]]}}
                    for s in body["input_ids"]]
        return [{"meta_info": {"finish_reason": {"type": "length"}, "output_token_logprobs": [[-0.3, 9, None]]}}
                for _ in body["input_ids"]]

    def release_memory_occupation(self):
        self.calls.append(("release",))

    def resume_memory_occupation(self):
        self.calls.append(("resume",))

    def shutdown(self):
        self.calls.append(("shutdown",))


class _FakeEngine0520(_FakeEngine):
    """SGLang 0.5.20: no update session."""

    begin_weight_update = end_weight_update = None


@pytest.fixture(params=["0.5.23", "0.5.20"])
def fake_sglang(monkeypatch, request):
    modules = {name: types.ModuleType(name) for name in
               ("sglang", "sglang.srt", "sglang.srt.utils", "sglang.srt.weight_sync",
                "sglang.srt.weight_sync.tensor_bucket")}
    modules["sglang"].Engine = _FakeEngine if request.param == "0.5.23" else _FakeEngine0520
    modules["sglang"].fake_version = request.param
    modules["sglang.srt.utils"].MultiprocessingSerializer = _FakeSerializer
    modules["sglang.srt.weight_sync.tensor_bucket"].FlattenedTensorMetadata = _FakeMetadata
    for name, module in modules.items():
        monkeypatch.setitem(sys.modules, name, module)
    monkeypatch.setenv("SGLANG_RETURN_ORIGINAL_LOGPROB", "unset")  # restored after the test
    monkeypatch.delenv("SGLANG_RETURN_ORIGINAL_LOGPROB")
    return modules


def _checkpoint(tmp_path, pairs):
    from safetensors.torch import save_file

    save_file({n: t.contiguous() for n, t in pairs}, str(tmp_path / "model.safetensors"))
    return tmp_path


@pytest.mark.parametrize("flatten", [True, False])
def test_colocated_update_sequence_and_exact_weights(fake_sglang, tmp_path, flatten):
    import os

    pairs = _pairs()
    engine = sglang_adapter.SGLangRolloutEngine(_checkpoint(tmp_path, pairs), tp_size=2, flatten=flatten,
                                                memory_saver=True)
    assert engine.engine.kwargs["tp_size"] == 2 and engine.engine.kwargs["enable_memory_saver"] is True
    assert "SGLANG_RETURN_ORIGINAL_LOGPROB" not in os.environ
    report = engine.update_weights_from_buckets([pairs[:2], pairs[2:]], manifest_of(pairs))
    assert report.num_tensors == 5
    expected_format = "flattened_bucket" if flatten else None
    payloads = 2 if flatten else None  # one serialized payload per TP rank
    calls = [c for c in engine.engine.calls if c[0] not in ("begin", "end")]
    assert [c[0] for c in calls] == ["update", "update", "update", "flush"]  # bucket 1 is fp32 + bf16
    session = [c[0] for c in engine.engine.calls if c[0] in ("begin", "end")]
    assert session == (["begin", "end"] if fake_sglang["sglang"].fake_version == "0.5.23" else [])
    if session:  # the updates sit inside the session, the flush after it
        assert engine.engine.calls[0] == ("begin",) and engine.engine.calls[-2:] == [("end",), ("flush",)]
    assert all(c[2] == expected_format and c[3] is False for c in calls[:3])
    if flatten:
        assert all(c[1] == payloads for c in calls[:3])
    for name, tensor in pairs:
        got = engine.engine.weights[name]
        assert got.dtype == tensor.dtype and torch.equal(got, tensor), name


def test_colocated_refuses_a_wrong_shape_before_any_call(fake_sglang, tmp_path):
    pairs = _pairs()
    engine = sglang_adapter.SGLangRolloutEngine(_checkpoint(tmp_path, pairs))
    wrong = pairs[:-1] + [("e", torch.zeros(6, 5))]
    with pytest.raises(ValueError, match="Nothing was copied"):
        engine.update_weights_from_buckets([wrong], manifest_of(wrong))
    assert engine.engine.calls == []


def test_a_refused_colocated_update_closes_the_session_and_names_sglangs_message(fake_sglang, tmp_path):
    from megacredit.rollout.base import WeightSyncError

    pairs = _pairs()
    engine = sglang_adapter.SGLangRolloutEngine(_checkpoint(tmp_path, pairs))
    engine.engine.update_weights_from_tensor = lambda *a, **k: (False, "must run between begin and end")
    with pytest.raises(WeightSyncError, match="must run between begin and end; nothing of this update"):
        engine.update_weights_from_buckets([pairs], manifest_of(pairs))
    expected = ["begin", "end"] if fake_sglang["sglang"].fake_version == "0.5.23" else []
    assert [c[0] for c in engine.engine.calls] == expected  # closed, and no flush


def test_colocated_generate_score_sleep_wake_shutdown(fake_sglang, tmp_path):
    engine = sglang_adapter.SGLangRolloutEngine(_checkpoint(tmp_path, _pairs()), memory_saver=True)
    out = engine.generate([[1, 2]], SamplingParams(max_new_tokens=1, n=3))
    assert len(out) == 3 and out[0].token_ids == [9] and out[0].logprobs == [-0.3]
    assert engine.score_logprobs([[4, 5, 6]]) == [[-1.0, -1.0]]
    engine.wake()  # never slept: nothing to resume (SGLang's resume would fail)
    engine.sleep()
    engine.wake()
    engine.shutdown()
    engine.shutdown()
    assert [c[0] for c in engine.engine.calls] == ["generate", "generate", "release", "resume", "shutdown"]


def test_a_failed_update_answer_raises_a_sync_error():
    from megacredit.rollout.base import WeightSyncError

    sglang_adapter.check_answer((True, "Success"), "x", 0)
    sglang_adapter.check_answer({"success": True}, "x", 0)
    with pytest.raises(WeightSyncError, match="mix of old and new"):
        sglang_adapter.check_answer((False, "Failed to update parameter online"), "update", 3)
    with pytest.raises(WeightSyncError, match="keeps its previous weights"):
        sglang_adapter.check_answer({"success": False, "message": "no session"}, "update", 0)
    with pytest.raises(WeightSyncError, match="boom"):
        sglang_adapter.check_answer(types.SimpleNamespace(success=False, message="boom"), "flush", 0)


def test_an_environment_asking_for_temperature_one_logprobs_is_refused():
    """SGLANG_RETURN_ORIGINAL_LOGPROB=1 would make SGLang return log-probs before temperature,
    not of the distribution it samples; the engine's environment refuses it in one line."""
    with pytest.raises(ValueError, match="SGLANG_RETURN_ORIGINAL_LOGPROB is set.*unset it"):
        sglang_adapter.sglang_environment({"SGLANG_RETURN_ORIGINAL_LOGPROB": "1"})
    assert "SGLANG_RETURN_ORIGINAL_LOGPROB" not in sglang_adapter.sglang_environment({})
