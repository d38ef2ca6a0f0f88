"""Test cases of the code environment: LiveCodeBench record normalisation, output comparison,
and deterministic train/val test selection.

LiveCodeBench v6 rows (native layout) carry ``question_content``, ``starter_code``,
``public_test_cases`` and ``private_test_cases`` (JSON strings of ``[{input, output, testtype}]``;
in the released dataset ``private_test_cases`` is base64(zlib(pickle(json string)))), and
``metadata`` (JSON with ``func_name`` for LeetCode-style problems). :func:`normalise_code_record`
turns such a row (or an already normalised record) into the record the environment uses:
``tests`` (the private tests, or the public ones when there are no private tests),
``public_tests``, ``func_name``, ``starter_code``, ``id``.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import pickle
import random
import zlib
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from typing import Any, Literal, Sequence

TestType = Literal["stdin", "functional"]


@dataclass(frozen=True)
class TestCase:
    """One test: stdin -> stdout, or JSON arguments (one per line) -> JSON return value."""

    input: str
    """stdin text, or for functional tests one JSON value per line (the call's arguments)."""
    output: str
    """Expected stdout, or the JSON of the expected return value."""
    testtype: TestType
    """'stdin' (whole program) or 'functional' (call Solution().func_name(*args))."""


class _NoClassesUnpickler(pickle.Unpickler):
    """Refuses every class/function lookup: only plain data (str, list, dict, ...) unpickles."""

    def find_class(self, module: str, name: str) -> Any:
        raise pickle.UnpicklingError(f"refusing to unpickle {module}.{name} from a dataset field")


def decode_test_cases(value: Any, field_name: str) -> list[dict[str, Any]]:
    """Parse a LiveCodeBench test-case field: a list, a JSON string, or base64+zlib+pickle of one."""
    if isinstance(value, list):
        return value
    if not isinstance(value, str):
        raise ValueError(f"code record field {field_name!r} must be a list or a JSON string, got {type(value).__name__}")
    text = value.strip()
    if not text:
        return []
    if text[0] in "[{":
        parsed = json.loads(text)
    else:
        try:
            raw = zlib.decompress(base64.b64decode(text.encode("utf-8")))
            payload = _NoClassesUnpickler(io.BytesIO(raw)).load()
        except Exception as error:  # noqa: BLE001 - report which field is broken
            raise ValueError(f"code record field {field_name!r} is neither JSON nor base64+zlib+pickle: {error}") from error
        parsed = json.loads(payload) if isinstance(payload, (str, bytes)) else payload
    if not isinstance(parsed, list):
        raise ValueError(f"code record field {field_name!r} must decode to a list of test cases, got {type(parsed).__name__}")
    return parsed


def _to_test_case(raw: dict[str, Any], default_type: TestType, field_name: str, position: int) -> TestCase:
    if not isinstance(raw, dict) or "input" not in raw or "output" not in raw:
        raise ValueError(f"code record field {field_name!r}[{position}] must be a dict with 'input' and 'output'")
    testtype = raw.get("testtype", default_type)
    if testtype not in ("stdin", "functional"):
        raise ValueError(f"code record field {field_name!r}[{position}].testtype must be 'stdin' or 'functional', got {testtype!r}")
    return TestCase(str(raw["input"]), str(raw["output"]), testtype)


def normalise_code_record(record: dict[str, Any]) -> dict[str, Any]:
    """Return a record with ``tests`` / ``public_tests`` as TestCase lists and ``func_name`` set.

    Accepts the LiveCodeBench native layout or a record that already has ``tests``. Raises
    ValueError naming the field when a field is malformed or no tests exist.
    """
    metadata = record.get("metadata") or {}
    if isinstance(metadata, str):
        metadata = json.loads(metadata) if metadata.strip() else {}
    func_name = record.get("func_name") or metadata.get("func_name")
    default_type: TestType = "functional" if func_name else "stdin"
    public = [_to_test_case(t, default_type, "public_test_cases", i)
              for i, t in enumerate(decode_test_cases(record.get("public_test_cases", []), "public_test_cases"))]
    if "tests" in record:
        tests = [t if isinstance(t, TestCase) else _to_test_case(t, default_type, "tests", i)
                 for i, t in enumerate(record["tests"])]
    else:
        tests = [_to_test_case(t, default_type, "private_test_cases", i)
                 for i, t in enumerate(decode_test_cases(record.get("private_test_cases", []), "private_test_cases"))]
        tests = tests or public
    if not tests:
        raise ValueError("code record has no tests: give 'tests' (list of {input, output, testtype}) "
                         "or LiveCodeBench 'private_test_cases' / 'public_test_cases'")
    if any(t.testtype == "functional" for t in tests) and not func_name:
        raise ValueError("code record has functional tests but no 'func_name' (or metadata.func_name)")
    identifier = record.get("id") or record.get("question_id") or hashlib.sha256(
        json.dumps([[t.input, t.output] for t in tests]).encode("utf-8")).hexdigest()[:16]
    return {**record, "tests": tests, "public_tests": public, "func_name": func_name,
            "starter_code": record.get("starter_code") or "", "id": str(identifier)}


def select_test_indices(num_tests: int, problem_id: str, fraction: float, seed: int) -> list[int]:
    """A stable random subset (at least one test) of ``round(fraction * num_tests)`` test indices.

    The paper (CREDIT appendix A) uses a 50% random subset of the private tests as in-training
    feedback; seeding by (seed, problem id) makes the subset the same at every step.
    """
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"train_test_fraction must lie in (0, 1], got {fraction}")
    count = max(1, min(num_tests, round(fraction * num_tests)))
    digest = hashlib.sha256(f"{seed}:{problem_id}".encode("utf-8")).digest()
    rng = random.Random(int.from_bytes(digest[:8], "big"))
    return sorted(rng.sample(range(num_tests), count))


