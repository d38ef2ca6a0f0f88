"""CodeEnv: program extraction, per-test verdicts, appendix-A.1 feedback strings, train/val tests."""

from __future__ import annotations

import base64
import glob
import json
import os
import pickle
import tempfile
import zlib

import psutil
import pytest

from megacredit.envs.code import CodeEnv, extract_program, strip_think
from megacredit.envs.sandbox import sandbox_backend
from megacredit.envs.code_tests import (normalise_code_record, select_test_indices, stdout_matches,
                                        functional_matches)
from livecodebench_payload import encode_private_test_cases
from make_deps import needs

ADD_RECORD = {"id": "add", "tests": [{"input": "1 2\n", "output": "3\n", "testtype": "stdin"},
                                     {"input": "5 7\n", "output": "12", "testtype": "stdin"}]}
TWO_SUM_RECORD = {"id": "two-sum", "func_name": "twoSum",
                  "tests": [{"input": "[2,7,11,15]\n9", "output": "[0, 1]", "testtype": "functional"},
                            {"input": "[3,2,4]\n6", "output": "[1,2]", "testtype": "functional"}]}
ADD_PROGRAM = "a, b = map(int, input().split())\nprint(a + b)\n"


@pytest.fixture(scope="module")
def env() -> CodeEnv:
    return CodeEnv(per_test_timeout_s=1.0)


def fenced(code: str) -> str:
    return f"Here is my solution.\n```python\n{code}```\nDone."


def test_correct_stdin_program(env):
    result = env.evaluate(ADD_RECORD, fenced(ADD_PROGRAM), "val")
    assert result.reward == 1.0
    assert result.feedback == "All 2 tests passed."
    assert [v["verdict"] for v in result.details["verdicts"]] == ["Accepted", "Accepted"]


def test_wrong_answer_feedback_format(env):
    result = env.evaluate(ADD_RECORD, fenced("a, b = map(int, input().split())\nprint(a - b)\n"), "val")
    assert result.reward == 0.0
    assert result.feedback == ("Test 1: Wrong Answer\nInput: 1 2\nOutput: -1\nExpected: 3\n"
                               "Test 2: Wrong Answer\nInput: 5 7\nOutput: -2\nExpected: 12")


def test_runtime_error_reports_exception_and_line(env):
    program = "a, b = map(int, input().split())\ndef divide(x, y):\n    return x // y\nprint(divide(a, b - b))\n"
    result = env.evaluate(ADD_RECORD, fenced(program), "val")
    expected_block = "ZeroDivisionError: integer division or modulo by zero\nLine 3 in divide (Solution.py)"
    assert result.feedback == f"Test 1: Runtime Error\n{expected_block}\nTest 2: Runtime Error\n{expected_block}"


def test_time_limit_exceeded_stops_remaining_tests(env):
    result = env.evaluate(ADD_RECORD, fenced("while True:\n    pass\n"), "val")
    assert result.reward == 0.0
    assert result.feedback == ("Test 1: Time Limit Exceeded\nInput: 1 2\n"
                               "(1 more tests not run after a Time Limit Exceeded)")
    assert [v["verdict"] for v in result.details["verdicts"]] == ["Time Limit Exceeded", "Not Run"]


def test_syntax_error_is_reported_before_running(env):
    result = env.evaluate(ADD_RECORD, fenced("def f()\n    pass\n"), "val")
    assert result.reward == 0.0
    assert result.feedback == "Compilation/Syntax Error\nSyntaxError: expected ':'\nLine 1 (Solution.py)"
    assert result.details["compile_error"] is True


@pytest.mark.parametrize("response", ["", "   \n", "<think>I should write a loop.</think>", "```python\n```"])
def test_empty_or_codeless_responses(env, response):
    result = env.evaluate(ADD_RECORD, response, "val")
    assert result.reward == 0.0 and result.feedback == "No code found in the response."
    assert result.details["program_found"] is False


def test_prose_without_code_is_a_syntax_error(env):
    result = env.evaluate(ADD_RECORD, "I think the answer is to add the two numbers.", "val")
    assert result.reward == 0.0 and result.feedback.startswith("Compilation/Syntax Error\nSyntaxError: ")


def test_functional_tests_with_solution_class(env):
    program = ("class Solution:\n    def twoSum(self, nums: List[int], target: int) -> List[int]:\n"
               "        seen = {}\n        for i, x in enumerate(nums):\n"
               "            if target - x in seen:\n                return [seen[target - x], i]\n"
               "            seen[x] = i\n")
    assert env.evaluate(TWO_SUM_RECORD, fenced(program), "val").reward == 1.0


