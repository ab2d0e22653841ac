"""Training MFU: GPT-2 124M in bfloat16 with torch.compile, the way `lmforge pretrain` trains it.

    python benchmarks/bench_mfu.py                          # on a GPU: gpt2, batch 16 x 1024, bf16, compiled
    python benchmarks/bench_mfu.py --batch 8 --seq 512 --no-compile
    python benchmarks/bench_mfu.py --device cpu --preset tiny-gpt2 --batch 2 --seq 64   # a smoke run

The step is the trainer's: the causal-LM objective (fused linear cross-entropy), bfloat16 autocast, fused
AdamW with gradient clipping, `train.compile: true` (forward and loss compiled as one graph). Model FLOPs
per token follow the PaLM appendix (6N + 12 L H Q T, lmforge.train.optim.flops_per_token) and MFU divides
the achieved FLOP/s by the device's dense bf16 peak (lmforge.train.optim.PEAK_FLOPS; none on CPU).
Random tokens are enough: the speed of a step does not depend on the data.
"""

from __future__ import annotations

import argparse
import json
import time

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="gpt2")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=5, help="untimed steps first (compilation happens here)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    from lmforge.config import Config
    from lmforge.model import Transformer
    from lmforge.model.compile import compile_options
    from lmforge.train.objectives import CausalLM
    from lmforge.train.optim import build_optimizer, device_peak_flops, flops_per_token, matmul_parameters

    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    config = Config.from_name(
        args.preset, max_seq_len=max(args.seq, Config.from_name(args.preset).max_seq_len)
    )
    torch.manual_seed(0)
    model = Transformer(config)
    model.init_weights(seed=0)
    model.to(device).train()
    objective = CausalLM(chunk_size=4096)
    if not args.no_compile:
        objective = torch.compile(objective.__call__, options=compile_options(device))
    optimizer = build_optimizer(model, 6e-4, 0.1, (0.9, 0.95), 1e-8)
    data = torch.randint(0, config.vocab_size, (args.batch, args.seq + 1), device=device)
    batch = {"input_ids": data[:, :-1], "labels": data[:, 1:]}
    amp = device.type in ("cuda", "cpu")

    def step() -> float:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            loss, _ = objective(model, batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    t0 = time.perf_counter()
    for _ in range(args.warmup):
        step()
    sync()
    warm = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(args.steps):
        loss = step()
    sync()
    elapsed = time.perf_counter() - t0
    tokens_per_s = args.steps * args.batch * args.seq / elapsed
    fpt = flops_per_token(matmul_parameters(model), config.n_layer, config.n_head, config.head_dim, args.seq)
    peak = device_peak_flops(device)
    mfu = tokens_per_s * fpt / peak if peak else None
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"device {name}, torch {torch.__version__}; {args.preset}: {model.num_parameters() / 1e6:.1f} M params, "
          f"batch {args.batch} x {args.seq}, bf16 autocast, {'compiled' if not args.no_compile else 'eager'}; "
          f"warm-up {warm:.1f} s")  # fmt: skip
    print(f"  {tokens_per_s:,.0f} tokens/s, {fpt / 1e6:.0f} MFLOP/token, "
          f"{tokens_per_s * fpt / 1e12:.1f} TFLOP/s, MFU {f'{mfu:.1%}' if mfu else 'n/a (no known peak)'}; "
          f"last loss {loss.item():.3f}")  # fmt: skip
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": name, "tokens_per_s": tokens_per_s, "flops_per_token": fpt, "mfu": mfu,
                       "args": vars(args)}, f, indent=2)  # fmt: skip


if __name__ == "__main__":
    main()
