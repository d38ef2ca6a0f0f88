"""Base accuracy of SmolLM2-135M-Instruct on the arithmetic levels, before any training.

For each difficulty preset (megacredit/envs/arithmetic.py): N validation prompts x k samples at
the rollout sampling settings (temperature, no top-p) and at the validation ones (T = 0.6,
top-p 0.95), with the embedded engine; accuracy (avg@k) and the fraction of responses cut at
``max_new_tokens``. The replication's levels are chosen from this table (docs/results.md).

    .venv/bin/python tools/arithmetic_levels.py [--levels 1d+1d 2d+2d] [--max-new-tokens 32 96] [--stop-at-newline 0 1]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def measure(engine, tokenizer, env, records, params) -> dict[str, float]:
    """Accuracy, truncated fraction and mean length of one sampling of ``records`` (the trainer's
    own rollout and scoring: megacredit/trainer/rollout.py)."""
    from megacredit.trainer.rollout import generate, score

    batch = generate(engine, tokenizer, records, params)
    rewards = [result.reward for result in score(env, batch)]
    return {"accuracy": sum(rewards) / len(rewards),
            "truncated_frac": sum(reason == "length" for reason in batch.finish_reasons) / len(batch),
            "mean_length": sum(map(len, batch.response_ids)) / len(batch)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--levels", nargs="+", default=["1d+1d", "2d+1d", "2d+2d"])
    parser.add_argument("--max-new-tokens", nargs="+", type=int, default=[32, 96])
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--samples", type=int, default=4)
    parser.add_argument("--rollout-temperature", type=float, default=0.7)
    parser.add_argument("--stop-at-newline", nargs="+", type=int, choices=(0, 1), default=[1],
                        help="rollout.stop_at_newline off (0) and/or on (1)")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "arithmetic_levels.json"))
    args = parser.parse_args(argv)

    from transformers import AutoModelForCausalLM

    from megacredit.envs.arithmetic import ArithmeticEnv, generate_arithmetic_dataset
    from megacredit.rollout.base import SamplingParams
    from megacredit.rollout.embedded import EmbeddedRolloutEngine
    from megacredit.trainer.builder import load_tokenizer, resolve_hf_dir
    from megacredit.trainer.rollout import stop_token_ids

    hf_dir = resolve_hf_dir("smollm2-135m-instruct", "~/.cache/megacredit")
    tokenizer = load_tokenizer(str(hf_dir), "~/.cache/megacredit")
    model = AutoModelForCausalLM.from_pretrained(str(hf_dir)).float().eval()
    engine, env = EmbeddedRolloutEngine(model, max_batch_size=64), ArithmeticEnv()
    rows = []
    for level in args.levels:
        records = generate_arithmetic_dataset(args.prompts, seed=43, difficulty=level, id_prefix="val")
        for max_new in args.max_new_tokens:
            for stop_at_newline in args.stop_at_newline:
                for name, temperature, top_p in (("rollout", args.rollout_temperature, 1.0), ("validation", 0.6, 0.95)):
                    params = SamplingParams(temperature=temperature, top_p=top_p, max_new_tokens=max_new, n=args.samples,
                                            seed=0, stop_token_ids=stop_token_ids(tokenizer, bool(stop_at_newline)))
                    start = time.monotonic()
                    row = {"level": level, "max_new_tokens": max_new, "stop_at_newline": bool(stop_at_newline),
                           "sampling": name, "temperature": temperature,
                           **measure(engine, tokenizer, env, records, params), "seconds": time.monotonic() - start}
                    rows.append(row)
                    print(json.dumps(row), flush=True)
                    # after every row, so an interrupted measurement keeps what it finished
                    Path(args.out).write_text(json.dumps({"prompts": args.prompts, "samples": args.samples,
                                                          "rows": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