def test_functional_tests_with_top_level_function_and_wrong_answer(env):
    result = env.evaluate(TWO_SUM_RECORD, fenced("def twoSum(nums, target):\n    return (0, 1)\n"), "val")
    assert result.reward == 0.0
    assert result.feedback == "Test 2: Wrong Answer\nInput: [3,2,4], 6\nOutput: [0, 1]\nExpected: [1,2]"


def test_sys_exit_inside_a_function_is_a_runtime_error(env):
    program = "import sys\nclass Solution:\n    def twoSum(self, nums, target):\n        sys.exit(3)\n"
    result = env.evaluate(TWO_SUM_RECORD, fenced(program), "val")
    block = "SystemExit: exit code 3\nLine 4 in twoSum (Solution.py)"
    assert result.feedback == f"Test 1: Runtime Error\n{block}\nTest 2: Runtime Error\n{block}"


def test_sys_exit_zero_after_output_is_a_normal_end(env):
    program = "import sys\nprint(sum(map(int, sys.stdin.read().split())))\nsys.exit(0)\n"
    assert env.evaluate(ADD_RECORD, fenced(program), "val").reward == 1.0


def test_a_crash_in_one_test_does_not_hide_the_others(env):
    program = ("import os, signal\ndata = open(0).read()\n"
               "if data.startswith('1 '):\n    os.kill(os.getpid(), signal.SIGSEGV)\n"
               "print(sum(map(int, data.split())))\n")
    result = env.evaluate(ADD_RECORD, fenced(program), "val")
    assert [v["verdict"] for v in result.details["verdicts"]] == ["Runtime Error", "Accepted"]
    assert result.feedback == ("Test 1: Runtime Error\n"
                               "Killed by signal SIGSEGV (stack overflow, e.g. from deep recursion)")


@needs("bwrap", sandbox_backend().mode == "bwrap", "absent, or it failed its probe")
def test_killing_the_runner_fails_all_tests_without_crashing(env):
    program = "import os, signal\nos.kill(os.getppid(), signal.SIGKILL)\n"
    result = env.evaluate(ADD_RECORD, fenced(program), "val")
    assert result.reward == 0.0 and result.details["isolation"] == "bwrap"
    # In bwrap mode the runner is PID 1 of the namespace: the kernel drops SIGKILL sent to it from
    # inside, so the runner carries on and grades the (empty) output.
    assert result.feedback == ("Test 1: Wrong Answer\nInput: 1 2\nOutput: \nExpected: 3\n"
                               "Test 2: Wrong Answer\nInput: 5 7\nOutput: \nExpected: 12")
    fallback = CodeEnv(per_test_timeout_s=1.0, force_fallback_sandbox=True).evaluate(ADD_RECORD, fenced(program), "val")
    assert fallback.reward == 0.0
    assert fallback.feedback.startswith("Test 1: Runtime Error\nThe test harness stopped before this test")


def test_partial_credit_is_the_fraction_passed():
    env = CodeEnv(per_test_timeout_s=1.0, partial_credit=True)
    program = "a, b = map(int, input().split())\nprint(3)\n"  # right only for the first test
    assert env.evaluate(ADD_RECORD, fenced(program), "val").reward == pytest.approx(0.5)


def test_train_split_uses_a_stable_half_of_the_tests():
    tests = [{"input": f"{i} 0\n", "output": f"{i}\n", "testtype": "stdin"} for i in range(10)]
    record = {"id": "ten", "tests": tests}
    env = CodeEnv(per_test_timeout_s=1.0, train_test_fraction=0.5, seed=7)
    first = env.tests_for_split(normalise_code_record(record), "train")
    second = env.tests_for_split(normalise_code_record(record), "train")
    assert len(first) == 5 and first == second
    expected_indices = select_test_indices(10, "ten", 0.5, 7)
    assert [t.input for t in first] == [tests[i]["input"] for i in expected_indices]
    assert len(env.tests_for_split(normalise_code_record(record), "val")) == 10
    result = env.evaluate(record, fenced(ADD_PROGRAM), "train")
    assert result.reward == 1.0 and result.details["num_tests"] == 5
    other_subsets = {tuple(select_test_indices(10, f"problem-{k}", 0.5, 7)) for k in range(20)}
    assert len(other_subsets) > 1  # the subset depends on the problem
    with pytest.raises(ValueError, match="train_test_fraction"):
        CodeEnv(train_test_fraction=0.0)