def _lines(text: str) -> list[str]:
    return [line.strip() for line in text.strip().split("\n")]


def _as_decimals(line: str) -> list[Decimal] | None:
    try:
        return [Decimal(token) for token in line.split()]
    except InvalidOperation:
        return None


def stdout_matches(actual: str, expected: str) -> bool:
    """LiveCodeBench's stdin grading (``grade_stdio`` in LiveCodeBench/LiveCodeBench
    lcb_runner/evaluation/testing_util.py): equal line by line after stripping whitespace; a
    line that differs still matches when its tokens are numerically equal decimals ("1.0" vs
    "1.00")."""
    actual_lines, expected_lines = _lines(actual), _lines(expected)
    if len(actual_lines) != len(expected_lines):
        return False
    for got, want in zip(actual_lines, expected_lines):
        if got == want:
            continue
        got_numbers, want_numbers = _as_decimals(got), _as_decimals(want)
        if got_numbers is None or want_numbers is None or got_numbers != want_numbers:
            return False
    return True


def functional_matches(actual_json: str, expected_json: str) -> bool:
    """JSON-equal return values (tuples were serialised as lists); raw text when unparsable."""
    try:
        return json.loads(actual_json) == json.loads(expected_json)
    except ValueError:
        return actual_json.strip() == expected_json.strip()


def display_input(test: TestCase) -> str:
    """How an input is shown in feedback: functional arguments joined by ', ', stdin as is."""
    if test.testtype == "functional":
        return ", ".join(line for line in test.input.split("\n") if line.strip())
    return test.input.rstrip("\n")


def output_cap_bytes(test: TestCase, minimum: int) -> int:
    """Per-test output the runner keeps: enough for any correct answer, bounded otherwise."""
    return max(minimum, 4 * len(test.output.encode("utf-8")) + 1024)


def tests_as_runner_config(tests: Sequence[TestCase], func_name: str | None, minimum_cap: int) -> list[dict[str, Any]]:
    """The per-test part of the runner's config (no expected outputs: the host compares)."""
    return [{"testtype": t.testtype, "func_name": func_name, "output_cap": output_cap_bytes(t, minimum_cap)}
            for t in tests]
