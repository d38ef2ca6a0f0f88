"""load_weights / update_weights_from_buckets of the embedded engine (tiny random models)."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from megacredit.models.tiny import TINY_FAMILIES, tiny_config
from megacredit.rollout.base import SamplingParams
from megacredit.rollout.embedded import EmbeddedRolloutEngine
from megacredit.rollout.expert_names import per_expert_views

PROMPTS = [[5, 6, 7, 8, 9], [10, 11], [12, 13, 14]]
GREEDY = SamplingParams(temperature=0, max_new_tokens=8, stop_token_ids=())


def tiny_model(family: str, seed: int, **overrides):
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(tiny_config(family, **overrides)).float().eval()


def streamed(model):
    """A one-pass generator of (hf_name, tensor) copies under checkpoint names, like the
    Megatron -> HF export (a MoE's fused experts as one tensor per expert)."""
    for name, tensor in per_expert_views(dict(model.named_parameters())).items():
        yield name, tensor.detach().clone()


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_loading_a_second_model_makes_outputs_equal_to_it(family):
    engine = EmbeddedRolloutEngine(tiny_model(family, seed=0))
    donor = tiny_model(family, seed=1)
    donor_engine = EmbeddedRolloutEngine(donor)
    before = engine.generate(PROMPTS, GREEDY)
    expected = donor_engine.generate(PROMPTS, GREEDY)
    assert [o.token_ids for o in before] != [o.token_ids for o in expected]

    pointers = {n: p.data_ptr() for n, p in engine.model.named_parameters()}
    report = engine.load_weights(streamed(donor))
    after = engine.generate(PROMPTS, GREEDY)

    assert [o.token_ids for o in after] == [o.token_ids for o in expected]
    torch.testing.assert_close(
        torch.tensor([lp for o in after for lp in o.logprobs]),
        torch.tensor([lp for o in expected for lp in o.logprobs]), atol=0, rtol=0)
    params = list(donor.parameters())
    assert report.num_tensors == len(per_expert_views(dict(donor.named_parameters())))
    assert report.num_bytes == sum(p.numel() * p.element_size() for p in params)
    assert report.missing_names == []
    # In place: no parameter was reallocated.
    assert {n: p.data_ptr() for n, p in engine.model.named_parameters()} == pointers


def test_buckets_and_dtype_cast():
    engine = EmbeddedRolloutEngine(tiny_model("qwen3", seed=0))
    donor = tiny_model("qwen3", seed=1)
    pairs = [(n, t.to(torch.bfloat16)) for n, t in streamed(donor)]
    buckets = [pairs[:5], dict(pairs[5:12]), pairs[12:]]
    report = engine.update_weights_from_buckets(iter(buckets))
    assert report.num_tensors == len(pairs)
    assert report.num_bytes == sum(t.numel() * 2 for _, t in pairs)
    for name, param in engine.model.named_parameters():
        assert param.dtype == torch.float32
        expected = dict(donor.named_parameters())[name].detach().to(torch.bfloat16).float()
        torch.testing.assert_close(param, expected, atol=0, rtol=0)


def test_tied_embeddings_without_lm_head():
    engine = EmbeddedRolloutEngine(tiny_model("llama", seed=0, tie_word_embeddings=True))
    donor = tiny_model("llama", seed=1, tie_word_embeddings=True)
    names = [n for n, _ in streamed(donor)]
    assert "lm_head.weight" not in names  # tied: the export has the embedding only
    report = engine.load_weights(streamed(donor))
    assert report.missing_names == []
    model = engine.model
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    torch.testing.assert_close(model.lm_head.weight, donor.model.embed_tokens.weight)
    expected = EmbeddedRolloutEngine(donor).generate(PROMPTS, GREEDY)
    assert [o.token_ids for o in engine.generate(PROMPTS, GREEDY)] == \
        [o.token_ids for o in expected]
    # An explicit lm_head.weight for a tied model is accepted and lands in the shared tensor.
    new_head = torch.randn_like(donor.lm_head.weight)
    engine.load_weights([("lm_head.weight", new_head)])
    torch.testing.assert_close(model.model.embed_tokens.weight, new_head, atol=0, rtol=0)


def test_partial_stream_reports_missing_untied_head():
    engine = EmbeddedRolloutEngine(tiny_model("qwen2", seed=0))
    donor = tiny_model("qwen2", seed=1)
    report = engine.load_weights((n, t) for n, t in streamed(donor) if n != "lm_head.weight")
    assert report.missing_names == ["lm_head.weight"]


def test_unknown_name_is_a_clear_error():
    engine = EmbeddedRolloutEngine(tiny_model("llama", seed=0))
    bad = torch.zeros(64, 64)
    with pytest.raises(KeyError, match=r"model\.layers\.0\.self_attn\.q_proj\.weight"):
        engine.load_weights([("model.layers.0.self_attn.q_proj.weights", bad)])
    with pytest.raises(KeyError, match="unknown tensor name 'decoder.layers.0.qkv.weight'"):
        engine.load_weights([("decoder.layers.0.qkv.weight", bad)])


def test_shape_mismatch_names_the_tensor():
    engine = EmbeddedRolloutEngine(tiny_model("llama", seed=0))
    before = engine.model.model.embed_tokens.weight.clone()
    padded_vocab = torch.zeros(128, 64)  # e.g. Megatron's TP vocab padding left in
    with pytest.raises(ValueError, match=r"'model\.embed_tokens\.weight' has shape \(128, 64\)"):
        engine.load_weights([("model.embed_tokens.weight", padded_vocab)])
    torch.testing.assert_close(engine.model.model.embed_tokens.weight, before)