def test_long_inputs_are_truncated_in_feedback():
    env = CodeEnv(per_test_timeout_s=1.0, max_feedback_chars=20)
    record = {"id": "long", "tests": [{"input": "1 " * 100, "output": "100", "testtype": "stdin"}]}
    result = env.evaluate(record, fenced("print(0)\n"), "val")
    assert result.feedback == ("Test 1: Wrong Answer\nInput: 1 1 1 1 1 1 1 1 1 1 ... (truncated, 200 chars)\n"
                               "Output: 0\nExpected: 100")


def test_extract_program_variants():
    assert extract_program("```python\nprint(1)\n```\ntext\n```python\nprint(2)\n```") == "print(2)\n"
    assert extract_program("```python\nprint(1)\n```\n```text\nsample output\n```") == "print(1)\n"
    assert extract_program("```\nprint(3)\n```") == "print(3)\n"
    assert extract_program("print(4)") == "print(4)"
    assert extract_program("<think>```python\nprint(0)\n```</think>```python\nprint(5)\n```") == "print(5)\n"
    assert extract_program("```python\nprint(6)\n") == "print(6)\n"  # truncated generation
    assert strip_think("reasoning</think>answer") == "answer"


def test_output_comparison_rules():
    assert stdout_matches("3  \n4\n\n", "3\n4")
    assert stdout_matches("1.0 2", "1.00 2.0")
    assert not stdout_matches("3\n4", "3\n5")
    assert not stdout_matches("3", "3\n4")
    assert functional_matches("[1, 2]", "[1,2]") and not functional_matches("[2, 1]", "[1,2]")


def test_livecodebench_native_layout_is_normalised(env):
    private = [{"input": "[3,2,4]\n6", "output": "[1,2]", "testtype": "functional"}]
    row = {"question_id": "lc-1", "question_content": "Two sum", "starter_code": "class Solution:\n    pass",
           "public_test_cases": json.dumps(TWO_SUM_RECORD["tests"][:1]),
           "private_test_cases": encode_private_test_cases(private), "metadata": json.dumps({"func_name": "twoSum"})}
    record = normalise_code_record(row)
    assert record["func_name"] == "twoSum" and record["id"] == "lc-1"
    assert [t.input for t in record["tests"]] == ["[3,2,4]\n6"]
    assert [t.input for t in record["public_tests"]] == ["[2,7,11,15]\n9"]
    program = "class Solution:\n    def twoSum(self, nums, target):\n        return [1, 2]\n"
    assert env.evaluate(row, fenced(program), "val").reward == 1.0


def test_malformed_records_name_the_field():
    with pytest.raises(ValueError, match="no tests"):
        normalise_code_record({"id": "x"})
    with pytest.raises(ValueError, match="func_name"):
        normalise_code_record({"tests": [{"input": "1", "output": "1", "testtype": "functional"}]})
    with pytest.raises(ValueError, match="'tests'\\[0\\].testtype"):
        normalise_code_record({"tests": [{"input": "1", "output": "1", "testtype": "interactive"}]})
    hostile = base64.b64encode(zlib.compress(pickle.dumps(os.system))).decode()  # a global: refused
    with pytest.raises(ValueError, match="private_test_cases"):
        normalise_code_record({"private_test_cases": hostile})


def test_fallback_sandbox_grades_the_same():
    env = CodeEnv(per_test_timeout_s=1.0, force_fallback_sandbox=True)
    assert env.evaluate(ADD_RECORD, fenced(ADD_PROGRAM), "val").reward == 1.0
    result = env.evaluate(ADD_RECORD, fenced("print(0)\n"), "val")
    assert result.reward == 0.0 and result.details["isolation"] == "fallback"


def test_200_programs_in_parallel_leak_nothing(env):
    sandbox_dirs = os.path.join(tempfile.gettempdir(), "megacredit-sandbox-*")
    dirs_before = set(glob.glob(sandbox_dirs))
    children_before = {c.pid for c in psutil.Process().children(recursive=True)}
    wrong = "a, b = map(int, input().split())\nprint(a * b)\n"
    responses = [fenced(ADD_PROGRAM if i % 2 == 0 else wrong) for i in range(200)]
    results = env.evaluate_batch([ADD_RECORD] * 200, responses, split="val", max_workers=2)
    assert [r.reward for r in results] == [1.0 if i % 2 == 0 else 0.0 for i in range(200)]
    live = {c.pid for c in psutil.Process().children(recursive=True) if c.status() != psutil.STATUS_ZOMBIE}
    assert live <= children_before
    assert set(glob.glob(sandbox_dirs)) <= dirs_before
