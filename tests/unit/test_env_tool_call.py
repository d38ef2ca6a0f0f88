"""ToolCallEnv: Action / Action Input parsing, comparison, appendix A.1 feedback format."""

import pytest

from megacredit.envs import make_env
from megacredit.envs.tool_call import ToolCallEnv, parse_tool_calls

RECORD = {"expected_calls": [{"name": "getRandomAxolotlImage", "arguments": "{}"}]}
SEARCH = {
    "expected_calls": [
        {"name": "searchAxolotlImages", "arguments": {"color": "wild", "size": "small"}},
        {"name": "searchAxolotlImages", "arguments": {"color": "wild", "size": "large"}},
    ]
}


def test_correct_response():
    result = ToolCallEnv().evaluate(RECORD, "Thought: random image\nAction: getRandomAxolotlImage\nAction Input: {}")
    assert result.reward == 1.0 and result.feedback == ""


def test_wrong_tool_feedback_matches_appendix():
    response = 'Thought: The user wants a random axolotl image…\nAction: searchAxolotlImages\nAction Input: {"color": "wild"}'
    result = ToolCallEnv().evaluate(RECORD, response)
    assert result.reward == 0.0
    assert result.feedback == "Actions mismatch: predicted [searchAxolotlImages], expected [getRandomAxolotlImage]"


def test_argument_mismatch_and_key_order_insensitivity():
    env = ToolCallEnv()
    reordered = (
        'Action: searchAxolotlImages\nAction Input: {"size": "large", "color": "wild"}\n'
        'Observation: ...\nAction: searchAxolotlImages\nAction Input: {\n  "size": "small",\n  "color": "wild"\n}'
    )
    assert env.evaluate(SEARCH, reordered).reward == 1.0  # multiset of calls, dict key order irrelevant
    assert ToolCallEnv(order_sensitive=True).evaluate(SEARCH, reordered).reward == 0.0
    wrong_args = 'Action: getRandomAxolotlImage\nAction Input: {"count": 2}'
    result = env.evaluate(RECORD, wrong_args)
    assert result.reward == 0.0
    assert result.feedback == 'Action inputs mismatch: predicted [{"count": 2}], expected [{}]'


def test_malformed_and_empty_responses():
    env = ToolCallEnv()
    missing_input = env.evaluate(RECORD, "Action: getRandomAxolotlImage\nThought: done")
    bad_json = env.evaluate(RECORD, "Action: getRandomAxolotlImage\nAction Input: {not json")
    empty = env.evaluate(RECORD, "")
    assert (missing_input.reward, bad_json.reward, empty.reward) == (0.0, 0.0, 0.0)
    assert bad_json.details["format_ok"] is False
    assert bad_json.feedback == "Action inputs mismatch: predicted [<invalid JSON>], expected [{}]"
    assert empty.feedback == "Actions mismatch: predicted [], expected [getRandomAxolotlImage]"


def test_parse_several_calls_with_nested_json():
    text = 'Action: a\nAction Input: {"x": {"y": [1, 2]}}\nAction: b\nAction Input: {}'
    calls = parse_tool_calls(text)
    assert [(c.name, c.arguments) for c in calls] == [("a", {"x": {"y": [1, 2]}}), ("b", {})]


def test_missing_expected_calls_is_a_clear_error():
    with pytest.raises(KeyError, match="expected_calls"):
        make_env("tool_call").evaluate({"prompt": "q"}, "Action: a\nAction Input: {}")
