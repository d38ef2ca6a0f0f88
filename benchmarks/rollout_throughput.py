"""Rollout throughput: the embedded engine vs transformers' generate, side by side.

Same model (SmolLM2-135M-Instruct, fp32), same left-padded batch of chat prompts, same
number of new tokens. Scenarios:

* ``greedy_fixed``: temperature 0, no EOS stop, every row generates max_new_tokens;
* ``sampled_fixed``: temperature 1 (no top-k / top-p), no EOS stop;
* ``sampled_eos``: temperature 1 with EOS stop (the realistic RL case: the engine drops
  finished rows from its batch; transformers keeps computing them). Tokens counted are the
  real ones, up to and including each row's EOS.

Usage: ``python benchmarks/rollout_throughput.py [--prompts 32] [--new-tokens 32] [--threads 1]``.
Writes benchmarks/results/rollout_throughput.json (machine named inside).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch
import transformers
from transformers import AutoTokenizer

from megacredit.models.smollm2 import smollm2_hf_dir
from megacredit.rollout.base import SamplingParams
from megacredit.rollout.embedded import EmbeddedRolloutEngine
from megacredit.rollout.sampling import left_pad

RESULTS = Path(__file__).resolve().parent / "results" / "rollout_throughput.json"


def machine_description() -> dict:
    cpu_model = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "hostname": platform.node(), "cpu_model": cpu_model, "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(), "python": platform.python_version(),
        "torch": torch.__version__, "transformers": transformers.__version__,
        "load_average_at_start": list(os.getloadavg()),
    }


def make_prompts(tokenizer, count: int) -> list[list[int]]:
    prompts = []
    for i in range(count):
        question = f"What is {7 + 3 * i} + {11 + 5 * i}?" if i % 2 else \
            f"Name {1 + i % 5} famous rivers in Europe and say which country each flows through."
        encoded = tokenizer.apply_chat_template(
            [{"role": "user", "content": question}], add_generation_prompt=True, tokenize=True)
        prompts.append(list(encoded["input_ids"] if hasattr(encoded, "keys") else encoded))
    return prompts


def generated_tokens_hf(rows: list[list[int]], eos_ids: set[int]) -> int:
    """Real tokens per row of a transformers generate output: up to and including EOS."""
    total = 0
    for row in rows:
        stop = next((k for k, t in enumerate(row) if t in eos_ids), None)
        total += len(row) if stop is None else stop + 1
    return total


def run_hf(engine, prompts, new_tokens, sample: bool, stop_on_eos: bool, seed: int):
    input_ids, mask = left_pad(prompts, engine.pad_token_id)
    sampling = dict(temperature=1.0, top_k=0, top_p=1.0) if sample else {}
    config = transformers.GenerationConfig(
        max_new_tokens=new_tokens, do_sample=sample, **sampling,
        eos_token_id=list(engine.eos_token_ids) if stop_on_eos else None,
        pad_token_id=engine.pad_token_id,
    )
    torch.manual_seed(seed)
    with torch.inference_mode():
        out = engine.model.generate(input_ids=input_ids, attention_mask=mask,
                                    generation_config=config)
    rows = out[:, input_ids.shape[1]:].tolist()
    eos = set(engine.eos_token_ids) if stop_on_eos else set()
    return rows, generated_tokens_hf(rows, eos)


def run_engine(engine, prompts, new_tokens, sample: bool, stop_on_eos: bool, seed: int):
    params = SamplingParams(
        temperature=1.0 if sample else 0.0, max_new_tokens=new_tokens, seed=seed,
        stop_token_ids=None if stop_on_eos else (),
    )
    outputs = engine.generate(prompts, params)
    return [o.token_ids for o in outputs], sum(len(o.token_ids) for o in outputs)


def timed_side_by_side(runners: dict, repeats: int) -> dict:
    """Median seconds of each runner; repeats interleave the runners so that load changes on
    a shared machine hit both alike. Returns {label: (median_seconds, last_result)}."""
    times: dict = {label: [] for label in runners}
    results: dict = {}
    for _ in range(repeats):
        for label, fn in runners.items():
            start = time.perf_counter()
            results[label] = fn()
            times[label].append(time.perf_counter() - start)
    return {label: (statistics.median(times[label]), results[label]) for label in runners}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--output", type=Path, default=RESULTS)
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads (default: torch's choice). On a shared machine 1 "
                             "thread avoids OpenMP barrier stalls when another job holds a core.")
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)

    folder = smollm2_hf_dir()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    engine = EmbeddedRolloutEngine.from_pretrained(folder, max_batch_size=args.prompts)
    prompts = make_prompts(tokenizer, args.prompts)
    report = {"machine": machine_description(), "model": "SmolLM2-135M-Instruct fp32",
              "prompts": args.prompts, "max_new_tokens": args.new_tokens,
              "prompt_lengths": [min(map(len, prompts)), max(map(len, prompts))],
              "repeats_median_of": args.repeats, "scenarios": {}}
    run_engine(engine, prompts[:2], 2, sample=False, stop_on_eos=False, seed=0)  # warm-up
    for name, sample, stop in (("greedy_fixed", False, False), ("sampled_fixed", True, False),
                               ("sampled_eos", True, True)):
        runners = {
            label: (lambda runner=runner: runner(engine, prompts, args.new_tokens, sample, stop, 0))
            for label, runner in (("embedded_engine", run_engine),
                                  ("transformers_generate", run_hf))
        }
        scenario = {}
        for label, (seconds, (rows, tokens)) in timed_side_by_side(runners, args.repeats).items():
            scenario[label] = {"seconds": round(seconds, 3), "generated_tokens": tokens,
                               "tokens_per_second": round(tokens / seconds, 1)}
            scenario[label + "_rows"] = rows
        if not sample:
            same = sum(a == b for a, b in zip(scenario["embedded_engine_rows"],
                                              scenario["transformers_generate_rows"]))
            scenario["identical_greedy_rows"] = f"{same}/{len(prompts)}"
        del scenario["embedded_engine_rows"], scenario["transformers_generate_rows"]
        scenario["speedup"] = round(scenario["embedded_engine"]["tokens_per_second"]
                                    / scenario["transformers_generate"]["tokens_per_second"], 2)
        report["scenarios"][name] = scenario
        print(name, json.dumps(scenario))
    report["machine"]["load_average_at_end"] = list(os.getloadavg())
    report["note"] = ("Shared 2-core machine: other jobs' load (see load averages) slows both "
                      "engines alike; compare the two columns of a scenario, not runs.")
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
