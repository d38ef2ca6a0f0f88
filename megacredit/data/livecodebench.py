"""LiveCodeBench v6 loader (native `code_generation_lite` field layout), offline.

Native fields read: ``question_title``, ``question_content``, ``platform``, ``question_id``,
``contest_date``, ``starter_code``, ``difficulty``, ``public_test_cases`` (JSON string: list of
``{"input", "output", "testtype"}``), ``private_test_cases`` (the same JSON string, or, as in the
real release, ``base64(zlib(pickle(json string)))``), ``metadata`` (JSON string, ``func_name``
for LeetCode-style functional tests).

Record produced (consumed by the code environment, megacredit/envs/code.py):
``id``, ``task='code'``, ``prompt`` (appendix A.1 coding prompt), ``system=None``,
``title``, ``platform``, ``contest_date``, ``difficulty``, ``starter_code``,
``func_name`` (str | None), ``testtype`` (``'stdin'`` or ``'functional'``),
``tests`` (the private tests) and ``public_test_cases`` (lists of ``{"input", "output",
"testtype"}``, the field names megacredit.envs.code_tests.normalise_code_record reads),
``reference_answer=None`` (LCB has no reference program; RLSD mode needs one elsewhere).

The paper's split (appendix A): the 131 problems released 2025-02-01 .. 2025-05-01; use
``date_from``/``date_to``. The 50 % private-test feedback subset is the code env's business.
"""

from __future__ import annotations

import base64
import io
import json
import pickle
import zlib
from typing import Any

from megacredit.data.common import DatasetRowError, LoadedDataset, normalise_rows, parse_json_field, read_rows, require
from megacredit.data.templates import livecodebench_prompt

VALID_TEST_TYPES = ("stdin", "functional")


class _StringOnlyUnpickler(pickle.Unpickler):
    """Unpickler that refuses every global: the LCB payload is a pickled str, nothing else.

    Loading arbitrary pickles executes code; refusing ``find_class`` means only builtin
    literals (str, list, dict, numbers) can be reconstructed.
    """

    def find_class(self, module: str, name: str) -> Any:
        raise pickle.UnpicklingError(f"refusing to load global {module}.{name} from a test-case payload")


def decode_private_test_cases(value: str) -> Any:
    """Decode ``private_test_cases``: a JSON list, or base64(zlib(pickle(json string)))."""
    stripped = value.strip()
    if stripped.startswith("["):
        return json.loads(stripped)
    payload = _StringOnlyUnpickler(io.BytesIO(zlib.decompress(base64.b64decode(stripped, validate=True)))).load()
    return json.loads(payload) if isinstance(payload, (str, bytes)) else payload


def _tests(value: Any, path: str, row_number: int, key: str) -> list[dict[str, str]]:
    if not isinstance(value, str):
        raise DatasetRowError(path, row_number, key, "expected a JSON string (list of test cases)")
    try:
        tests = decode_private_test_cases(value) if key == "private_test_cases" else json.loads(value)
    except (ValueError, zlib.error, pickle.UnpicklingError, EOFError) as error:
        raise DatasetRowError(path, row_number, key, f"cannot decode test cases: {error}") from None
    if not isinstance(tests, list):
        raise DatasetRowError(path, row_number, key, f"expected a list of test cases, got {type(tests).__name__}")
    for position, test in enumerate(tests):
        if not isinstance(test, dict) or not {"input", "output"} <= set(test):
            raise DatasetRowError(path, row_number, key, f"test case {position} needs 'input' and 'output'")
        if test.get("testtype", "stdin") not in VALID_TEST_TYPES:
            raise DatasetRowError(path, row_number, key, f"test case {position}: testtype must be one of {VALID_TEST_TYPES}")
    return [{"input": t["input"], "output": t["output"], "testtype": t.get("testtype", "stdin")} for t in tests]


def normalise_livecodebench_row(row: dict[str, Any], path: str, row_number: int) -> dict[str, Any]:
    """One native LCB row -> one normalised record (raises DatasetRowError)."""
    question_id = str(require(row, "question_id", (str, int), path, row_number))
    content = require(row, "question_content", str, path, row_number)
    if not content.strip():
        raise DatasetRowError(path, row_number, "question_content", "empty problem statement")
    starter_code = row.get("starter_code") or ""
    metadata = parse_json_field(row.get("metadata") or "{}", path, row_number, "metadata")
    func_name = metadata.get("func_name") if isinstance(metadata, dict) else None
    public_tests = _tests(row.get("public_test_cases"), path, row_number, "public_test_cases")
    private_tests = _tests(row.get("private_test_cases"), path, row_number, "private_test_cases")
    if not public_tests and not private_tests:
        raise DatasetRowError(path, row_number, "private_test_cases", "the problem has no test cases at all")
    testtype = (private_tests or public_tests)[0]["testtype"]
    if testtype == "functional" and not func_name:
        raise DatasetRowError(path, row_number, "metadata", "functional tests need metadata.func_name")
    return {
        "id": question_id,
        "task": "code",
        "prompt": livecodebench_prompt(content, starter_code),
        "system": None,
        "title": row.get("question_title") or "",
        "platform": row.get("platform") or "",
        "contest_date": str(row.get("contest_date") or ""),
        "difficulty": row.get("difficulty") or "",
        "starter_code": starter_code,
        "func_name": func_name,
        "testtype": testtype,
        "public_test_cases": public_tests,
        "tests": private_tests,
        "reference_answer": None,
    }


def load_livecodebench(
    path: str, skip_invalid_rows: bool = False, date_from: str | None = None, date_to: str | None = None
) -> LoadedDataset:
    """Load a local LCB JSONL/Parquet file. ``date_from <= contest_date < date_to`` (ISO strings)."""
    loaded = normalise_rows(path, read_rows(path), normalise_livecodebench_row, skip_invalid_rows)
    if date_from or date_to:
        loaded.records = [
            r for r in loaded.records
            if (not date_from or r["contest_date"] >= date_from) and (not date_to or r["contest_date"] < date_to)
        ]
    return loaded
