"""Rollout throughput: the embedded engine vs transformers' generate, side by side.

Same model (SmolLM2-135M-Instruct, fp32), same left-padded batch of chat prompts, same
number of new tokens. Scenarios:

* ``greedy_fixed``: temperature 0, no EOS stop, every row generates max_new_tokens;
* ``sampled_fixed``: temperature 1 (no top-k / top-p), no EOS stop;
* ``sampled_eos``: temperature 1 with EOS stop (the realistic RL case: the engine drops
  finished rows from its batch; transformers keeps computing them). Tokens counted are the
  real ones, up to and including each row's EOS.

Grouped scenarios (G samples per prompt, the RL rollout): the engine's shared prompt prefill
(one prefill per distinct prompt, its KV cache copied to the G samples) vs the engine's old
algorithm (``share_prompt_prefill=False``: one prefill per sample), same engine weights, same
seed, interleaved:

* ``grouped_demo``: the ``make demo`` rollout (examples/_smollm2_arithmetic_base.yaml): 8
  arithmetic prompts (the demo's generator and prompt template) x G = 4, T = 0.7, 16 new
  tokens, EOS stop, micro-batches of 32;
* ``grouped_chat``: 8 chat prompts x G = 8, T = 1, ``--new-tokens`` new tokens, EOS stop.

Each reports both timings, the speed-up, and how many samples are token-identical between the
two (float rounding of the smaller prefill batch may flip a rare near-tie; see
megacredit/rollout/embedded.py) with the largest log-prob difference on common prefixes.

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

from megacredit.data.templates import encode_student_prompt
from megacredit.envs.arithmetic import generate_arithmetic_dataset
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
    a shared machine hit both alike. Returns {label: (median_seconds, last_result, all_seconds)}."""
    times: dict = {label: [] for label in runners}
    results: dict = {}
    for _ in range(repeats):
        for label, fn in runners.items():
            start = time.perf_counter()
            results[label] = fn()
            times[label].append(time.perf_counter() - start)
    return {label: (statistics.median(times[label]), results[label], times[label]) for label in runners}


def engine_vs_transformers(engine, prompts, new_tokens: int, sample: bool, stop: bool, repeats: int) -> dict:
    """The embedded engine vs transformers' generate on one left-padded batch (n = 1)."""
    runners = {
        label: (lambda runner=runner: runner(engine, prompts, new_tokens, sample, stop, 0))
        for label, runner in (("embedded_engine", run_engine), ("transformers_generate", run_hf))
    }
    scenario, rows = {}, {}
    for label, (seconds, (label_rows, tokens), _) in timed_side_by_side(runners, repeats).items():
        scenario[label] = {"seconds": round(seconds, 3), "generated_tokens": tokens,
                           "tokens_per_second": round(tokens / seconds, 1)}
        rows[label] = label_rows
    if not sample:
        same = sum(a == b for a, b in zip(rows["embedded_engine"], rows["transformers_generate"]))
        scenario["identical_greedy_rows"] = f"{same}/{len(prompts)}"
    scenario["speedup"] = round(scenario["embedded_engine"]["tokens_per_second"]
                                / scenario["transformers_generate"]["tokens_per_second"], 2)
    return scenario


def demo_prompts(tokenizer, count: int) -> list[list[int]]:
    """Student prompts of the demo's arithmetic task (its generator, difficulty and template)."""
    records = generate_arithmetic_dataset(count, seed=42, difficulty="1d+1d", id_prefix="bench")
    return [encode_student_prompt(tokenizer, record) for record in records]


def compare_samples(new_outputs, old_outputs) -> dict:
    """Token-identical samples and the largest log-prob difference on each common prefix."""
    identical, largest = 0, 0.0
    for new, old in zip(new_outputs, old_outputs):
        common = 0
        while common < min(len(new.token_ids), len(old.token_ids)) and \
                new.token_ids[common] == old.token_ids[common]:
            common += 1
        identical += new.token_ids == old.token_ids
        diffs = [abs(a - b) for a, b in zip(new.logprobs[:common], old.logprobs[:common])]
        largest = max([largest, *diffs])
    return {"identical_samples": f"{identical}/{len(new_outputs)}", "max_abs_logprob_diff": largest}


