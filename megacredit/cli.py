"""The ``megacredit`` command line.

  megacredit train CONFIG [key.sub=value ...]      run training (megacredit.trainer.loop.train)
  megacredit config show CONFIG [key.sub=value ...] print the resolved, validated config
                 [--world-size N] [--check-paths]  (layout for N ranks; data files must exist)
  megacredit convert hf-to-mcore ARGS...           HF checkpoint -> Megatron (see --help)
  megacredit convert mcore-to-hf ARGS...           Megatron checkpoint -> HF (see --help)
  megacredit plot RUN_DIR [RUN_DIR ...] [--out PNG] (re)draw learning curves (several runs: overlaid)
  megacredit viz RUN_DIR [RUN_DIR ...] [--out HTML] token-credit heatmaps, runs side by side

A setup error (config, data row, model folder, checkpoint, TP x PP vs the processes started,
run directory) prints one line, ``megacredit: error: ...``, and exits with status 2.
``--debug`` (or the environment variable MEGACREDIT_DEBUG=1) shows the full traceback instead.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
import warnings
from pathlib import Path
from typing import Callable, Sequence

from megacredit.config.parsing import ConfigError, ConfigWarning
from megacredit.utils.errors import SetupError

EXIT_CONFIG_ERROR = 2
EXIT_MISSING_COMPONENT = 1
DEBUG_ENV = "MEGACREDIT_DEBUG"
CONVERTERS = {
    "hf-to-mcore": ("megacredit.megatron.convert", "hf_to_mcore_main"),
    "mcore-to-hf": ("megacredit.megatron.convert", "mcore_to_hf_main"),
}


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="megacredit",
        description="On-policy self-distillation RL (GRPO, SDPO, CREDIT, RLSD) on Megatron-Core.",
    )
    parser.add_argument("--debug", action="store_true", default=_debug_from_env(),
                        help="show the full traceback of an error (also: MEGACREDIT_DEBUG=1)")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    train = commands.add_parser("train", help="train with a YAML config and key=value overrides")
    train.add_argument("config", help="YAML config file (see examples/)")
    train.add_argument("overrides", nargs="*", help="overrides such as training.steps=10")

    config = commands.add_parser("config", help="inspect a configuration")
    config_commands = config.add_subparsers(dest="config_command", required=True, metavar="ACTION")
    show = config_commands.add_parser("show", help="print the resolved config as YAML")
    show.add_argument("config", help="YAML config file")
    show.add_argument("overrides", nargs="*", help="overrides such as algorithm.name=rlsd")
    show.add_argument("--check-paths", action="store_true",
                      help="also require data files and the resume path to exist on this machine")
    show.add_argument("--world-size", type=int, default=None, metavar="N",
                      help="check the layout for N ranks and print it (TP x PP x DP) as a comment")

    plan = commands.add_parser("plan", help="memory per GPU of a config's layout: fits or not, and which knob to turn")
    plan.add_argument("config", help="YAML config file")
    plan.add_argument("overrides", nargs="*", help="overrides such as parallel.recompute=full")
    plan.add_argument("--gpus-per-node", type=int, default=8, metavar="N")
    plan.add_argument("--nodes", type=int, default=1, metavar="M")
    plan.add_argument("--gpu-mem-gb", type=float, default=80.0, metavar="G", help="GB (1e9 bytes) per GPU")
    plan.add_argument("--reserve-gb", type=float, default=3.0, metavar="R",
                      help="per GPU for the CUDA context, NCCL and fragmentation (default 3)")
    plan.add_argument("--kernels", choices=("fused", "cpu"), default="fused",
                      help="fused: Transformer Engine on GPUs (default); cpu: the local spec on a CPU")

    convert = commands.add_parser("convert", help="convert checkpoints between HF and Megatron")
    convert.add_argument("direction", choices=sorted(CONVERTERS), help="conversion direction")
    convert.add_argument("args", nargs=argparse.REMAINDER, help="arguments of the converter")

    plot = commands.add_parser("plot", help="draw learning curves (one run: also its token_credit.html)")
    plot.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run directories holding metrics.jsonl")
    plot.add_argument("--out", help="PNG path (default: RUN_DIR/learning_curve.png for one run, "
                      "./learning_curves.png for several)")

    viz = commands.add_parser("viz", help="one HTML page of per-token credit heatmaps, runs side by side")
    viz.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run directories holding token_credit.jsonl")
    viz.add_argument("--out", help="HTML path (default: RUN_DIR/token_credit.html for one run, "
                     "./token_credit.html for several)")
    viz.add_argument("--series", nargs="+", help="only these per-token series (e.g. delta_v s_t r_t rlsd_weight)")
    viz.add_argument("--steps", nargs="+", type=int, help="only these training steps")
    for sub in (train, show, plan, plot, viz):  # --debug also after the command
        sub.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    return parser


def _debug_from_env() -> bool:
    return os.environ.get(DEBUG_ENV, "").strip().lower() not in ("", "0", "false", "no", "off")


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
    from megacredit.config import load_config

    cfg = load_config(args.config, args.overrides)
    train = _lazy_attr("megacredit.trainer.loop", "train", "megacredit train")
    result = train(cfg)
    return result if isinstance(result, int) else 0


def _cmd_config_show(args: argparse.Namespace) -> int:
    from megacredit.config import config_to_yaml, load_config

    cfg = load_config(args.config, args.overrides, check_paths=args.check_paths)
    if args.world_size is not None:
        par = cfg.parallel
        dp = par.data_parallel_size(args.world_size)  # ConfigError when TP * PP does not divide N
        print(f"# layout: {args.world_size} ranks = TP {par.tensor_model_parallel_size} x "
              f"PP {par.pipeline_model_parallel_size} x DP {dp}")
    sys.stdout.write(config_to_yaml(cfg))
    return 0


def _cmd_plan(args: argparse.Namespace) -> int:
    from megacredit.config import load_config
    from megacredit.planning.report import make_plan, render

    cfg = load_config(args.config, args.overrides, check_paths=False)  # planned for another machine
    plan = make_plan(cfg, args.gpus_per_node, args.nodes, args.gpu_mem_gb, args.reserve_gb, args.kernels)
    print(render(cfg, plan))
    return 0 if plan.fits else 3


def _cmd_convert(args: argparse.Namespace) -> int:
    module_name, attr = CONVERTERS[args.direction]
    converter = _lazy_attr(module_name, attr, f"megacredit convert {args.direction}")
    result = converter(list(args.args))
    return result if isinstance(result, int) else 0


def _cmd_plot(args: argparse.Namespace) -> int:
    from megacredit.reporting.metrics import METRICS_FILE
    from megacredit.reporting.visualize import plot_runs, render_run

    for run_dir in map(Path, args.run_dirs):
        if run_dir.is_file():
            return _fail(f"'{run_dir}' is a file; give a run directory (the one holding {METRICS_FILE})", 2)
        if not (run_dir / METRICS_FILE).is_file():
            return _fail(f"'{run_dir / METRICS_FILE}' not found: is '{run_dir}' a megacredit run "
                         "directory?", 2)
    written = (render_run(args.run_dirs[0]) if len(args.run_dirs) == 1 and not args.out
               else [plot_runs(args.run_dirs, args.out or "learning_curves.png")])
    for path in written:
        print(path)
    return 0


def _cmd_viz(args: argparse.Namespace) -> int:
    from megacredit.reporting.token_heatmap import write_heatmap_page
    from megacredit.reporting.visualize import TOKEN_CREDIT_HTML_FILE

    default = Path(args.run_dirs[0]) / TOKEN_CREDIT_HTML_FILE if len(args.run_dirs) == 1 else TOKEN_CREDIT_HTML_FILE
    try:
        print(write_heatmap_page(args.run_dirs, args.out or default, args.series, args.steps))
    except FileNotFoundError as exc:
        return _fail(str(exc), 2)
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


def _show_package_log_warnings() -> None:
    """megacredit's logged warnings (skipped rows, damaged checkpoints) as ``megacredit: warning:``."""
    package_logger = logging.getLogger("megacredit")
    if package_logger.handlers:
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setLevel(logging.WARNING)
    handler.setFormatter(logging.Formatter("megacredit: warning: %(message)s"))
    package_logger.addHandler(handler)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``megacredit`` console script; returns the exit status."""
    args = _build_parser().parse_args(argv)
    if argv is None:  # the console script, not a library call
        _show_config_warnings_in_one_line()
        _show_package_log_warnings()
        if args.command == "train":  # before torch allocates anything large
            from megacredit.utils.cpu_threads import limit_threads_per_local_rank
            from megacredit.utils.malloc import tune_glibc_malloc

            tune_glibc_malloc()
            limit_threads_per_local_rank()  # several ranks on one node's cores (srun): a share each
    handlers = {
        "train": _cmd_train,
        "config": _cmd_config_show,
        "plan": _cmd_plan,
        "convert": _cmd_convert,
        "plot": _cmd_plot,
        "viz": _cmd_viz,
    }
    try:
        return handlers[args.command](args)
    except SetupError as exc:
        if args.debug:
            raise
        # Other setup errors (DatasetRowError: file, row and field) carry their whole story.
        prefix = "config error: " if isinstance(exc, ConfigError) else ""
        return _fail(f"{prefix}{exc}", EXIT_CONFIG_ERROR)


if __name__ == "__main__":
    sys.exit(main())
