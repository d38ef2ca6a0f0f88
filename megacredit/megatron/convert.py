"""Checkpoint conversion: Hugging Face folder <-> Megatron distributed checkpoint (any TP x PP).

``hf_to_mcore_main(argv)`` and ``mcore_to_hf_main(argv)`` are the command-line entry points of
``tools/convert_hf_to_megatron.py``, ``tools/convert_megatron_to_hf.py`` and ``megacredit
convert hf-to-mcore|mcore-to-hf``. Each validates its input in the calling process (path,
config.json, supported architecture, TP/PP dividing the model), then launches ``tp * pp``
local processes (``torch.multiprocessing`` spawn, gloo on CPU / NCCL on GPU) that build the
Megatron model, load and save. A failure prints ONE line, ``<prog>: error: <problem>``, and
exits with status 1 (2 for bad command-line usage, argparse's convention).

Output of hf-to-mcore (a checkpoint root that ``megacredit.megatron.checkpoint.load_checkpoint``
and training resume accept)::

    OUT/latest, OUT/step_000000/...     the distributed checkpoint (model weights only)
    OUT/hf_config/                      config.json + tokenizer/generation files of the source
    OUT/megacredit_convert.json         source folder, layout, dtype, model_type

mcore-to-hf takes a root (latest step) or a step directory; the HF config comes from
``--hf-config`` or ``hf_config/`` beside the checkpoint.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

HF_CONFIG_SUBDIR = "hf_config"
CONVERT_METADATA = "megacredit_convert.json"
DTYPE_NAMES = ("float32", "bfloat16", "float16")
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".safetensors.index.json", ".bin.index.json")
_NO_TIMEOUT = 7 * 24 * 3600.0


class ConversionError(Exception):
    """A problem the user can fix (path, config, layout); printed as one line."""


@dataclass(frozen=True)
class ConversionJob:
    """Everything a conversion worker needs (picklable: sent to the spawned processes)."""

    source: str
    """HF folder (hf-to-mcore) or checkpoint step directory (mcore-to-hf)."""
    out: str
    """Output checkpoint root (hf-to-mcore) or HF folder (mcore-to-hf)."""
    hf_config_dir: str
    """Folder whose config.json describes the model."""
    tp: int
    """Tensor-parallel size of the launched job."""
    pp: int
    """Pipeline-parallel size of the launched job."""
    dtype: str
    """Parameter dtype of the Megatron model (one of DTYPE_NAMES)."""


def _log(prog: str, message: str) -> None:
    print(f"{prog}: {message}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------- validation
def _existing_dir(path: str, flag: str) -> Path:
    folder = Path(path)
    if not folder.exists():
        raise ConversionError(f"{flag} {folder} does not exist")
    if not folder.is_dir():
        raise ConversionError(f"{flag} {folder} is not a directory")
    return folder


def _load_hf_config(folder: Path, flag: str):
    """The transformers config of ``folder``; a clear error when it is not an HF model folder."""
    if not (folder / "config.json").is_file():
        raise ConversionError(f"{flag} {folder} is not a Hugging Face model folder (no config.json)")
    try:
        model_type = json.loads((folder / "config.json").read_text()).get("model_type")
    except json.JSONDecodeError as error:
        raise ConversionError(f"{folder / 'config.json'} is not valid JSON ({error})") from None
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(str(folder))
    except (ValueError, KeyError) as error:
        raise ConversionError(
            f"unsupported architecture model_type={model_type!r} in {folder / 'config.json'} "
            f"(transformers cannot read it: {str(error).splitlines()[0]})"
        ) from None


def _check_buildable(hf_config: Any, tp: int, pp: int) -> None:
    """Architecture supported and TP/PP dividing heads/layers (the provider's own checks)."""
    from megacredit.megatron.model_provider import UnsupportedArchitectureError, transformer_config_from_hf

    try:
        transformer_config_from_hf(hf_config, tp=tp, pp=pp)
    except UnsupportedArchitectureError as error:
        raise ConversionError(str(error)) from None
    except ValueError as error:
        raise ConversionError(str(error).splitlines()[0]) from None


def _prepare_out_dir(out: str, force: bool) -> Path:
    folder = Path(out)
    if folder.exists() and any(folder.iterdir()):
        if not force:
            raise ConversionError(f"--out {folder} exists and is not empty; pass --force to replace it")
        shutil.rmtree(folder)
    return folder


def _dtype_name(requested: str, hf_config: Any) -> str:
    if requested != "auto":
        return requested
    stored = getattr(hf_config, "dtype", None) or getattr(hf_config, "torch_dtype", None)
    name = str(stored).replace("torch.", "") if stored is not None else "float32"
    return name if name in DTYPE_NAMES else "float32"


# ---------------------------------------------------------------------------------- workers
def _progress(prog: str, ctx, index: int, total: int, name: str) -> None:
    if ctx.rank == 0:
        _log(prog, f"[rank 0: {index}/{total}] {name}")


def _quiet_library_warnings() -> None:
    """Library warnings in the workers (no Apex/TE, deprecations; repeated per rank) would
    drown the progress lines; the conversion itself reports errors as exceptions."""
    import warnings

    for category in (UserWarning, FutureWarning, DeprecationWarning):
        warnings.filterwarnings("ignore", category=category)


def _build(job: ConversionJob):
    _quiet_library_warnings()
    import torch

    from megacredit.megatron import distributed
    from megacredit.megatron.model_provider import build_gpt_model

    ctx = distributed.initialize(job.tp, job.pp)
    hf_config = _load_hf_config(Path(job.hf_config_dir), "--hf-config")
    chunks = [build_gpt_model(hf_config, ctx, dtype=getattr(torch, job.dtype))]
    return ctx, hf_config, chunks


def _hf_to_mcore_worker(rank: int, world_size: int, job: ConversionJob) -> None:
    import torch

    from megacredit.megatron.bridge_load import HFTensorSource, iter_local_shards
    from megacredit.megatron.checkpoint import save_checkpoint

    try:
        ctx, hf_config, chunks = _build(job)
        with torch.no_grad(), HFTensorSource(job.source) as source:
            shards = list(iter_local_shards(chunks, source, hf_config, ctx))
            for index, (name, param, shard) in enumerate(shards, start=1):
                param.copy_(shard.to(device=param.device, dtype=param.dtype))
                _progress("hf-to-mcore", ctx, index, len(shards), name)
        _progress("hf-to-mcore", ctx, len(shards), len(shards), f"saving distributed checkpoint to {job.out}")
        save_checkpoint(chunks, None, ctx, job.out, step=0, save_rng=False,
                        extra_state={"converted_from": job.source})
    except (ValueError, KeyError, FileNotFoundError) as error:
        raise ConversionError(f"{type(error).__name__}: {str(error).splitlines()[0]}") from error


def _mcore_to_hf_worker(rank: int, world_size: int, job: ConversionJob) -> None:
    from megacredit.megatron.bridge import save_hf_pretrained
    from megacredit.megatron.checkpoint import CheckpointError, load_checkpoint

    try:
        ctx, hf_config, chunks = _build(job)
        _progress("mcore-to-hf", ctx, 1, 3, f"loading {job.source}")
        load_checkpoint(chunks, None, ctx, job.source, load_optimizer=False, load_rng=False)
        _progress("mcore-to-hf", ctx, 2, 3, f"gathering full tensors and writing {job.out}")
        save_hf_pretrained(chunks, hf_config, ctx, job.out, tokenizer_dir=job.hf_config_dir)
        _progress("mcore-to-hf", ctx, 3, 3, "done")
    except CheckpointError as error:
        raise ConversionError(
            f"checkpoint {job.source} does not match the config in {job.hf_config_dir}: "
            f"{str(error).splitlines()[0]}"
        ) from error


def _launch(worker, job: ConversionJob, prog: str) -> None:
    """Run ``worker`` on tp*pp local processes; a worker's ConversionError becomes ours."""
    from megacredit.utils.spawn import run_distributed

    world_size = job.tp * job.pp
    _log(prog, f"launching {world_size} process(es) (tp={job.tp}, pp={job.pp})")
    try:
        run_distributed(worker, world_size=world_size, timeout=_NO_TIMEOUT, job=job)
    except RuntimeError as error:
        text = str(error)
        found = re.findall(r"ConversionError: (.+)", text)
        lines = [line for line in text.splitlines() if line.strip()]
        raise ConversionError(found[-1] if found else (lines[-1] if lines else text)) from None


# ------------------------------------------------------------------------------ entry points
def _add_layout_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tp", type=int, default=1, help="tensor-parallel size (default 1)")
    parser.add_argument("--pp", type=int, default=1, help="pipeline-parallel size (default 1)")
    parser.add_argument("--force", action="store_true", help="replace a non-empty --out")


def _hf_to_mcore_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="convert_hf_to_megatron",
        description="Convert a Hugging Face model folder (safetensors) into a Megatron-Core "
        "distributed checkpoint, launched on tp*pp local processes.",
    )
    parser.add_argument("--hf-dir", required=True, help="Hugging Face model folder (config.json + *.safetensors)")
    parser.add_argument("--out", required=True, help="output checkpoint root")
    _add_layout_arguments(parser)
    parser.add_argument("--dtype", default="auto", choices=("auto", *DTYPE_NAMES),
                        help="parameter dtype (default: the config's dtype, else float32)")
    return parser