def grouped_scenario(engine, prompts, params: SamplingParams, batch_size: int, repeats: int) -> dict:
    """Shared prompt prefill vs one prefill per sample, same weights and seed, interleaved."""
    shared = EmbeddedRolloutEngine(engine.model, max_batch_size=batch_size)
    per_sample = EmbeddedRolloutEngine(engine.model, max_batch_size=batch_size, share_prompt_prefill=False)
    runners = {"prefill_once_per_prompt": lambda: shared.generate(prompts, params),
               "prefill_per_sample": lambda: per_sample.generate(prompts, params)}
    scenario: dict = {"prompts": len(prompts), "group_size": params.n, "max_batch_size": batch_size,
                      "temperature": params.temperature, "max_new_tokens": params.max_new_tokens,
                      "prompt_lengths": [min(map(len, prompts)), max(map(len, prompts))]}
    timed = timed_side_by_side(runners, repeats)
    for label, (seconds, outputs, all_seconds) in timed.items():
        tokens = sum(len(o.token_ids) for o in outputs)
        scenario[label] = {"seconds": round(seconds, 3), "seconds_each_repeat": [round(t, 3) for t in all_seconds],
                           "generated_tokens": tokens, "tokens_per_second": round(tokens / seconds, 1)}
    scenario["speedup"] = round(scenario["prefill_once_per_prompt"]["tokens_per_second"]
                                / scenario["prefill_per_sample"]["tokens_per_second"], 2)
    once, per_sample = (timed[label][2] for label in ("prefill_once_per_prompt", "prefill_per_sample"))
    scenario["speedup_best_of_repeats"] = round(min(per_sample) / min(once), 2)
    scenario.update(compare_samples(timed["prefill_once_per_prompt"][1], timed["prefill_per_sample"][1]))
    return scenario


ENGINE_SCENARIOS = {"greedy_fixed": (False, False), "sampled_fixed": (True, False), "sampled_eos": (True, True)}
GROUPED_SCENARIOS = ("grouped_demo", "grouped_chat")


def grouped_settings(tokenizer, new_tokens: int) -> dict:
    """name -> (prompts, sampling params, max_batch_size) of the grouped scenarios."""
    return {
        "grouped_demo": (demo_prompts(tokenizer, 8), SamplingParams(temperature=0.7, max_new_tokens=16, n=4, seed=1), 32),
        "grouped_chat": (make_prompts(tokenizer, 8),
                         SamplingParams(temperature=1.0, max_new_tokens=new_tokens, n=8, seed=2), 64),
    }


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--output", type=Path, default=RESULTS)
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads (default: torch's choice). On a shared machine 1 "
                             "thread avoids OpenMP barrier stalls when another job holds a core.")
    parser.add_argument("--scenarios", default=",".join([*ENGINE_SCENARIOS, *GROUPED_SCENARIOS]),
                        help="comma-separated scenarios to run (default all); the others keep their "
                             "entries in an existing --output file")
    args = parser.parse_args()
    args.scenarios = [name.strip() for name in args.scenarios.split(",") if name.strip()]
    unknown = set(args.scenarios) - set(ENGINE_SCENARIOS) - set(GROUPED_SCENARIOS)
    if unknown:
        parser.error(f"unknown --scenarios {sorted(unknown)}; choose from {[*ENGINE_SCENARIOS, *GROUPED_SCENARIOS]}")
    return args


def main() -> None:
    args = parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    folder = smollm2_hf_dir()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    engine = EmbeddedRolloutEngine.from_pretrained(folder, max_batch_size=args.prompts)
    prompts = make_prompts(tokenizer, args.prompts)
    previous = json.loads(args.output.read_text()) if args.output.is_file() else {}
    report = {"machine": machine_description(), "model": "SmolLM2-135M-Instruct fp32",
              "prompts": args.prompts, "max_new_tokens": args.new_tokens,
              "prompt_lengths": [min(map(len, prompts)), max(map(len, prompts))],
              "repeats_median_of": args.repeats, "scenarios": dict(previous.get("scenarios", {}))}
    run_engine(engine, prompts[:2], 2, sample=False, stop_on_eos=False, seed=0)  # warm-up
    grouped = grouped_settings(tokenizer, args.new_tokens)
    for name in args.scenarios:
        load_before = os.getloadavg()[0]
        if name in ENGINE_SCENARIOS:
            scenario = engine_vs_transformers(engine, prompts, args.new_tokens, *ENGINE_SCENARIOS[name], args.repeats)
        else:
            scenario = grouped_scenario(engine, *grouped[name], args.repeats)
        scenario.update(threads=torch.get_num_threads(), repeats=args.repeats,
                        load_average_1min=[round(load_before, 2), round(os.getloadavg()[0], 2)],
                        measured=time.strftime("%Y-%m-%d %H:%M"))
        report["scenarios"][name] = scenario
        print(name, json.dumps(scenario))
    report["machine"]["load_average_at_end"] = list(os.getloadavg())
    report["note"] = ("Shared 2-core machine: other jobs' load (see load averages) slows both "
                      "columns alike; compare the two columns of a scenario, not runs. Each "
                      "scenario records when it was measured (--scenarios reruns a subset).")
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
