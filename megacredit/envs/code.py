"""Code environment (LiveCodeBench-style): run the response's program on tests in the sandbox.

Feedback z follows CREDIT appendix A.1 ("LiveCodeBench -- Self-teacher context"), quoted::

    Previous assessment:
    Test 1: Wrong Answer
    Input: [[26,30,2],[1,23,1]]    Output: 5    Expected: 4
    Test 2: Runtime Error
    ZeroDivisionError: division by zero
    Line 15 in separateSquares (Solution.py)

(the appendix renders Input/Output/Expected on one line; here each gets its own line, which
stays readable for multi-line stdin tests; the "Previous assessment:" header belongs to the
teacher prompt template, not to z). The verdicts produced here::

    Test 1: Wrong Answer
    Input: [[26,30,2],[1,23,1]]
    Output: 5
    Expected: 4
    Test 2: Runtime Error
    ZeroDivisionError: division by zero
    Line 15 in separateSquares (Solution.py)
    Test 3: Time Limit Exceeded
    Input: ...
    Compilation/Syntax Error            (whole program; no "Test k:" prefix)
    SyntaxError: expected ':'
    Line 3 (Solution.py)

Training uses a stable 50 % random subset of the record's (private) tests as feedback and
reward (appendix A: "a 50 % random subset of LCB's private tests provides in-training feedback
z and the full private set is used for validation"); ``split='val'`` runs all tests.
"""

from __future__ import annotations

import json
import re
import signal
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from megacredit.envs.base import EnvResult, Environment, Split
from megacredit.envs.code_tests import (TestCase, display_input, functional_matches, normalise_code_record,
                                        select_test_indices, stdout_matches, tests_as_runner_config)
from megacredit.envs.sandbox import SandboxLimits, SandboxResult, run_sandboxed

_RUNNER_SOURCE = Path(__file__).with_name("_code_runner.py").read_text(encoding="utf-8")
RESULT_MARK = "@@RESULT@@ "
SOLUTION_FILENAME = "Solution.py"
MAX_PROGRAM_CHARS = 200_000
_THINK_BLOCK = re.compile(r"<think>.*?</think>", re.DOTALL | re.IGNORECASE)
_FENCE = re.compile(r"```[ \t]*([A-Za-z0-9_+.-]*)[^\n]*\n(.*?)(?:```|\Z)", re.DOTALL)
_PYTHON_TAGS = {"python", "py", "python3", "python3.11"}


def strip_think(response: str) -> str:
    """Remove <think>...</think> traces; an unmatched </think> drops everything before it."""
    text = _THINK_BLOCK.sub("", response)
    if "</think>" in text.lower():
        text = text[text.lower().rindex("</think>") + len("</think>"):]
    if "<think>" in text.lower():  # an unclosed trace (truncated generation): keep what precedes it
        text = text[: text.lower().index("<think>")]
    return text


def extract_program(response: str) -> str | None:
    """The last ```python fenced block, else the last fenced block, else the raw text; None if empty."""
    text = strip_think(response)
    blocks = [(match.group(1).lower(), match.group(2)) for match in _FENCE.finditer(text)]
    python_blocks = [body for tag, body in blocks if tag in _PYTHON_TAGS]
    program = python_blocks[-1] if python_blocks else (blocks[-1][1] if blocks else text)
    return program if program.strip() else None


@dataclass
class TestVerdict:
    """The outcome of one test (positions are 1-based among the tests run)."""

    number: int
    """1-based test number shown in feedback (position among the tests run for this split)."""
    verdict: str
    """Accepted | Wrong Answer | Runtime Error | Time Limit Exceeded | Output Limit Exceeded | Not Run."""
    input: str
    """The input as displayed (functional arguments joined by ', ')."""
    expected: str
    """Expected output."""
    output: str | None = None
    """Actual output (stdout or JSON return value), when there was one."""
    error: str | None = None
    """Error lines for Runtime Error (exception, message, line)."""

    @property
    def passed(self) -> bool:
        return self.verdict == "Accepted"


def _truncate(text: str, limit: int) -> str:
    text = text.rstrip("\n")
    return text if len(text) <= limit else f"{text[:limit]}... (truncated, {len(text)} chars)"


def describe_error(record: dict[str, Any]) -> str:
    """Runtime-error lines: ``Type: message`` then ``Line N in func (Solution.py)``."""
    if record.get("signal") is not None:
        try:
            name = signal.Signals(record["signal"]).name
        except ValueError:
            name = str(record["signal"])
        hint = " (stack overflow, e.g. from deep recursion)" if record["signal"] == signal.SIGSEGV else ""
        return f"Killed by signal {name}{hint}"
    if record.get("error_type") is None:
        return f"Process exited with code {record.get('exit_code')} before finishing the test"
    message = record.get("error_message") or ""
    lines = [f"{record['error_type']}: {message}" if message else record["error_type"]]
    if record.get("line") is not None:
        where = f" in {record['function']}" if record.get("function") not in (None, "<module>") else ""
        lines.append(f"Line {record['line']}{where} ({SOLUTION_FILENAME})")
    return "\n".join(lines)