def _copy_hf_side_files(hf_dir: Path, target: Path) -> None:
    """config.json, tokenizer and generation files (everything but weights)."""
    target.mkdir(parents=True, exist_ok=True)
    for file in sorted(hf_dir.iterdir()):
        if file.is_file() and not file.name.endswith(_WEIGHT_SUFFIXES):
            shutil.copy2(file, target / file.name)


def _run_hf_to_mcore(args: argparse.Namespace, prog: str) -> None:
    hf_dir = _existing_dir(args.hf_dir, "--hf-dir")
    hf_config = _load_hf_config(hf_dir, "--hf-dir")
    _check_buildable(hf_config, args.tp, args.pp)
    if not list(hf_dir.glob("*.safetensors")):
        raise ConversionError(f"--hf-dir {hf_dir} holds no *.safetensors weights (re-save with safe_serialization=True)")
    out = _prepare_out_dir(args.out, args.force)
    dtype = _dtype_name(args.dtype, hf_config)
    job = ConversionJob(str(hf_dir.resolve()), str(out), str(hf_dir), args.tp, args.pp, dtype)
    _launch(_hf_to_mcore_worker, job, prog)
    _copy_hf_side_files(hf_dir, out / HF_CONFIG_SUBDIR)
    metadata = {"source_hf_dir": job.source, "tp": job.tp, "pp": job.pp, "dtype": dtype,
                "model_type": hf_config.model_type, "created": time.strftime("%Y-%m-%dT%H:%M:%S")}
    (out / CONVERT_METADATA).write_text(json.dumps(metadata, indent=1))


