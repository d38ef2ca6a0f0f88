"""ToolAlpaca loader (native `tangqiaoyu/ToolAlpaca` JSON layout), offline.

A native file is a JSON list of APIs. Each API has ``Name``, ``Description``,
``NLDocumentation`` (or ``Function_Description``: name -> text) and either
- ``Instances`` (train_data.json): ``[{"input", "output", "Final Answer"?, "intermediate_steps":
  [[[action, action_input, thought_log], observation], ...]}]``, or
- ``Instructions`` + ``Golden_Answers`` (eval_simulated.json / eval_real.json):
  ``Golden_Answers[i] = [{"Action", "Action_Input"}, ...]``.

These files are read with the stdlib ``json`` module, not `datasets`: ``intermediate_steps``
mixes lists and strings in one list, which Arrow cannot type. Each instance/instruction becomes
one record; a "row" in errors is the API's 1-based position in the file, and the field names the
instance, e.g. ``Instances[2].intermediate_steps``.

Record produced (consumed by ToolCallEnv): ``id`` (``"{api}/{kind}/{index}"``),
``task='tool_call'``, ``prompt`` (the ToolAlpaca ReAct prompt used by SDPO/CREDIT, appendix
A.1), ``system=None``, ``api_name``, ``question``, ``expected_calls`` (``[{"name", "arguments"}]``),
``source_kind`` (``'instances'`` or ``'golden'``), ``reference_answer`` (the expected calls as
``Action: ...`` / ``Action Input: ...`` lines, for RLSD).

The 4046/68 split (CREDIT appendix A, "standard ToolAlpaca split", via lasgroup/SDPO's
``datasets/tooluse/{train,test}.json``): SDPO's test rows are ``idx`` 4046..4113, 68 questions
of the simulated evaluation APIs (tangqiaoyu/ToolAlpaca ``data/eval_simulated.json`` has 100
instructions over 10 APIs; the filter that dropped 32 is not published). :func:`split_toolalpaca` therefore takes the split file (a list of
``{"api_name", "question"}``, or SDPO's own test.json whose ``prompt`` holds both) for an exact
reproduction, and otherwise applies a seeded rule: train = all ``Instances`` records, test =
``num_test`` golden records drawn with ``random.Random(seed)``.
"""

from __future__ import annotations

import json
import os
import random
from typing import Any, Iterable

from megacredit.data.common import DatasetRowError, LoadedDataset, normalise_rows, require
from megacredit.data.templates import toolalpaca_prompt

IGNORED_TOOLS = ("getDetails",)
"""ToolAlpaca's meta tool (documentation lookup), not one of the API's functions: dropped."""


def _documentation(api: dict[str, Any], path: str, row: int) -> str:
    if isinstance(api.get("NLDocumentation"), str) and api["NLDocumentation"].strip():
        return api["NLDocumentation"]
    functions = api.get("Function_Description")
    if isinstance(functions, dict) and functions:
        return "".join(f"{name}: {text}\n" for name, text in functions.items() if name != "components")
    raise DatasetRowError(path, row, "NLDocumentation", "missing; need NLDocumentation or Function_Description")


def _parse_arguments(value: Any, path: str, row: int, field_name: str) -> Any:
    if isinstance(value, (dict, list)):
        return value
    if not isinstance(value, str):
        raise DatasetRowError(path, row, field_name, f"action input must be a JSON string, got {type(value).__name__}")
    if not value.strip():
        return {}
    try:
        return json.loads(value)
    except json.JSONDecodeError as error:
        raise DatasetRowError(path, row, field_name, f"action input is not valid JSON ({error.msg})") from None


def _calls_from_steps(steps: Any, path: str, row: int, field_name: str) -> list[dict[str, Any]]:
    if not isinstance(steps, list) or not steps:
        raise DatasetRowError(path, row, field_name, "needs a non-empty list of [[action, action_input, log], observation]")
    calls = []
    for position, step in enumerate(steps):
        where = f"{field_name}[{position}]"
        if not (isinstance(step, list) and step and isinstance(step[0], list) and len(step[0]) >= 2):
            raise DatasetRowError(path, row, where, "expected [[action, action_input, log], observation]")
        name = step[0][0]
        if not isinstance(name, str) or not name.strip():
            raise DatasetRowError(path, row, where, "action name must be a non-empty string")
        if name in IGNORED_TOOLS:
            continue
        calls.append({"name": name.strip(), "arguments": _parse_arguments(step[0][1], path, row, where)})
    if not calls:
        raise DatasetRowError(path, row, field_name, f"no tool call left after dropping {IGNORED_TOOLS}")
    return calls


def _calls_from_golden(answer: Any, path: str, row: int, field_name: str) -> list[dict[str, Any]]:
    if not isinstance(answer, list) or not answer:
        raise DatasetRowError(path, row, field_name, "needs a non-empty list of {Action, Action_Input}")
    calls = []
    for position, item in enumerate(answer):
        where = f"{field_name}[{position}]"
        if not isinstance(item, dict) or not isinstance(item.get("Action"), str):
            raise DatasetRowError(path, row, where, "needs 'Action' (str) and 'Action_Input' (JSON string)")
        calls.append({"name": item["Action"].strip(), "arguments": _parse_arguments(item.get("Action_Input", "{}"), path, row, where)})
    return calls


