"""Tool-call environment (ToolAlpaca-style), CREDIT appendix A.1.

The student answers in the ReAct format of the ToolAlpaca prompt::

    Thought: ...
    Action: getRandomAxolotlImage
    Action Input: {}

possibly with several Action / Action Input pairs. Each predicted call (tool name + JSON
arguments parsed into Python objects, so key order and whitespace do not matter) is compared
with ``record['expected_calls']`` = ``[{"name": str, "arguments": dict}, ...]``.

Feedback, as in appendix A.1 (ToolAlpaca self-teacher context)::

    Actions mismatch: predicted [searchAxolotlImages], expected [getRandomAxolotlImage]

and, when the arguments do not match (the second message of the upstream SDPO scorer,
lasgroup/SDPO ``verl/utils/reward_score/feedback/tooluse.py::compute_score``, same ``; ``
separator)::

    Action inputs mismatch: predicted [{"color": "wild"}], expected [{}]

CHOICE (documented): calls are compared as a multiset by default (``order_sensitive=False``),
like the SDPO scorer's ``Counter`` on names; unlike that scorer, arguments are compared per call
rather than merged into one dict across calls. A response with an ``Action:`` whose ``Action
Input`` is missing or is not valid JSON scores 0 and the details say so.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from megacredit.envs.base import EnvResult, Environment, Split

_ACTION = re.compile(r"^[ \t]*Action[ \t]*:[ \t]*(.*?)[ \t]*$", re.MULTILINE)
_ACTION_INPUT = re.compile(r"Action[ \t]+Input[ \t]*:[ \t]*", re.MULTILINE)


@dataclass
class ToolCall:
    """One parsed or expected tool call."""

    name: str
    """Tool (function) name, e.g. ``getRandomAxolotlImage``."""
    arguments: Any
    """Parsed JSON arguments (normally a dict); None when the Action Input was missing/invalid."""
    arguments_valid: bool = True
    """False when the Action Input was missing or not valid JSON."""

    def canonical(self) -> str:
        """Order-insensitive text key: name + JSON with sorted keys."""
        return self.name + "\x00" + json.dumps(self.arguments, sort_keys=True, ensure_ascii=False)


def parse_tool_calls(response: str) -> list[ToolCall]:
    """Parse every ``Action:`` line and the JSON value after the following ``Action Input:``.

    The JSON value may span several lines (it is read with ``json.JSONDecoder.raw_decode``).
    An ``Action Input`` belongs to the closest preceding ``Action`` line.
    """
    decoder = json.JSONDecoder()
    actions = list(_ACTION.finditer(response))
    calls: list[ToolCall] = []
    for index, match in enumerate(actions):
        name = match.group(1).strip().strip("`*\"' ")
        end = actions[index + 1].start() if index + 1 < len(actions) else len(response)
        input_match = _ACTION_INPUT.search(response, match.end(), end)
        if input_match is None:
            calls.append(ToolCall(name=name, arguments=None, arguments_valid=False))
            continue
        text = response[input_match.end():end].lstrip().strip("`")
        try:
            arguments, _ = decoder.raw_decode(text.lstrip())
        except json.JSONDecodeError:
            calls.append(ToolCall(name=name, arguments=None, arguments_valid=False))
            continue
        calls.append(ToolCall(name=name, arguments=arguments))
    return calls


def expected_calls_from_record(record: dict[str, Any]) -> list[ToolCall]:
    """Read ``record['expected_calls']``; arguments given as JSON strings are parsed."""
    raw = record.get("expected_calls")
    if not isinstance(raw, list) or not raw:
        raise KeyError(
            "ToolCallEnv needs record['expected_calls'] = a non-empty list of "
            "{'name': str, 'arguments': dict}; got " + repr(raw)[:200]
        )
    calls = []
    for position, item in enumerate(raw):
        if not isinstance(item, dict) or "name" not in item:
            raise ValueError(f"record['expected_calls'][{position}] must be a dict with 'name' and 'arguments'")
        arguments = item.get("arguments", {})
        if isinstance(arguments, str):
            arguments = json.loads(arguments) if arguments.strip() else {}
        calls.append(ToolCall(name=str(item["name"]), arguments=arguments))
    return calls


def _format_names(calls: list[ToolCall]) -> str:
    return "[" + ", ".join(call.name for call in calls) + "]"


def _format_arguments(calls: list[ToolCall]) -> str:
    parts = [json.dumps(c.arguments, ensure_ascii=False) if c.arguments_valid else "<invalid JSON>" for c in calls]
    return "[" + ", ".join(parts) + "]"


def tool_call_feedback(predicted: list[ToolCall], expected: list[ToolCall], order_sensitive: bool = False) -> str:
    """Feedback z in the appendix A.1 format; "" when the calls match."""
    predicted_names = [c.name for c in predicted]
    expected_names = [c.name for c in expected]
    if not order_sensitive:
        predicted_names, expected_names = sorted(predicted_names), sorted(expected_names)
    parts = []
    if predicted_names != expected_names:
        parts.append(f"Actions mismatch: predicted {_format_names(predicted)}, expected {_format_names(expected)}")
    elif not calls_match(predicted, expected, order_sensitive):
        parts.append(
            f"Action inputs mismatch: predicted {_format_arguments(predicted)}, expected {_format_arguments(expected)}"
        )
    return "; ".join(parts)


def calls_match(predicted: list[ToolCall], expected: list[ToolCall], order_sensitive: bool = False) -> bool:
    """True iff names and parsed arguments agree call by call (as multisets unless order_sensitive)."""
    if any(not c.arguments_valid for c in predicted):
        return False
    predicted_keys = [c.canonical() for c in predicted]
    expected_keys = [c.canonical() for c in expected]
    if not order_sensitive:
        predicted_keys, expected_keys = sorted(predicted_keys), sorted(expected_keys)
    return predicted_keys == expected_keys


class ToolCallEnv(Environment):
    """Reward 1 iff the predicted tool calls equal ``record['expected_calls']``, else 0."""

    name = "tool_call"

    def __init__(self, order_sensitive: bool = False) -> None:
        # order_sensitive: compare the call sequences in order instead of as multisets.
        self.order_sensitive = order_sensitive

    def evaluate(self, record: dict[str, Any], response: str, split: Split = "train") -> EnvResult:
        expected = expected_calls_from_record(record)
        predicted = parse_tool_calls(response or "")
        correct = calls_match(predicted, expected, self.order_sensitive)
        feedback = "" if correct else tool_call_feedback(predicted, expected, self.order_sensitive)
        return EnvResult(
            reward=1.0 if correct else 0.0,
            feedback=feedback,
            details={
                "predicted_calls": [{"name": c.name, "arguments": c.arguments} for c in predicted],
                "expected_calls": [{"name": c.name, "arguments": c.arguments} for c in expected],
                "format_ok": bool(predicted) and all(c.arguments_valid for c in predicted),
            },
        )
