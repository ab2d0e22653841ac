"""Training throughput and peak memory of lmforge against transformers' LlamaForCausalLM.

    python benchmarks/bench_train.py                    # ~7 M-parameter Llama, batch 8 x 256, CPU float32
    python benchmarks/bench_train.py --steps 20 --batch 16

Both engines start from the same weights (transformers builds and saves the model, lmforge loads it
with its own loader), see the same batches and use torch.optim.AdamW with the same settings, fused (the
default of both lmforge's trainer and transformers' Trainer on torch >= 2.8). lmforge runs its training
objective (chunked causal-LM cross-entropy); transformers computes `labels=` loss. `--compile` adds
lmforge with `train.compile: true`: the forward pass and the loss through torch.compile as one graph.
Each engine runs in its own process, so the peak resident memory (ru_maxrss) of each is its own; the
engines take turns for --rounds rounds and each number is the median over the rounds, so a burst of
load from elsewhere on the machine does not land on one engine only.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time

import torch

CONFIG = dict(vocab_size=4096, hidden_size=256, intermediate_size=688, num_hidden_layers=6,
              num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=512, tie_word_embeddings=False)  # fmt: skip


def worker(engine: str, folder: str, batch: int, seq: int, steps: int, warmup: int) -> dict:
    torch.manual_seed(0)
    data = torch.randint(0, CONFIG["vocab_size"], (steps + warmup, batch, seq + 1))
    if engine == "transformers":
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)

        def loss_fn(x):
            return model(input_ids=x[:, :-1], labels=x[:, :-1].clone()).loss  # shifts labels inside
    else:
        from lmforge.model import load_model
        from lmforge.model.compile import compile_options
        from lmforge.train.objectives import CausalLM

        model = load_model(folder, dtype="float32", device="cpu")
        objective = CausalLM(chunk_size=256)
        if engine == "lmforge-compiled":  # what train.compile=true does in one process
            objective = torch.compile(objective.__call__, options=compile_options("cpu"))

        def loss_fn(x):
            labels = x[:, 1:].clone()
            labels[:, -1] = -100  # score the same tokens as transformers' internal shift does
            return objective(model, {"input_ids": x[:, :-1], "labels": labels})[0]

    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1, betas=(0.9, 0.95), fused=True)
    losses, t0 = [], None
    for i in range(steps + warmup):
        if i == warmup:
            t0 = time.perf_counter()
        loss = loss_fn(data[i])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    elapsed = time.perf_counter() - t0
    return {
        "engine": engine,
        "tokens_per_s": steps * batch * seq / elapsed,
        "step_s": elapsed / steps,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "first_losses": losses[:3],
        "params": sum(p.numel() for p in model.parameters()),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps first (compilation happens here)")
    ap.add_argument("--rounds", type=int, default=3, help="each engine runs this many times, taking turns")
    ap.add_argument("--compile", action="store_true", help="also time lmforge with compiled blocks")
    ap.add_argument("--json", default=None)
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--folder", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.folder, args.batch, args.seq, args.steps, args.warmup)))
        return

    from transformers import AutoModelForCausalLM, LlamaConfig

    runs: dict[str, list[dict]] = {}
    engines = ("transformers", "lmforge", *(["lmforge-compiled"] if args.compile else []))
    with tempfile.TemporaryDirectory() as folder:
        torch.manual_seed(0)
        AutoModelForCausalLM.from_config(LlamaConfig(**CONFIG)).save_pretrained(folder)
        for r in range(args.rounds):
            for engine in engines[r % len(engines) :] + engines[: r % len(engines)]:  # rotate who goes first
                cmd = [sys.executable, __file__, "--worker", engine, "--folder", folder, "--batch", str(args.batch),
                       "--seq", str(args.seq), "--steps", str(args.steps), "--warmup", str(args.warmup)]  # fmt: skip
                out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
                runs.setdefault(engine, []).append(json.loads(out.strip().splitlines()[-1]))
    results = {}
    for engine, rs in runs.items():
        results[engine] = {**rs[0], "tokens_per_s": statistics.median(x["tokens_per_s"] for x in rs),
                           "tokens_per_s_runs": [round(x["tokens_per_s"]) for x in rs],
                           "peak_rss_mib": max(x["peak_rss_mib"] for x in rs)}  # fmt: skip
    ours, theirs = results["lmforge"], results["transformers"]
    print(f"machine: {platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}; "
          f"Llama {ours['params'] / 1e6:.1f} M params, batch {args.batch} x {args.seq}, AdamW, float32, "
          f"fused AdamW, {args.steps} timed steps, median of {args.rounds} rounds")  # fmt: skip
    print(f"  {'':16}{'lmforge':>12}{'transformers':>14}{'ratio':>8}")
    print(f"  {'tokens/s':16}{ours['tokens_per_s']:>12.0f}{theirs['tokens_per_s']:>14.0f}"
          f"{ours['tokens_per_s'] / theirs['tokens_per_s']:>7.2f}x")  # fmt: skip
    print(f"  {'peak RSS MiB':16}{ours['peak_rss_mib']:>12.0f}{theirs['peak_rss_mib']:>14.0f}"
          f"{ours['peak_rss_mib'] / theirs['peak_rss_mib']:>7.2f}x")  # fmt: skip
    print(f"  first losses: lmforge {[round(x, 4) for x in ours['first_losses']]}, "
          f"transformers {[round(x, 4) for x in theirs['first_losses']]}")  # fmt: skip
    if "lmforge-compiled" in results:
        comp = results["lmforge-compiled"]
        print(f"  {'compiled tok/s':16}{comp['tokens_per_s']:>12.0f}{theirs['tokens_per_s']:>14.0f}"
              f"{comp['tokens_per_s'] / theirs['tokens_per_s']:>7.2f}x   (peak RSS {comp['peak_rss_mib']:.0f} MiB)")  # fmt: skip
    print(
        "  tokens/s of each round: " + "; ".join(f"{e} {r['tokens_per_s_runs']}" for e, r in results.items())
    )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
