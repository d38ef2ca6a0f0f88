"""rollout.stop_at_newline: the stop ids are EOS plus exactly the tokens whose text holds a newline,
checked against how the real SmolLM2 tokenizer splits multi-line text."""

from megacredit.config import load_config
from megacredit.data.templates import stop_token_ids

MULTI_LINE = ["The answer is 68.\n\nExplanation: 14 + 54", "68\n", "Step 1:\n- add\r\n  then\n\n\n",
              "To add 14 and 46, we can do the usual arithmetic operations:\n\nConcept: \n- 14 + 46 = 60"]


def test_off_is_the_eos_alone(smollm2_tokenizer):
    assert stop_token_ids(smollm2_tokenizer, False) == (smollm2_tokenizer.eos_token_id,)


def test_on_stops_at_every_newline_token_and_no_other(smollm2_tokenizer):
    stops = set(stop_token_ids(smollm2_tokenizer, True))
    assert smollm2_tokenizer.eos_token_id in stops
    seen_newline = seen_other = 0
    for text in MULTI_LINE:
        for token in smollm2_tokenizer(text, add_special_tokens=False)["input_ids"]:
            has_newline = "\n" in smollm2_tokenizer.decode([token])
            assert (token in stops) == has_newline, (text, token, smollm2_tokenizer.decode([token]))
            seen_newline, seen_other = seen_newline + has_newline, seen_other + (not has_newline)
    assert seen_newline >= 5 and seen_other >= 20  # the texts exercise both kinds
    assert len(stops) < len(smollm2_tokenizer) // 100  # a stop rule, not most of the vocabulary


def test_the_cpu_task_config_turns_it_on():
    cfg = load_config("examples/credit_smollm2_arithmetic.yaml", [])
    assert cfg.rollout.stop_at_newline is True
    assert load_config("examples/credit_smollm2_arithmetic.yaml", ["rollout.stop_at_newline=false"]).rollout.stop_at_newline is False
