"""Megatron-Core (built by megacredit's provider, loaded by the bridge) == Hugging Face.

Reference: transformers' own model on tiny random Llama (also with Llama-3 RoPE scaling) / Qwen2 /
Qwen3 / OLMo-3 configs (4 layers,
hidden 64, 4 query / 2 KV heads, vocab 101 so TP=2 needs padding rows), every parameter
perturbed so that norms and biases are not at their trivial init. OLMo-3: layers 1-3 attend in a
sliding window of 4 (the inputs are 9 tokens long), layer 4 fully; "olmo3_yarn" adds YaRN RoPE on
the full-attention layer only, as the released OLMo-3 7B has (test_olmo3_features_change_the_logits
shows that both features change transformers' logits, so the parity below can fail).

Checks, for TP=1 (DP=2), TP=2 and PP=2 on 2 gloo processes:
- logits (full vocabulary, padding stripped) equal HF's within 1e-4 (fp32);
- export(load(hf)) == the HF state dict bitwise, buckets respect their byte bound;
- save_hf_pretrained writes a folder transformers reloads with the same logits.

Cost control: ONE spawned 2-process run (module fixture) does every layout and family
(importing Megatron costs ~10 s per process); the tests then compare its results.
"""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from megacredit.utils.spawn import run_distributed
from megatron_test_helpers import each_loaded_model, perturbed_hf_model

pytestmark = pytest.mark.distributed

LOGITS_ATOL = 1e-4
# OLMo-3 7B's RoPE (its config.json: YaRN factor 8 on the full-attention layers, default RoPE on the
# sliding ones), at a context of 16 extended to 128.
OLMO3_YARN = {
    "full_attention": dict(rope_type="yarn", rope_theta=10000.0, factor=8.0, original_max_position_embeddings=16,
                           beta_fast=32.0, beta_slow=1.0),
    "sliding_attention": dict(rope_type="default", rope_theta=10000.0),
}
LAYOUTS = {"tp1": (1, 1), "tp2": (2, 1), "pp2": (1, 2)}
MODELS = {
    "llama": dict(family="llama"),
    "llama_tied": dict(family="llama", tie_word_embeddings=True),
    "qwen2": dict(family="qwen2"),
    "qwen3_tied": dict(family="qwen3", tie_word_embeddings=True),
    # Llama 3.1-style RoPE scaling: with head_dim 16 and theta 1e4 the lowest frequencies have
    # wavelengths above 8192 / low_freq_factor, so the scaling visibly changes the logits.
    "llama3_rope": dict(
        family="llama", max_position_embeddings=16384,
        rope_parameters=dict(rope_type="llama3", rope_theta=10000.0, factor=8.0, low_freq_factor=1.0,
                             high_freq_factor=4.0, original_max_position_embeddings=8192),
    ),
    "olmo3": dict(family="olmo3"),
    "olmo3_yarn": dict(family="olmo3", max_position_embeddings=128, rope_parameters=OLMO3_YARN),
}
BUCKET_BYTES = 3 * 64 * 64 * 4  # three hidden x hidden fp32 matrices
SHARD_BYTES = 200_000  # forces a multi-file (indexed) checkpoint


def _input_ids(vocab_size: int) -> torch.Tensor:
    return torch.randint(0, vocab_size, (2, 9), generator=torch.Generator().manual_seed(7))


def _random_hf_model(model_key: str):
    options = dict(MODELS[model_key])
    return perturbed_hf_model(options.pop("family"), sum(map(ord, model_key)), num_layers=4, **options)


def _run_all_layouts(rank, world_size, hf_dirs, save_root):
    from megacredit.megatron.bridge import iter_hf_weight_buckets, save_hf_pretrained
    from megatron_probes import pipeline_forward_logits

    results = {}
    for layout, model_key, ctx, hf_config, model in each_loaded_model(LAYOUTS, hf_dirs):
        logits = pipeline_forward_logits([model], _input_ids(hf_config.vocab_size))
        buckets = list(iter_hf_weight_buckets([model], hf_config, ctx, BUCKET_BYTES))
        everywhere = list(iter_hf_weight_buckets([model], hf_config, ctx, BUCKET_BYTES, receivers="all"))
        out_dir = f"{save_root}/{layout}_{model_key}"
        save_hf_pretrained([model], hf_config, ctx, out_dir, tokenizer_dir=hf_dirs[model_key], max_shard_bytes=SHARD_BYTES)
        results[layout, model_key] = dict(
            logits=logits, buckets=buckets, everywhere=everywhere, saved=out_dir,
            padded_vocab=model.vocab_size,
        )
    return results


