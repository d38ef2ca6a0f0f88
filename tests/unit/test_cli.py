"""The `megacredit` command line: config show, error exit codes, train/convert wiring, plot."""

from __future__ import annotations

import subprocess
import sys
import types
from pathlib import Path

import pytest
import yaml

from megacredit.cli import EXIT_CONFIG_ERROR, main
from megacredit.config import MegacreditConfig, load_config
from megacredit.reporting.metrics import MetricsLogger, save_token_credit

ROOT = Path(__file__).resolve().parents[2]
DEMO = ROOT / "examples" / "credit_smollm2_arithmetic.yaml"


def test_config_show_prints_the_resolved_config(capsys):
    with pytest.warns(UserWarning, match="does not read algorithm.credit"):
        assert main(["config", "show", str(DEMO), "training.steps=3", "algorithm.name=sdpo"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["training"]["steps"] == 3 and printed["algorithm"]["name"] == "sdpo"
    assert "credit" not in printed["algorithm"]  # sdpo does not read algorithm.credit


def test_paper_scale_config_shows_with_its_engine_and_checks_paths_on_request(capsys, tmp_path):
    paper = ROOT / "examples" / "qwen3_8b_credit_code.yaml"
    assert main(["config", "show", str(paper)]) == 0
    rollout = yaml.safe_load(capsys.readouterr().out)["rollout"]
    assert rollout["engine"] == "sglang" and rollout["placement"] == "colocated"
    assert rollout["engine_tensor_parallel_size"] == 8
    assert main(["config", "show", str(paper), "--check-paths"]) == EXIT_CONFIG_ERROR
    assert "'model.name_or_path' = 'Qwen/Qwen3-8B' is invalid" in capsys.readouterr().err  # first missing path
    (tmp_path / "config.json").write_text("{}")  # a model folder, so the data path is checked next
    assert main(["config", "show", str(paper), f"model.name_or_path={tmp_path}", "--check-paths"]) == EXIT_CONFIG_ERROR
    assert "data.train_path" in capsys.readouterr().err


@pytest.mark.parametrize("example, layout", [("olmo3_7b_credit_science.yaml", "TP 4 x PP 1 x DP 2")])
def test_config_show_validates_the_other_model_families_examples(example, layout, capsys):
    assert main(["config", "show", "--world-size", "8", str(ROOT / "examples" / example)]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"# layout: 8 ranks = {layout}")
    assert yaml.safe_load(out)["algorithm"]["name"] == "credit"


def test_config_error_is_one_line_with_exit_2(capsys):
    code = main(["config", "show", str(DEMO), "algorithm.credit.num_contrastve=2"])
    err = capsys.readouterr().err
    assert code == EXIT_CONFIG_ERROR
    assert err.count("\n") == 1 and "Traceback" not in err
    assert "algorithm.credit.num_contrastve" in err and "num_contrastive" in err


def test_console_script_process_exit_code_and_message():
    result = subprocess.run(
        [sys.executable, "-m", "megacredit.cli", "train", str(DEMO), "algorithm.name=rlsd",
         "algorithm.sdpo.topk_source=student"],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert "algorithm.sdpo.topk_source" in result.stderr and "rlsd" in result.stderr


def test_train_passes_the_validated_config_to_the_loop(monkeypatch):
    received: list[MegacreditConfig] = []
    # The loop module is the lead's; here only the CLI wiring is under test.
    loop = types.ModuleType("megacredit.trainer.loop")
    loop.train = received.append
    monkeypatch.setitem(sys.modules, "megacredit.trainer.loop", loop)
    assert main(["train", str(DEMO), "training.steps=2"]) == 0
    assert received == [load_config(DEMO, ["training.steps=2"])]


def test_convert_delegates_argv_and_reports_a_missing_converter(monkeypatch, capsys):
    calls = []
    convert = types.ModuleType("megacredit.megatron.convert")
    convert.hf_to_mcore_main = lambda argv: calls.append(("hf", argv)) or 0
    convert.mcore_to_hf_main = lambda argv: calls.append(("mcore", argv)) or 3
    monkeypatch.setitem(sys.modules, "megacredit.megatron.convert", convert)
    assert main(["convert", "hf-to-mcore", "--tp", "2", "--input", "x"]) == 0
    assert main(["convert", "mcore-to-hf", "--help-me"]) == 3
    assert calls == [("hf", ["--tp", "2", "--input", "x"]), ("mcore", ["--help-me"])]
    monkeypatch.setitem(sys.modules, "megacredit.megatron.convert", None)  # import fails
    with pytest.raises(SystemExit) as exited:
        main(["convert", "hf-to-mcore", "--tp", "1"])
    assert exited.value.code == 1
    assert "megacredit.megatron.convert.hf_to_mcore_main" in capsys.readouterr().err


def test_plot_writes_png_and_html(tmp_path, capsys):
    logger = MetricsLogger(tmp_path, tensorboard=False, console=False)
    logger.log(1, {"rollout/reward_mean": 0.5, "train/loss": 1.0})
    logger.close(print_summary=False)
    save_token_credit(tmp_path, 1, [{"tokens": ["a"], "advantage": [1.0]}])
    assert main(["plot", str(tmp_path)]) == 0
    assert (tmp_path / "learning_curve.png").stat().st_size > 0
    assert (tmp_path / "token_credit.html").stat().st_size > 0
    assert main(["plot", str(tmp_path / "nothing")]) == 2
    assert "metrics.jsonl" in capsys.readouterr().err


def test_plot_and_viz_of_several_runs(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for name in ("a", "b"):
        logger = MetricsLogger(tmp_path / name, tensorboard=False, console=False)
        logger.log(1, {"rollout/reward_mean": 0.5})
        logger.close(print_summary=False)
        save_token_credit(tmp_path / name, 1, [{"tokens": ["a"], "delta_v": [1.0]}])
    assert main(["plot", "a", "b"]) == 0
    assert (tmp_path / "learning_curves.png").stat().st_size > 0
    assert main(["plot", "a", "b", "--out", "cmp/x.png"]) == 0 and (tmp_path / "cmp" / "x.png").is_file()
    assert main(["viz", "a", "b"]) == 0
    assert (tmp_path / "token_credit.html").read_text().count('class="tok"') == 2
    assert main(["viz", "a", "--series", "delta_v", "--steps", "1"]) == 0
    assert (tmp_path / "a" / "token_credit.html").is_file()
    capsys.readouterr()
    assert main(["viz", "a", "nothing"]) == 2
    assert "nothing/token_credit.jsonl' not found" in capsys.readouterr().err
