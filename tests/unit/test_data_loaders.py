"""Offline loaders on the hand-written fixtures: records, malformed rows, skipping, splits."""

import json
import os

import pytest

from megacredit.data import DatasetRowError, load_benchmark
from megacredit.data.livecodebench import decode_private_test_cases
from megacredit.data.sciknoweval import split_sciknoweval
from megacredit.data.templates import CODE_PROMPT, SCIKNOWEVAL_SYSTEM_PROMPT
from megacredit.data.toolalpaca import load_toolalpaca, split_toolalpaca
from megacredit.envs import make_env
from livecodebench_payload import encode_private_test_cases

FIXTURES = os.path.join(os.path.dirname(__file__), "..", "fixtures")


def fixture(name):
    return os.path.join(FIXTURES, name)


def test_livecodebench_fixture_records():
    data = load_benchmark("livecodebench", fixture("livecodebench_v6.jsonl"))
    assert len(data) == 3 and data.num_skipped == 0
    stdin, functional = data.records[0], data.records[1]
    assert stdin["id"] == "abc400_a" and stdin["testtype"] == "stdin" and stdin["func_name"] is None
    assert stdin["tests"] == [
        {"input": "5 7\n", "output": "12\n", "testtype": "stdin"},
        {"input": "-1 1\n", "output": "0\n", "testtype": "stdin"},
    ]
    # the compressed base64(zlib(pickle(json))) private tests of the real release are decoded
    assert functional["func_name"] == "separateSquares" and functional["testtype"] == "functional"
    assert functional["tests"][1] == {"input": "[[26,30,2],[1,23,1]]", "output": "24.5", "testtype": "functional"}
    assert functional["prompt"].startswith(CODE_PROMPT.split("{problem}")[0])
    assert "def separateSquares" in functional["prompt"]


def test_livecodebench_date_filter_and_parquet(tmp_path):
    import datasets

    window = load_benchmark("livecodebench", fixture("livecodebench_v6.jsonl"), date_from="2025-02-01", date_to="2025-05-01")
    assert [r["id"] for r in window.records] == ["abc400_a", "3763"]
    parquet = str(tmp_path / "lcb.parquet")
    datasets.load_dataset("json", data_files=fixture("livecodebench_v6.jsonl"), split="train").to_parquet(parquet)
    from_parquet = load_benchmark("livecodebench", parquet)
    from_jsonl = load_benchmark("livecodebench", fixture("livecodebench_v6.jsonl"))
    assert [r["tests"] for r in from_parquet.records] == [r["tests"] for r in from_jsonl.records]


def test_livecodebench_records_feed_the_code_env():
    """The loader's records are what megacredit.envs.code (sandboxed) consumes."""
    from megacredit.envs.code_tests import normalise_code_record

    record = load_benchmark("livecodebench", fixture("livecodebench_v6.jsonl")).records[1]
    normalised = normalise_code_record(record)
    assert normalised["func_name"] == "separateSquares"
    assert [(t.input, t.output) for t in normalised["tests"]] == [(t["input"], t["output"]) for t in record["tests"]]
    assert len(normalised["public_tests"]) == 1


def test_private_test_round_trip_and_pickle_globals_refused():
    import base64, pickle, zlib

    tests = [{"input": "1", "output": "2", "testtype": "stdin"}]
    assert decode_private_test_cases(encode_private_test_cases(tests)) == tests
    hostile = base64.b64encode(zlib.compress(pickle.dumps(os.getcwd))).decode()  # a pickled global
    with pytest.raises(pickle.UnpicklingError, match="refusing"):
        decode_private_test_cases(hostile)


@pytest.mark.parametrize(
    "benchmark, name, row, field, kept",
    [
        ("livecodebench", "livecodebench_v6_malformed.jsonl", 2, "public_test_cases", 2),
        ("sciknoweval", "sciknoweval_malformed.jsonl", 2, "answerKey", 2),
        ("toolalpaca", "toolalpaca_malformed.json", 2, "Instances[0].intermediate_steps[0]", 5),
    ],
)
def test_malformed_row_error_names_file_row_field_and_skip_counts(benchmark, name, row, field, kept):
    with pytest.raises(DatasetRowError) as info:
        load_benchmark(benchmark, fixture(name))
    error = info.value
    assert (os.path.basename(error.path), error.row, error.field_name) == (name, row, field)
    assert name in str(error) and f"row {row}" in str(error) and field in str(error)
    skipped = load_benchmark(benchmark, fixture(name), skip_invalid_rows=True)
    assert skipped.num_skipped == 1 and len(skipped.records) == kept
    assert skipped.skipped_errors[0].row == row