def calls_as_text(calls: list[dict[str, Any]]) -> str:
    """Expected calls in the response format (``Action:`` / ``Action Input:`` lines)."""
    return "\n".join(f"Action: {c['name']}\nAction Input: {json.dumps(c['arguments'], ensure_ascii=False)}" for c in calls)


def _record(api: dict[str, Any], documentation: str, kind: str, index: int, question: str, calls: list) -> dict[str, Any]:
    return {
        "id": f"{api['Name']}/{kind}/{index}",
        "task": "tool_call",
        "prompt": toolalpaca_prompt(api["Name"], api.get("Description") or "", documentation, question),
        "system": None,
        "api_name": api["Name"],
        "question": question,
        "expected_calls": calls,
        "source_kind": kind,
        "reference_answer": calls_as_text(calls),
    }


def normalise_toolalpaca_api(api: dict[str, Any], path: str, row: int) -> list[dict[str, Any]]:
    """One native API entry -> its records (raises DatasetRowError naming the instance field)."""
    require(api, "Name", str, path, row)
    documentation = _documentation(api, path, row)
    records = []
    if "Instances" in api:
        instances = require(api, "Instances", list, path, row)
        for index, instance in enumerate(instances):
            field_name = f"Instances[{index}]"
            if not isinstance(instance, dict) or not isinstance(instance.get("input"), str):
                raise DatasetRowError(path, row, f"{field_name}.input", "missing question text")
            question = instance["input"].rsplit("\nHint: ", 1)[0].strip()
            calls = _calls_from_steps(instance.get("intermediate_steps"), path, row, f"{field_name}.intermediate_steps")
            records.append(_record(api, documentation, "instances", index, question, calls))
    elif "Instructions" in api:
        instructions = require(api, "Instructions", list, path, row)
        answers = require(api, "Golden_Answers", list, path, row)
        if len(instructions) != len(answers):
            raise DatasetRowError(path, row, "Golden_Answers", f"{len(answers)} answers for {len(instructions)} instructions")
        for index, (question, answer) in enumerate(zip(instructions, answers)):
            if not isinstance(question, str) or not question.strip():
                raise DatasetRowError(path, row, f"Instructions[{index}]", "empty question")
            calls = _calls_from_golden(answer, path, row, f"Golden_Answers[{index}]")
            records.append(_record(api, documentation, "golden", index, question.strip(), calls))
    else:
        raise DatasetRowError(path, row, "Instances", "API has neither 'Instances' nor 'Instructions'/'Golden_Answers'")
    return records


def _read_apis(path: str) -> list[Any]:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"dataset file not found: {path}")
    with open(path, encoding="utf-8") as handle:
        text = handle.read()
    try:
        value = json.loads(text)
        return value if isinstance(value, list) else [value]
    except json.JSONDecodeError:
        pass
    apis: list[Any] = []  # JSON Lines: one API per line
    for row, line in enumerate((raw for raw in text.splitlines() if raw.strip()), start=1):
        try:
            apis.append(json.loads(line))
        except json.JSONDecodeError as error:
            apis.append(DatasetRowError(path, row, "<json>", f"not valid JSON ({error.msg})"))
    return apis


def _normalise_api_row(api: Any, path: str, row: int) -> list[dict[str, Any]]:
    if not isinstance(api, dict):
        raise DatasetRowError(path, row, "<row>", f"expected an API object, got {type(api).__name__}")
    return normalise_toolalpaca_api(api, path, row)


def load_toolalpaca(path: str, skip_invalid_rows: bool = False) -> LoadedDataset:
    """Load a native ToolAlpaca file (train_data.json or eval_*.json layout, or JSONL of APIs)."""
    return normalise_rows(path, _read_apis(path), _normalise_api_row, skip_invalid_rows)


def read_split_keys(path: str) -> set[tuple[str, str]]:
    """(api_name, question) keys of a split file: a JSON(L) list of {"api_name", "question"}
    objects, or SDPO's tooluse test.json rows (their ``prompt`` holds ``Name:`` and ``Question:``)."""
    with open(path, encoding="utf-8") as handle:
        text = handle.read().strip()
    items = json.loads(text) if text.startswith("[") else [json.loads(line) for line in text.splitlines() if line.strip()]
    keys = set()
    for item in items:
        if "api_name" in item:
            keys.add((item["api_name"], item["question"].strip()))
        else:
            prompt = item["prompt"]
            name = prompt.split("\nName: ", 1)[1].split("\n", 1)[0].strip()
            keys.add((name, prompt.rsplit("\nQuestion: ", 1)[1].strip()))
    return keys


def split_toolalpaca(
    records: Iterable[dict[str, Any]], split_file: str | None = None, num_test: int = 68, seed: int = 0
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(train, test) per the module docstring: exact with ``split_file``, else the seeded rule."""
    records = list(records)
    if split_file is not None:
        keys = read_split_keys(split_file)
        test = [r for r in records if (r["api_name"], r["question"]) in keys]
        train = [r for r in records if r["source_kind"] == "instances" and (r["api_name"], r["question"]) not in keys]
        return train, test
    golden = [r for r in records if r["source_kind"] == "golden"]
    if num_test > len(golden):
        raise ValueError(f"split_toolalpaca: num_test={num_test} but only {len(golden)} golden (evaluation) records loaded")
    test = random.Random(seed).sample(golden, num_test)
    train = [r for r in records if r["source_kind"] == "instances"]
    return train, test
