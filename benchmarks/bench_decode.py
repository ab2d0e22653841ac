"""Decode and prefill speed of lmforge against transformers' generate, same model, same process.

    python benchmarks/bench_decode.py                      # smollm2-135m shape, CPU float32, batch 1 and 8
    python benchmarks/bench_decode.py --preset tiny-llama --new-tokens 32 --batch 1

Both engines run the same randomly initialised checkpoint (built by transformers, loaded by lmforge's
loader), greedy, with EOS ignored so every run decodes exactly --new-tokens tokens. The engines take
turns for --repeats rounds and each number is the median over the rounds. Prefill time is the time to
the first token; decode speed is (new_tokens - 1) / (total - time to first token), measured identically
for both engines.
The memory-bandwidth bound of decoding at batch 1 is bandwidth / bytes of weights read per token, with
the read bandwidth measured once per round, between the engines' turns.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time

import torch


def measure_bandwidth(nbytes: int = 1 << 30) -> float:
    """Read bandwidth in bytes/s: sum over a buffer much larger than the caches."""
    x = torch.ones(nbytes // 4, dtype=torch.float32)
    x.sum()
    times = []
    for _ in range(5):
        t = time.perf_counter()
        x.sum()
        times.append(time.perf_counter() - t)
    return nbytes / min(times)


def build_checkpoint(preset: str, folder: str) -> None:
    from transformers import AutoConfig, AutoModelForCausalLM

    from lmforge.config import Config

    hf_dict = Config.from_name(preset).to_hf()
    model_type = hf_dict.pop("model_type")
    hf_dict.pop("architectures")
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **hf_dict))
    model.save_pretrained(folder)


def time_hf(model, prompts: torch.Tensor, new_tokens: int) -> float:
    mask = torch.ones_like(prompts)
    t = time.perf_counter()
    model.generate(prompts, attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                   do_sample=False, pad_token_id=0)  # fmt: skip
    return time.perf_counter() - t


def time_lmforge(model, prompts: torch.Tensor, new_tokens: int, compile: bool = False) -> float:
    from lmforge.generate import SamplingParams, generate

    params = SamplingParams(max_new_tokens=new_tokens, temperature=0, ignore_eos=True)
    t = time.perf_counter()
    out = generate(model, prompts.tolist(), params, compile=compile)
    elapsed = time.perf_counter() - t
    assert all(len(o.tokens) == new_tokens for o in out)
    return elapsed


def measure(engines: dict, prompts, new_tokens: int, repeats: int) -> tuple[dict, float]:
    """Per engine: the medians of time to first token and of total time over `repeats` rounds, and the
    median read bandwidth measured once per round. The engines (and the bandwidth probe) take turns
    within each round, so a burst of load from elsewhere on the machine lands on all of them."""
    for engine in engines.values():
        engine(prompts, new_tokens)  # warm-up (and, for the compiled engine, compilation)
    ttfts: dict = {name: [] for name in engines}
    totals: dict = {name: [] for name in engines}
    bandwidths = []
    for _ in range(repeats):
        bandwidths.append(measure_bandwidth())
        for name, engine in engines.items():
            ttfts[name].append(engine(prompts, 1))
            totals[name].append(engine(prompts, new_tokens))
    B, T = prompts.shape
    out = {}
    for name in engines:
        ttft, total = statistics.median(ttfts[name]), statistics.median(totals[name])
        out[name] = {"prefill_tok_s": B * T / ttft, "decode_tok_s": B * (new_tokens - 1) / max(total - ttft, 1e-9),
                     "ttft_s": ttft, "total_s": total}  # fmt: skip
    return out, statistics.median(bandwidths)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="smollm2-135m")
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument(
        "--compile",
        action="store_true",
        help="also time lmforge with its torch.compile'd decode step (compiles once per shape first)",
    )
    ap.add_argument("--json", default=None, help="also write the results to this file")
    args = ap.parse_args()

    from transformers import AutoModelForCausalLM

    from lmforge.model import load_model

    torch.set_grad_enabled(False)
    with tempfile.TemporaryDirectory() as folder:
        build_checkpoint(args.preset, folder)
        hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
        ours = load_model(folder, dtype="float32", device="cpu")
        # the compiled path re-lays out wide weights (model/compile.py), so it gets its own copy and the
        # eager numbers stay those of a freshly loaded model
        ours_compiled = load_model(folder, dtype="float32", device="cpu") if args.compile else None
    n_params = ours.num_parameters()
    weight_bytes = n_params * 4
    print(f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}; model {args.preset}: {n_params / 1e6:.1f} M params, float32 "
          f"({weight_bytes / 2**20:.0f} MiB)")  # fmt: skip
    engines = {
        "transformers": lambda p, n: time_hf(hf, p, n),
        "lmforge": lambda p, n: time_lmforge(ours, p, n),
    }
    if args.compile:
        engines["lmforge_compiled"] = lambda p, n: time_lmforge(ours_compiled, p, n, compile=True)
    results = []
    vocab = ours.config.vocab_size
    for B in args.batch:
        prompts = torch.randint(0, vocab, (B, args.prompt_len), generator=torch.Generator().manual_seed(B))
        timed, bandwidth = measure(engines, prompts, args.new_tokens, args.repeats)
        bound = bandwidth / weight_bytes  # batch-1 decode reads every weight once per token
        mine, theirs, compiled = timed["lmforge"], timed["transformers"], timed.get("lmforge_compiled")
        row = {"batch": B, "bandwidth_GBps": bandwidth / 1e9, "lmforge": mine, "transformers": theirs,
               "lmforge_compiled": compiled,
               "decode_ratio": mine["decode_tok_s"] / theirs["decode_tok_s"],
               "prefill_ratio": mine["prefill_tok_s"] / theirs["prefill_tok_s"]}  # fmt: skip
        if B == 1:
            row["lmforge_fraction_of_bound"] = mine["decode_tok_s"] / bound
            row["transformers_fraction_of_bound"] = theirs["decode_tok_s"] / bound
            if compiled is not None:
                row["lmforge_compiled_fraction_of_bound"] = compiled["decode_tok_s"] / bound
        results.append(row)
        print(
            f"\nbatch {B}, prompt {args.prompt_len}, {args.new_tokens} new tokens, median of {args.repeats} rounds"
        )
        print(f"  {'':14}{'lmforge':>12}{'transformers':>14}{'ratio':>8}")
        print(f"  {'decode tok/s':14}{mine['decode_tok_s']:>12.1f}{theirs['decode_tok_s']:>14.1f}"
              f"{row['decode_ratio']:>7.2f}x")  # fmt: skip
        print(f"  {'prefill tok/s':14}{mine['prefill_tok_s']:>12.1f}{theirs['prefill_tok_s']:>14.1f}"
              f"{row['prefill_ratio']:>7.2f}x")  # fmt: skip
        if compiled is not None:
            row["compiled_decode_ratio"] = compiled["decode_tok_s"] / theirs["decode_tok_s"]
            print(f"  {'decode tok/s, lmforge compiled':32}{compiled['decode_tok_s']:>8.1f}"
                  f"{row['compiled_decode_ratio']:>7.2f}x")  # fmt: skip
        if B == 1:
            print(f"  read bandwidth {bandwidth / 1e9:.1f} GB/s (median over the rounds) -> decode bound "
                  f"{bound:.1f} tok/s")  # fmt: skip
            line = (f"  fraction of the bandwidth bound: lmforge {row['lmforge_fraction_of_bound']:.0%}, "
                    f"transformers {row['transformers_fraction_of_bound']:.0%}")  # fmt: skip
            if compiled is not None:
                line += f", lmforge compiled {row['lmforge_compiled_fraction_of_bound']:.0%}"
            print(line)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"preset": args.preset, "results": results}, f, indent=2)


if __name__ == "__main__":
    main()
