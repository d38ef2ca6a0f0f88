"""The ``megacredit`` command line.

  megacredit train CONFIG [key.sub=value ...]      run training (megacredit.trainer.loop.train)
  megacredit config show CONFIG [key.sub=value ...] print the resolved, validated config
  megacredit convert hf-to-mcore ARGS...           HF checkpoint -> Megatron (see --help)
  megacredit convert mcore-to-hf ARGS...           Megatron checkpoint -> HF (see --help)
  megacredit plot RUN_DIR                          (re)draw learning curve + token-credit page

A configuration error prints one line naming the key and exits with status 2.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import warnings
from pathlib import Path
from typing import Callable, Sequence

from megacredit.trainer.config_parsing import ConfigError, ConfigWarning

EXIT_CONFIG_ERROR = 2
EXIT_MISSING_COMPONENT = 1
CONVERTERS = {
    "hf-to-mcore": ("megacredit.megatron.convert", "hf_to_mcore_main"),
    "mcore-to-hf": ("megacredit.megatron.convert", "mcore_to_hf_main"),
}


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="megacredit",
        description="On-policy self-distillation RL (GRPO, SDPO, CREDIT, RLSD) on Megatron-Core.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    train = commands.add_parser("train", help="train with a YAML config and key=value overrides")
    train.add_argument("config", help="YAML config file (see examples/)")
    train.add_argument("overrides", nargs="*", help="overrides such as training.steps=10")

    config = commands.add_parser("config", help="inspect a configuration")
    config_commands = config.add_subparsers(dest="config_command", required=True, metavar="ACTION")
    show = config_commands.add_parser("show", help="print the resolved config as YAML")
    show.add_argument("config", help="YAML config file")
    show.add_argument("overrides", nargs="*", help="overrides such as algorithm.name=rlsd")

    convert = commands.add_parser("convert", help="convert checkpoints between HF and Megatron")
    convert.add_argument("direction", choices=sorted(CONVERTERS), help="conversion direction")
    convert.add_argument("args", nargs=argparse.REMAINDER, help="arguments of the converter")

    plot = commands.add_parser("plot", help="draw learning_curve.png and token_credit.html")
    plot.add_argument("run_dir", help="a run directory holding metrics.jsonl")
    return parser


def _lazy_attr(module_name: str, attr: str, what: str) -> Callable:
    """Import ``module_name.attr``; a missing module gives a one-line error (exit 1)."""
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name and module_name.startswith(exc.name):
            raise SystemExit(_fail(f"{what} needs {module_name}.{attr}, but module "
                                   f"'{module_name}' is not available ({exc})",
                                   EXIT_MISSING_COMPONENT)) from None
        raise
    if not hasattr(module, attr):
        raise SystemExit(_fail(f"{what} needs {module_name}.{attr}, which does not exist",
                               EXIT_MISSING_COMPONENT))
    return getattr(module, attr)


def _fail(message: str, code: int) -> int:
    print(f"megacredit: error: {message}", file=sys.stderr)
    return code


def _cmd_train(args: argparse.Namespace) -> int:
    from megacredit.trainer.config import load_config

    cfg = load_config(args.config, args.overrides)
    train = _lazy_attr("megacredit.trainer.loop", "train", "megacredit train")
    result = train(cfg)
    return result if isinstance(result, int) else 0


def _cmd_config_show(args: argparse.Namespace) -> int:
    from megacredit.trainer.config import config_to_yaml, load_config

    cfg = load_config(args.config, args.overrides)
    sys.stdout.write(config_to_yaml(cfg))
    return 0


def _cmd_convert(args: argparse.Namespace) -> int:
    module_name, attr = CONVERTERS[args.direction]
    converter = _lazy_attr(module_name, attr, f"megacredit convert {args.direction}")
    result = converter(list(args.args))
    return result if isinstance(result, int) else 0


def _cmd_plot(args: argparse.Namespace) -> int:
    from megacredit.trainer.metrics import METRICS_FILE
    from megacredit.trainer.visualize import render_run

    run_dir = Path(args.run_dir)
    if not (run_dir / METRICS_FILE).is_file():
        return _fail(f"'{run_dir / METRICS_FILE}' not found: is '{run_dir}' a megacredit run "
                     "directory?", 2)
    for path in render_run(run_dir):
        print(path)
    return 0


def _show_config_warnings_in_one_line() -> None:
    """Print ConfigWarnings as ``megacredit: warning: ...``; other warnings as usual."""
    default = warnings.showwarning

    def show(message, category, filename, lineno, file=None, line=None):
        if issubclass(category, ConfigWarning):
            print(f"megacredit: warning: {message}", file=sys.stderr)
        else:
            default(message, category, filename, lineno, file, line)

    warnings.showwarning = show


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``megacredit`` console script; returns the exit status."""
    args = _build_parser().parse_args(argv)
    if argv is None:  # the console script, not a library call
        _show_config_warnings_in_one_line()
        if args.command == "train":  # before torch allocates anything large
            from megacredit.utils.malloc import tune_glibc_malloc

            tune_glibc_malloc()
    handlers = {
        "train": _cmd_train,
        "config": _cmd_config_show,
        "convert": _cmd_convert,
        "plot": _cmd_plot,
    }
    try:
        return handlers[args.command](args)
    except ConfigError as exc:
        return _fail(f"config error: {exc}", EXIT_CONFIG_ERROR)


if __name__ == "__main__":
    sys.exit(main())
