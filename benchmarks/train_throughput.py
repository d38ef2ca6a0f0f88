"""Training throughput: megacredit's Megatron path vs plain transformers, same model and batch.

What is measured: SmolLM2-135M-Instruct in fp32 on the same B x S tokens (default 28 x 64 =
1,792), loss = mean next-token negative log-likelihood over every position of every sequence:

* megacredit: the trainer's own path -- the actor built by ``megacredit.trainer.builder``
  (Megatron-Core GPTModel, local layer spec with packed attention, DDP, Megatron's Adam with
  clip_grad 1.0), the sequences packed into one micro-batch and run through
  ``megacredit.megatron.rl_passes.run_packed_schedule`` with the chunked vocab-parallel head;
* transformers: ``AutoModelForCausalLM`` (its default attention), ``[B, S]`` input, full
  logits and ``cross_entropy``, ``clip_grad_norm_(1.0)`` and ``torch.optim.AdamW`` (same
  hyperparameters).

Two passes each: forward only (no grad) and forward + backward + optimizer step. Each side runs
in its own long-lived process (the Megatron side with the CPU compatibility layer on, the
transformers side without it), driven in alternation (megacredit, transformers, then the other
order, ...) after one unmeasured warm-up of each pass. Reported: tokens/s (median over the
repeats and its range), the per-repeat ratio megacredit / transformers (and the ratio of the
fastest repeats, the least disturbed on a loaded machine), and the fraction of the machine's
fp32 matmul peak (best of a 2048^3 matmul, measured by each worker) reached by the model's
matmul FLOPs (2 x parameters used in matmuls x tokens per forward, plus
attention's QK^T and AV; 3x that for forward + backward). Both losses are printed to show the
same work was done.

Run: ``.venv/bin/python benchmarks/train_throughput.py [--quick] [--repeats N]``; writes
benchmarks/results/train_throughput.json and the ``train_throughput`` table of
benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common  # noqa: E402

LR, BETAS, EPS, CLIP = 2e-5, (0.9, 0.999), 1e-8, 1.0


def batch_tokens(num_sequences: int, seq_len: int, vocab: int):
    """The same fixed token ids on both sides."""
    import torch

    return torch.randint(0, vocab, (num_sequences, seq_len), generator=torch.Generator().manual_seed(0))


def matmul_flops_per_token(hf_config, seq_len: int) -> float:
    """Forward FLOPs per token of the matmuls (projections, MLP, LM head) and causal attention."""
    hidden, layers = hf_config.hidden_size, hf_config.num_hidden_layers
    heads, kv_heads = hf_config.num_attention_heads, hf_config.num_key_value_heads
    head_dim = getattr(hf_config, "head_dim", None) or hidden // heads
    projections = hidden * head_dim * (2 * heads + 2 * kv_heads)
    mlp = 3 * hidden * hf_config.intermediate_size
    attention = 2 * heads * head_dim * (seq_len + 1) / 2  # QK^T and AV over the causal half, per token
    return 2 * (layers * (projections + mlp) + hidden * hf_config.vocab_size) + 2 * layers * attention


# ----------------------------------------------------------------------------- the two sides
class MegacreditSide:
    def __init__(self, tokens) -> None:
        from megacredit.megatron.distributed import initialize
        from megacredit.trainer import builder
        from megacredit.config import load_config
        from megacredit.data.packing import SequenceToPack, pack_sequences

        cfg = load_config(str(_common.REPO / "examples" / "grpo_smollm2_arithmetic.yaml"),
                          [f"optimizer.lr={LR}", f"optimizer.clip_grad={CLIP}",
                           f"parallel.micro_batch_tokens={tokens.numel()}"])
        ctx = initialize(1, 1, seed=0)
        self.actor = builder.build_actor(cfg, ctx, builder.resolve_model(cfg))
        sequences = [[SequenceToPack(("s", i), tuple(row.tolist()), 1)] for i, row in enumerate(tokens)]
        self.micro_batches = pack_sequences(sequences, tokens.numel())
        self.num_predictions = tokens.shape[0] * (tokens.shape[1] - 1)

    def _run(self, forward_only: bool) -> float:
        from megacredit.megatron.optimizer import optimizer_step, zero_grads
        from megacredit.megatron.rl_passes import run_packed_schedule

        actor = self.actor

        def callback(hidden, micro_batch):
            out = actor.head(hidden, sampled_ids=micro_batch.target_ids)
            loss = -out.sampled_logprobs.sum() / self.num_predictions
            return loss if forward_only else (loss, {"loss": loss.detach()})

        for chunk in actor.model_chunks:
            chunk.train(not forward_only)
        if forward_only:
            return float(sum(run_packed_schedule(actor.model_chunks, self.micro_batches, callback, True)))
        zero_grads(actor.model_chunks, actor.optimizer)
        outputs = run_packed_schedule(actor.model_chunks, self.micro_batches, callback, False)
        optimizer_step(actor.optimizer)
        return float(sum(metrics["loss"] for metrics in outputs))

    def forward(self) -> float:
        return self._run(True)

    def train(self) -> float:
        return self._run(False)


class TransformersSide:
    def __init__(self, tokens) -> None:
        import torch
        from transformers import AutoModelForCausalLM

        from megacredit.models.smollm2 import smollm2_hf_dir

        self.model = AutoModelForCausalLM.from_pretrained(str(smollm2_hf_dir()), dtype=torch.float32)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=LR, betas=BETAS, eps=EPS, weight_decay=0.0)
        self.tokens = tokens

    def _loss(self):
        import torch.nn.functional as F

        logits = self.model(input_ids=self.tokens).logits[:, :-1]
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), self.tokens[:, 1:].reshape(-1))

    def forward(self) -> float:
        import torch

        self.model.eval()
        with torch.no_grad():
            return float(self._loss())

    def train(self) -> float:
        import torch

        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        loss = self._loss()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), CLIP)
        self.optimizer.step()
        return float(loss)


def worker_main(read_fd: int, write_fd: int, side: str, num_sequences: int, seq_len: int, threads: int) -> None:
    import torch

    torch.set_num_threads(threads)
    from transformers import AutoConfig

    from megacredit.models.smollm2 import smollm2_hf_dir

    hf_config = AutoConfig.from_pretrained(str(smollm2_hf_dir()))
    tokens = batch_tokens(num_sequences, seq_len, hf_config.vocab_size)
    runner = (MegacreditSide if side == "megacredit" else TransformersSide)(tokens)
    for name in ("forward", "train"):  # the unmeasured warm-up
        getattr(runner, name)()

    def handle(command: str):
        if command == "peak":
            return _common.matmul_peak_gflops()
        start = time.perf_counter()
        loss = getattr(runner, command)()
        return {"seconds": time.perf_counter() - start, "loss": loss}

    _common.serve(read_fd, write_fd, handle)


# ----------------------------------------------------------------------------- driver
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--worker", nargs=2, type=int, help=argparse.SUPPRESS)
    parser.add_argument("--side", choices=("megacredit", "transformers"), help=argparse.SUPPRESS)
    parser.add_argument("--sequences", type=int, default=28)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2, help="torch threads of each worker (default 2)")
    parser.add_argument("--repeats", type=int, default=None, help="interleaved repeats (default 5, quick 3)")
    parser.add_argument("--quick", action="store_true", help="fewer repeats")
    args = parser.parse_args()
    if args.worker:
        worker_main(*args.worker, args.side, args.sequences, args.seq_len, args.threads)
        return
    repeats = args.repeats or (3 if args.quick else 5)
    from transformers import AutoConfig

    from megacredit.models.smollm2 import smollm2_hf_dir

    hf_config = AutoConfig.from_pretrained(str(smollm2_hf_dir()))
    tokens = args.sequences * args.seq_len
    flops = matmul_flops_per_token(hf_config, args.seq_len) * tokens
    sides = ("megacredit", "transformers")
    log = _common.RESULTS_DIR / "train_throughput.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    log.write_text("")
    common_args = ["--sequences", str(args.sequences), "--seq-len", str(args.seq_len), "--threads", str(args.threads)]
    workers = {}
    try:
        for side in sides:
            workers[side] = _common.Worker(__file__, [*common_args, "--side", side], log=log)
        peaks = {side: workers[side].request(command="peak") for side in sides}
        samples = {(side, p): [] for side in sides for p in ("forward", "train")}
        for repeat in range(repeats):
            for name in ("forward", "train"):
                for side in (sides if repeat % 2 == 0 else sides[::-1]):
                    samples[side, name].append(workers[side].request(command=name))
            print(f"repeat {repeat + 1}/{repeats}:", {f"{s}/{p}": round(v[-1]["seconds"], 2) for (s, p), v in samples.items()},
                  flush=True)
    finally:
        for worker in workers.values():
            worker.close()
    peak = max(peaks.values())
    passes = {}
    for name, factor in (("forward", 1), ("train", 3)):
        per_side = {}
        for side in sides:
            seconds = [s["seconds"] for s in samples[side, name]]
            stats = _common.spread([tokens / s for s in seconds])
            per_side[side] = {"tokens_per_s": stats, "seconds": _common.spread(seconds),
                              # achieved matmul GFLOP/s = factor * flops per batch * batches per second
                              "fraction_of_matmul_peak": factor * flops * stats["median"] / tokens / 1e9 / peak,
                              "loss": samples[side, name][-1]["loss"]}
        ratio = _common.ratio_spread([s["seconds"] for s in samples["transformers", name]],
                                     [s["seconds"] for s in samples["megacredit", name]])
        best = (min(s["seconds"] for s in samples["transformers", name])
                / min(s["seconds"] for s in samples["megacredit", name]))
        passes[name] = {**per_side, "megacredit_over_transformers_tokens_per_s": ratio,
                        "best_of_repeats_ratio": best}
    info = _common.machine(torch_threads=args.threads)
    mode = "quick" if args.quick else "full"
    report = {"description": __doc__.split("\n\n")[1].replace("\n", " "), "mode": mode, "repeats": repeats,
              "sequences": args.sequences, "seq_len": args.seq_len, "tokens": tokens,
              "matmul_flops_per_forward": flops, "matmul_peak_gflops": peaks, "passes": passes,
              "machine": info, "date": _common.timestamp()}
    path = _common.write_results("train_throughput", report)
    rows = []
    for name, label in (("forward", "forward"), ("train", "fwd+bwd+AdamW")):
        p = passes[name]
        rows.append([_common.machine_label(info), mode, f"{label}, {args.sequences}x{args.seq_len} tokens",
                     f"{p['megacredit']['tokens_per_s']['median']:.0f}", f"{p['transformers']['tokens_per_s']['median']:.0f}",
                     f"{_common.fmt_ratio(p['megacredit_over_transformers_tokens_per_s'])}; "
                     f"best-of {p['best_of_repeats_ratio']:.2f}x",
                     f"{p['megacredit']['fraction_of_matmul_peak']:.2f} / {p['transformers']['fraction_of_matmul_peak']:.2f}",
                     f"{peak:.0f}", _common.timestamp()])
    header = ["machine", "mode", "pass", "megacredit tok/s", "transformers tok/s",
              "megacredit / transformers (paired median, range; fastest vs fastest)",
              "fraction of matmul peak (mc / tf)", "matmul peak GFLOP/s", "date"]
    _common.update_readme_table("train_throughput", header, rows)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