@pytest.fixture(scope="module")
def parity_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("parity")
    hf_models, hf_dirs = {}, {}
    for model_key in MODELS:
        hf_models[model_key] = _random_hf_model(model_key)
        hf_dirs[model_key] = str(root / f"hf_{model_key}")
        hf_models[model_key].save_pretrained(hf_dirs[model_key])
        (root / f"hf_{model_key}" / "tokenizer_config.json").write_text(json.dumps({"marker": model_key}))
    per_rank = run_distributed(_run_all_layouts, world_size=2, hf_dirs=hf_dirs, save_root=str(root / "saved"))
    return hf_models, per_rank


def _hf_logits(model, vocab_size: int) -> torch.Tensor:
    with torch.no_grad():
        return model(_input_ids(vocab_size)).logits


@pytest.mark.parametrize("model_key", list(MODELS))
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_logits_equal_transformers(parity_run, layout, model_key):
    hf_models, per_rank = parity_run
    reference = _hf_logits(hf_models[model_key], 101)
    last_stage_ranks = [1] if layout == "pp2" else [0, 1]  # PP=2: rank 1 is the last stage
    for rank in last_stage_ranks:
        logits = per_rank[rank][layout, model_key]["logits"]
        assert logits.shape == reference.shape  # padding columns stripped
        torch.testing.assert_close(logits, reference, rtol=0, atol=LOGITS_ATOL)
    if layout == "pp2":
        assert per_rank[0][layout, model_key]["logits"] is None
    if layout == "tp2":
        assert per_rank[0][layout, model_key]["padded_vocab"] == 256  # 101 -> multiple of 128 * 2


def _expected_state_dict(model) -> dict[str, torch.Tensor]:
    state = model.state_dict()
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    return state


@pytest.mark.parametrize("model_key", list(MODELS))
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_export_of_load_is_bitwise_identical(parity_run, layout, model_key):
    hf_models, per_rank = parity_run
    expected = _expected_state_dict(hf_models[model_key])
    result = per_rank[0][layout, model_key]
    exported = [pair for bucket in result["buckets"] for pair in bucket]
    names = [name for name, _ in exported]
    assert len(names) == len(set(names))
    assert set(names) == set(expected)
    for name, tensor in exported:
        assert tensor.dtype == expected[name].dtype and torch.equal(tensor, expected[name]), name
    # rank 0 alone receives by default; with receivers="all" rank 1 gets the same stream.
    assert per_rank[1][layout, model_key]["buckets"] == []
    for rank in (0, 1):
        again = [pair for bucket in per_rank[rank][layout, model_key]["everywhere"] for pair in bucket]
        assert [n for n, _ in again] == names
        assert all(torch.equal(t, expected[n]) for n, t in again)


def test_buckets_respect_the_byte_bound(parity_run):
    _, per_rank = parity_run
    buckets = per_rank[0]["tp2", "qwen2"]["buckets"]
    assert len(buckets) > 1
    for bucket in buckets:
        size = sum(t.numel() * t.element_size() for _, t in bucket)
        assert size <= BUCKET_BYTES or len(bucket) == 1, [n for n, _ in bucket]


@pytest.mark.parametrize("layout", ["tp2", "pp2"])
@pytest.mark.parametrize("model_key", ["llama_tied", "qwen2", "olmo3_yarn"])
def test_saved_folder_reloads_in_transformers(parity_run, layout, model_key):
    hf_models, per_rank = parity_run
    saved = per_rank[0][layout, model_key]["saved"]
    index = json.loads(open(f"{saved}/model.safetensors.index.json").read())
    assert len(set(index["weight_map"].values())) > 1  # SHARD_BYTES forced several files
    assert json.loads(open(f"{saved}/tokenizer_config.json").read()) == {"marker": model_key}
    reloaded = AutoModelForCausalLM.from_pretrained(saved, dtype=torch.float32).eval()
    torch.testing.assert_close(
        _hf_logits(reloaded, 101), _hf_logits(hf_models[model_key], 101), rtol=0, atol=0
    )


def _olmo3_with(state: dict, **config) -> torch.nn.Module:
    from megacredit.models.tiny import tiny_config

    model = AutoModelForCausalLM.from_config(tiny_config("olmo3", vocab_size=101, num_hidden_layers=4, **config))
    model.load_state_dict(state)
    return model.float().eval()


def test_olmo3_features_change_the_logits(parity_run):
    """The sliding window and the per-layer-type YaRN both change transformers' own logits on these
    inputs, so the parity above would catch a Megatron model that ignored either."""
    hf_models, _ = parity_run
    no_window = _olmo3_with(hf_models["olmo3"].state_dict(), layer_types=["full_attention"] * 4)
    assert (_hf_logits(no_window, 101) - _hf_logits(hf_models["olmo3"], 101)).abs().max() > 100 * LOGITS_ATOL
    no_yarn = _olmo3_with(hf_models["olmo3_yarn"].state_dict(), max_position_embeddings=128)
    assert (_hf_logits(no_yarn, 101) - _hf_logits(hf_models["olmo3_yarn"], 101)).abs().max() > 100 * LOGITS_ATOL