def compile_error_feedback(program: str) -> str | None:
    """``Compilation/Syntax Error`` feedback when ``program`` does not compile, else None.

    compile() runs in this process: it executes nothing, and the source length is bounded.
    """
    try:
        compile(program, SOLUTION_FILENAME, "exec")
    except SyntaxError as error:
        lines = ["Compilation/Syntax Error", f"{type(error).__name__}: {error.msg}"]
        if error.lineno is not None:
            lines.append(f"Line {error.lineno} ({SOLUTION_FILENAME})")
        return "\n".join(lines)
    except (ValueError, RecursionError, MemoryError, OverflowError) as error:
        return f"Compilation/Syntax Error\n{type(error).__name__}: {error}"
    return None


class CodeEnv(Environment):
    """LiveCodeBench-style environment; see the module docstring for the feedback format.

    Record fields: ``tests`` (list of {input, output, testtype}) or the LiveCodeBench native
    fields; optional ``func_name`` (or ``metadata.func_name``), ``starter_code``, ``id``.
    """

    name = "code"

    def __init__(
        self,
        partial_credit: bool = False,
        train_test_fraction: float = 0.5,
        seed: int = 0,
        per_test_timeout_s: float = 6.0,
        memory_mb: int = 1024,
        max_processes: int = 16,
        stop_after_timeouts: int = 1,
        max_feedback_tests: int = 4,
        max_feedback_chars: int = 300,
        min_output_cap_bytes: int = 65536,
        force_fallback_sandbox: bool = False,
    ) -> None:
        # partial_credit: reward = fraction of tests passed instead of all-or-nothing.
        # train_test_fraction: share of the record's tests run for split='train' (paper: 0.5).
        # seed: mixed with the problem id to pick the stable training subset.
        # per_test_timeout_s: wall (and CPU) limit of each test; memory_mb: RLIMIT_AS.
        # max_processes: RLIMIT_NPROC inside the sandbox (runner + test + the program's own).
        # stop_after_timeouts: after this many Time Limit Exceeded, remaining tests are Not Run.
        # max_feedback_tests: failing tests listed in feedback; max_feedback_chars: per field.
        # min_output_cap_bytes: output kept per test (at least; grows with the expected size).
        # force_fallback_sandbox: use the weaker rlimit-only sandbox even if bwrap works (tests).
        if not 0.0 < train_test_fraction <= 1.0:
            raise ValueError(f"CodeEnv: train_test_fraction must lie in (0, 1], got {train_test_fraction}")
        if per_test_timeout_s <= 0 or stop_after_timeouts < 1 or max_feedback_tests < 1:
            raise ValueError("CodeEnv: per_test_timeout_s must be > 0, stop_after_timeouts and max_feedback_tests >= 1")
        self.partial_credit = partial_credit
        self.train_test_fraction = train_test_fraction
        self.seed = seed
        self.per_test_timeout_s = per_test_timeout_s
        self.memory_mb = memory_mb
        self.max_processes = max_processes
        self.stop_after_timeouts = stop_after_timeouts
        self.max_feedback_tests = max_feedback_tests
        self.max_feedback_chars = max_feedback_chars
        self.min_output_cap_bytes = min_output_cap_bytes
        self.force_fallback_sandbox = force_fallback_sandbox

    def tests_for_split(self, record: dict[str, Any], split: Split) -> list[TestCase]:
        """All tests for 'val'; the stable random ``train_test_fraction`` subset for 'train'."""
        if split not in ("train", "val"):
            raise ValueError(f"CodeEnv: split must be 'train' or 'val', got {split!r}")
        tests = record["tests"]
        if split == "val" or self.train_test_fraction >= 1.0:
            return list(tests)
        indices = select_test_indices(len(tests), record["id"], self.train_test_fraction, self.seed)
        return [tests[i] for i in indices]

    def evaluate(self, record: dict[str, Any], response: str, split: Split = "train") -> EnvResult:
        record = normalise_code_record(record)
        tests = self.tests_for_split(record, split)
        program = extract_program(response or "")
        details: dict[str, Any] = {"num_tests": len(tests), "program_found": program is not None}
        if program is None:
            return EnvResult(0.0, "No code found in the response.", {**details, "num_passed": 0, "verdicts": []})
        if len(program) > MAX_PROGRAM_CHARS:
            return EnvResult(0.0, f"Compilation/Syntax Error\nProgram too long ({len(program)} characters)",
                             {**details, "num_passed": 0, "verdicts": []})
        compile_feedback = compile_error_feedback(program)
        if compile_feedback is not None:
            return EnvResult(0.0, compile_feedback, {**details, "num_passed": 0, "verdicts": [], "compile_error": True})
        verdicts, sandbox_result = self.run_tests(program, tests, record["func_name"])
        num_passed = sum(v.passed for v in verdicts)
        if self.partial_credit:
            reward = num_passed / len(tests)
        else:
            reward = 1.0 if num_passed == len(tests) else 0.0
        details.update(num_passed=num_passed, verdicts=[asdict(v) for v in verdicts],
                       isolation=sandbox_result.isolation, sandbox_wall_time=sandbox_result.wall_time)
        return EnvResult(reward, self.format_feedback(verdicts), details)

    def run_tests(self, program: str, tests: list[TestCase], func_name: str | None) -> tuple[list[TestVerdict], SandboxResult]:
        """Run every test in ONE sandbox (the runner forks a child per test) and grade on the host."""
        runner_tests = tests_as_runner_config(tests, func_name, self.min_output_cap_bytes)
        config = {"tests": runner_tests, "per_test_timeout_s": self.per_test_timeout_s,
                  "stop_after_timeouts": self.stop_after_timeouts}
        files: dict[str, str | bytes] = {f"input_{i}.txt": t.input for i, t in enumerate(tests)}
        files.update({SOLUTION_FILENAME: program, "runner.json": json.dumps(config)})
        runs = min(len(tests), self.stop_after_timeouts)  # at most this many tests can time out
        limits = SandboxLimits(
            wall_time_s=runs * (self.per_test_timeout_s + 0.5) + len(tests) * 0.5 + 5.0,
            cpu_time_s=len(tests) * (self.per_test_timeout_s + 1.0) + 5.0,
            memory_mb=self.memory_mb, max_processes=self.max_processes,
            max_output_bytes=sum(6 * t["output_cap"] + 512 for t in runner_tests) + 65536,
            max_file_bytes=16 << 20)
        result = run_sandboxed(_RUNNER_SOURCE, "", limits, files, force_fallback=self.force_fallback_sandbox)
        records = self._parse_runner_output(result.stdout)
        return [self._grade(i, test, records.get(i), result) for i, test in enumerate(tests)], result

    @staticmethod
    def _parse_runner_output(stdout: str) -> dict[int, dict[str, Any]]:
        records = {}
        for line in stdout.splitlines():
            if line.startswith(RESULT_MARK):
                try:
                    record = json.loads(line[len(RESULT_MARK):])
                except ValueError:
                    continue
                records[int(record.get("index", -2))] = record
        return records

    def _grade(self, index: int, test: TestCase, record: dict[str, Any] | None, sandbox: SandboxResult) -> TestVerdict:
        verdict = TestVerdict(index + 1, "Runtime Error", display_input(test), test.output)
        if record is None:
            if sandbox.timed_out:
                verdict.verdict = "Time Limit Exceeded"
            else:
                verdict.error = ("The test harness stopped before this test (the program killed its parent "
                                 "process or exhausted a sandbox limit)")
            return verdict
        status = record["status"]
        if status == "ok":
            verdict.output = record.get("output", "")
            matches = stdout_matches if test.testtype == "stdin" else functional_matches
            verdict.verdict = "Accepted" if matches(verdict.output, test.output) else "Wrong Answer"
        elif status == "timeout":
            verdict.verdict = "Time Limit Exceeded"
        elif status == "output_limit":
            verdict.verdict = "Output Limit Exceeded"
        elif status == "skipped":
            verdict.verdict = "Not Run"
        else:
            verdict.error = describe_error(record)
        return verdict

    def format_feedback(self, verdicts: list[TestVerdict]) -> str:
        """Failing tests in the appendix A.1 layout (at most ``max_feedback_tests``)."""
        failing = [v for v in verdicts if not v.passed and v.verdict != "Not Run"]
        not_run = sum(v.verdict == "Not Run" for v in verdicts)
        if not failing and not not_run:
            return f"All {len(verdicts)} tests passed."
        limit = self.max_feedback_chars
        lines: list[str] = []
        for v in failing[: self.max_feedback_tests]:
            lines.append(f"Test {v.number}: {v.verdict}")
            if v.verdict == "Wrong Answer":
                lines += [f"Input: {_truncate(v.input, limit)}", f"Output: {_truncate(v.output or '', limit)}",
                          f"Expected: {_truncate(v.expected, limit)}"]
            elif v.verdict in ("Time Limit Exceeded", "Output Limit Exceeded"):
                lines.append(f"Input: {_truncate(v.input, limit)}")
            elif v.error:
                lines.append(_truncate(v.error, 2 * limit))
        if len(failing) > self.max_feedback_tests:
            lines.append(f"({len(failing) - self.max_feedback_tests} more failing tests not shown)")
        if not_run:
            lines.append(f"({not_run} more tests not run after a Time Limit Exceeded)")
        return "\n".join(lines)