def _mcore_to_hf_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="convert_megatron_to_hf",
        description="Convert a Megatron-Core distributed checkpoint (from convert_hf_to_megatron "
        "or training) into a Hugging Face model folder, loading it at --tp/--pp.",
    )
    parser.add_argument("--mcore-dir", required=True, help="checkpoint root (latest step) or a step_N directory")
    parser.add_argument("--out", required=True, help="output Hugging Face folder")
    parser.add_argument("--hf-config", default=None,
                        help="folder with the model's config.json (default: hf_config/ beside the checkpoint)")
    _add_layout_arguments(parser)
    return parser


def _find_hf_config_dir(step_dir: Path, explicit: str | None) -> Path:
    if explicit is not None:
        return _existing_dir(explicit, "--hf-config")
    for candidate in (step_dir.parent / HF_CONFIG_SUBDIR, step_dir / HF_CONFIG_SUBDIR):
        if (candidate / "config.json").is_file():
            return candidate
    raise ConversionError(
        f"no {HF_CONFIG_SUBDIR}/config.json beside {step_dir}; pass --hf-config with the HF folder "
        f"the checkpoint was made from"
    )


def _run_mcore_to_hf(args: argparse.Namespace, prog: str) -> None:
    from megacredit.megatron.checkpoint import CheckpointError, read_checkpoint_info, resolve_checkpoint

    _existing_dir(args.mcore_dir, "--mcore-dir")
    try:
        step_dir = resolve_checkpoint(args.mcore_dir)
    except CheckpointError as error:
        raise ConversionError(str(error)) from None
    config_dir = _find_hf_config_dir(step_dir, args.hf_config)
    hf_config = _load_hf_config(config_dir, "--hf-config")
    _check_buildable(hf_config, args.tp, args.pp)
    dtype = read_checkpoint_info(step_dir).get("params_dtype", "float32")
    out = _prepare_out_dir(args.out, args.force)
    _launch(_mcore_to_hf_worker, ConversionJob(str(step_dir), str(out), str(config_dir), args.tp, args.pp, dtype), prog)


def _main(parser: argparse.ArgumentParser, run, argv: Sequence[str] | None) -> int:
    args = parser.parse_args(argv)
    started = time.monotonic()
    try:
        run(args, parser.prog)
    except ConversionError as error:
        print(f"{parser.prog}: error: {error}", file=sys.stderr)
        return 1
    _log(parser.prog, f"wrote {args.out} in {time.monotonic() - started:.1f} s")
    return 0


def hf_to_mcore_main(argv: Sequence[str] | None = None) -> int:
    """``convert_hf_to_megatron --hf-dir DIR --out DIR [--tp N] [--pp N] [--dtype D] [--force]``."""
    return _main(_hf_to_mcore_parser(), _run_hf_to_mcore, argv)


def mcore_to_hf_main(argv: Sequence[str] | None = None) -> int:
    """``convert_megatron_to_hf --mcore-dir DIR --out DIR [--hf-config DIR] [--tp N] [--pp N]``."""
    return _main(_mcore_to_hf_parser(), _run_mcore_to_hf, argv)