def test_invalid_json_line_is_located(tmp_path):
    path = tmp_path / "broken.jsonl"
    lines = open(fixture("sciknoweval_l3.jsonl")).read().splitlines()
    path.write_text("\n".join([lines[0], "{not json", lines[1]]) + "\n")
    with pytest.raises(DatasetRowError, match="row 2 .*'<json>'"):
        load_benchmark("sciknoweval", str(path))
    assert load_benchmark("sciknoweval", str(path), skip_invalid_rows=True).num_skipped == 1


def test_sciknoweval_records_filters_and_env():
    data = load_benchmark("sciknoweval", fixture("sciknoweval_l3.jsonl"))
    assert [r["domain"] for r in data.records] == ["Biology", "Chemistry", "Material"]  # the L2 row is filtered
    first = data.records[0]
    assert first["system"] == SCIKNOWEVAL_SYSTEM_PROMPT and first["answer"] == "B"
    assert "B: They (de)methylate thiol and selenol metabolites" in first["prompt"]
    assert first["prompt"].endswith("Please reason step by step.")
    assert data.records[1]["choice_labels"] == ["A", "B"]
    everything = load_benchmark("sciknoweval", fixture("sciknoweval_l3.jsonl"), levels=None)
    assert len(everything) == 4
    env = make_env("multiple_choice")
    assert env.evaluate(first, "<answer>B</answer>").reward == 1.0


def test_sciknoweval_split_is_seeded_and_disjoint():
    records = [{"id": str(i)} for i in range(40)]
    train, test = split_sciknoweval(records, test_ratio=0.1, seed=42)
    assert len(test) == 4 and len(train) == 36
    assert {r["id"] for r in train}.isdisjoint({r["id"] for r in test})
    assert split_sciknoweval(records, 0.1, 42) == (train, test)


def test_toolalpaca_records_and_env():
    train = load_toolalpaca(fixture("toolalpaca_train.json"))
    assert [r["id"] for r in train.records] == ["Axolotl/instances/0", "Axolotl/instances/1", "Weather/instances/0"]
    # getDetails meta-tool dropped; "\nHint: ..." removed from the question (ToolAlpaca's rule)
    assert train.records[1]["expected_calls"] == [{"name": "getRandomAxolotlImage", "arguments": {}}]
    assert train.records[1]["question"] == "I want any random axolotl photo."
    prompt = train.records[0]["prompt"]
    assert prompt.startswith("Your task is to answer the user's question using available tools. \n")
    assert "Name: Axolotl\nDescription: Collection of axolotl pictures and facts\nDocumentation:\n" in prompt
    assert prompt.endswith("Begin!\nQuestion: Show me a picture of an albino axolotl, please.")
    env = make_env("tool_call")
    weather = train.records[2]
    assert env.evaluate(weather, 'Action: getCurrentWeather\nAction Input: {"city": "Paris", "units": "metric"}').reward == 1.0
    assert env.evaluate(weather, weather["reference_answer"]).reward == 1.0


def test_toolalpaca_split_with_file_and_seeded_rule():
    records = load_toolalpaca(fixture("toolalpaca_train.json")).records + load_toolalpaca(fixture("toolalpaca_eval.json")).records
    train, test = split_toolalpaca(records, split_file=fixture("toolalpaca_split.json"))
    assert [r["id"] for r in test] == ["Axolotl/golden/0", "Axolotl/golden/2"]
    assert len(train) == 3 and all(r["source_kind"] == "instances" for r in train)
    train2, test2 = split_toolalpaca(records, num_test=2, seed=1)
    assert len(test2) == 2 and test2 == split_toolalpaca(records, num_test=2, seed=1)[1]
    assert all(r["source_kind"] == "golden" for r in test2) and len(train2) == 3
    with pytest.raises(ValueError, match="only 3 golden"):
        split_toolalpaca(records, num_test=68)


def test_split_file_in_sdpo_row_format(tmp_path):
    records = load_toolalpaca(fixture("toolalpaca_eval.json")).records
    sdpo_rows = tmp_path / "test.json"
    sdpo_rows.write_text(json.dumps({"prompt": records[1]["prompt"], "idx": 4047}) + "\n")
    _, test = split_toolalpaca(records, split_file=str(sdpo_rows))
    assert [r["id"] for r in test] == ["Axolotl/golden/1"]


def test_unknown_benchmark_and_missing_file():
    with pytest.raises(ValueError, match="valid names"):
        load_benchmark("mmlu", "x.jsonl")
    with pytest.raises(FileNotFoundError):
        load_benchmark("sciknoweval", fixture("nope.jsonl"))
