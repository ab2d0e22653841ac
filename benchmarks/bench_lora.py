"""Peak memory and step time of LoRA against full fine-tuning, and of lmforge LoRA against peft + transformers.

    python benchmarks/bench_lora.py                                  # smollm2-135m shape, CPU, 1 thread
    python benchmarks/bench_lora.py --batch 8 --seq-len 512 --device cuda --dtype bfloat16

One randomly initialised checkpoint is built by transformers and loaded by both libraries. Every run does
the same training step on the same batch: forward, next-token cross-entropy over all positions, backward,
AdamW step on the trainable parameters. LoRA runs use the same rank, alpha, targets and no dropout.
Each configuration runs in its own process, so peak memory is its own. Two measures, both including the
weights: "tensors", the peak bytes of live tensors over one (untimed) step plus the weights and optimizer
state that live across steps, tracked by a dispatch mode (what torch.cuda.max_memory_allocated reports on a
GPU); and on CPU the peak resident set size during training (reset after loading, so a loader's transient
copies do not count) minus the process's size before the model was loaded, which also holds whatever the
C allocator keeps after tensors are freed (on CUDA `torch.cuda.max_memory_allocated`).
Step time is the median over --steps steps after --warmup steps; with --repeats N the four processes run
N times in turn and each configuration keeps its fastest median (the least disturbed by other load).
On CPU the default is one thread: on a shared machine more threads mostly measure the neighbours.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time

RUNS = ("lmforge-full", "lmforge-lora", "peft-lora", "hf-full")


def build_checkpoint(preset: str, n_layer: int | None, folder: str) -> None:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from lmforge.config import Config

    overrides = {"n_layer": n_layer} if n_layer else {}
    hf_dict = Config.from_name(preset, **overrides).to_hf()
    model_type = hf_dict.pop("model_type")
    hf_dict.pop("architectures")
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **hf_dict)).save_pretrained(folder)


def _status_bytes(key: str) -> int:
    """VmRSS (resident now) or VmHWM (peak resident) of this process, from /proc (Linux)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _reset_peak_rss() -> bool:
    """Start VmHWM afresh (Linux >= 4.0), so a loader's transient copies do not count as training memory."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def live_tensor_peak(step, exclude) -> int:
    """Peak bytes of tensor storages allocated by one call of `step()` and alive at the same time: on CPU,
    what torch.cuda.max_memory_allocated measures on a GPU (tensors only, no allocator cache, no Python).
    `exclude`: tensors that exist before the step (weights, optimizer state), counted separately."""
    import weakref

    import torch
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_flatten

    before = {t.untyped_storage().data_ptr() for t in exclude}

    class Tracker(TorchDispatchMode):
        live = peak = 0
        alive: set = set()

        def _free(self, key, n):
            self.live -= n
            self.alive.discard(key)

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            inputs = {a.untyped_storage().data_ptr() for a in tree_flatten((args, kwargs))[0]
                      if isinstance(a, torch.Tensor)}  # fmt: skip
            for t in tree_flatten(out)[0]:
                if not isinstance(t, torch.Tensor):
                    continue
                storage = t.untyped_storage()
                key = storage.data_ptr()
                if key and key not in self.alive and key not in inputs and key not in before:  # new storage
                    self.alive.add(key)
                    self.live += storage.nbytes()
                    self.peak = max(self.peak, self.live)
                    weakref.finalize(storage, self._free, key, storage.nbytes())
            return out

    tracker = Tracker()
    with tracker:
        step()
    return tracker.peak


def worker(args) -> dict:
    """One configuration, in this process: prints a JSON line with its numbers."""
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[args.dtype]
    targets = args.targets.split(",")
    baseline = _status_bytes("VmRSS")
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base_cuda = torch.cuda.memory_allocated()

    if args.run.startswith("lmforge"):
        from lmforge.finetune import LoraConfig, add_lora
        from lmforge.model import load_model
        from lmforge.train.objectives import SFT

        model = load_model(args.folder, dtype=dtype, device=device)
        if args.run == "lmforge-lora":
            add_lora(
                model,
                LoraConfig(r=args.rank, lora_alpha=2 * args.rank, lora_dropout=0.0, target_modules=targets),
            )
        model.gradient_checkpointing = args.checkpointing
        objective = SFT(chunk_size=args.seq_len)

        def step_loss(ids):
            return objective(model, {"input_ids": ids[:, :-1], "labels": ids[:, 1:]})[0]

    else:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(args.folder, dtype=dtype).to(device)
        if args.checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if args.run == "peft-lora":
            from peft import LoraConfig as PeftLoraConfig
            from peft import get_peft_model

            model = get_peft_model(model, PeftLoraConfig(r=args.rank, lora_alpha=2 * args.rank, lora_dropout=0.0,
                                                         target_modules=targets))  # fmt: skip

        def step_loss(ids):
            return _hf_loss(model, ids)

    model.train()
    import gc

    gc.collect()
    peak_reset = device.type == "cpu" and _reset_peak_rss()
    params = [p for p in model.parameters() if p.requires_grad]
    n_trainable = sum(p.numel() for p in params)
    n_total = sum(p.numel() for p in model.parameters())
    optimizer = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.0)
    g = torch.Generator().manual_seed(0)
    vocab = model.config.vocab_size
    ids = torch.randint(0, vocab, (args.batch, args.seq_len + 1), generator=g).to(device)
    times, losses = [], []

    def train_step():
        with torch.autocast(
            device.type, dtype=torch.bfloat16, enabled=args.dtype == "bfloat16" and device.type == "cuda"
        ):
            loss = step_loss(ids)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    for i in range(args.warmup + args.steps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        loss = train_step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i >= args.warmup:
            times.append(time.perf_counter() - t)
        losses.append(loss.item())
    # untimed: the tensor-level peak of one more step, plus what lives across steps
    state = [t for s in optimizer.state.values() for t in s.values() if torch.is_tensor(t)]
    weights = {id(p): p for p in model.parameters()}.values()
    resident = sum(t.numel() * t.element_size() for t in [*weights, *state])
    tensor_peak = resident + live_tensor_peak(train_step, [*weights, *state])
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated() - base_cuda
    elif peak_reset:
        peak = _status_bytes("VmHWM") - baseline  # weights + training, from the moment training starts
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - baseline
    return {"run": args.run, "step_s": statistics.median(times), "peak_bytes": peak,
            "tensor_peak_bytes": tensor_peak, "trainable": n_trainable,
            "total": n_total, "first_loss": losses[0], "last_loss": losses[-1]}  # fmt: skip


def _hf_loss(model, ids):
    """The same loss as lmforge's: logits of the first T tokens against the next ones, in float32."""
    import torch.nn.functional as F

    logits = model(input_ids=ids[:, :-1], use_cache=False).logits
    return F.cross_entropy(logits.float().flatten(0, 1), ids[:, 1:].flatten())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="smollm2-135m")
    ap.add_argument("--n-layer", type=int, default=0, help="layers of the preset kept (0: all)")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--targets", default="q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument(
        "--threads", type=int, default=None, help="torch threads (default: 1 on CPU, 0 = torch's)"
    )
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument(
        "--checkpointing",
        action="store_true",
        help="activation (gradient) checkpointing in every run: each block recomputed in the backward pass",
    )
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--runs", default=",".join(RUNS), help=f"comma-separated subset of {', '.join(RUNS)}")
    ap.add_argument("--json", default=None, help="also write the results to this file")
    ap.add_argument("--run", default=None, help=argparse.SUPPRESS)  # worker mode
    ap.add_argument("--folder", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.run:
        print(json.dumps(worker(args)))
        return

    import torch

    if args.threads is None:
        args.threads = 1 if args.device == "cpu" else 0
    results = {}
    with tempfile.TemporaryDirectory() as folder:
        build_checkpoint(args.preset, args.n_layer or None, folder)
        for _ in range(args.repeats):
            for run in args.runs.split(","):
                cmd = [sys.executable, __file__, *sys.argv[1:], "--run", run, "--folder", folder,
                       "--threads", str(args.threads)]  # fmt: skip
                env = {**os.environ, "TRANSFORMERS_VERBOSITY": "error"}
                out = subprocess.run(cmd, capture_output=True, text=True, env=env)
                if out.returncode != 0:
                    print(f"{run}: failed\n{out.stderr[-2000:]}", file=sys.stderr)
                    continue
                r = json.loads(out.stdout.strip().splitlines()[-1])
                if run in results:
                    r["step_s"] = min(r["step_s"], results[run]["step_s"])
                    r["peak_bytes"] = max(r["peak_bytes"], results[run]["peak_bytes"])
                    r["tensor_peak_bytes"] = max(r["tensor_peak_bytes"], results[run]["tensor_peak_bytes"])
                results[run] = r
    mib = 2**20
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
          f"{args.threads or torch.get_num_threads()} thread(s), device {args.device}, {args.dtype}; "
          f"model {args.preset}"
          f"{f' ({args.n_layer} layers)' if args.n_layer else ''}, batch {args.batch} x {args.seq_len} tokens, "
          f"LoRA r={args.rank} on {args.targets}"
          f"{', activation checkpointing' if args.checkpointing else ''}")  # fmt: skip
    peak_name = "peak alloc" if args.device == "cuda" else "peak RSS"
    print(f"{'run':<14} {'trainable':>12} {'of':>12} {'tensors MiB':>12} {peak_name + ' MiB':>13} {'step s':>9} "
          f"{'loss first/last':>18}")  # fmt: skip
    for r in results.values():
        print(f"{r['run']:<14} {r['trainable']:>12,} {r['total']:>12,} {r['tensor_peak_bytes'] / mib:>12.0f} "
              f"{r['peak_bytes'] / mib:>13.0f} "
              f"{r['step_s']:>9.3f} {r['first_loss']:>8.3f}/{r['last_loss']:<8.3f}")  # fmt: skip
    ratios = {}

    def ratio(name, a, b, key):
        if a in results and b in results and results[b][key]:
            ratios[name] = results[a][key] / results[b][key]

    ratio("lora/full peak tensor memory (lmforge)", "lmforge-lora", "lmforge-full", "tensor_peak_bytes")
    ratio("lora/full peak tensor memory (peft/transformers)", "peft-lora", "hf-full", "tensor_peak_bytes")
    ratio(f"lora/full {peak_name} (lmforge)", "lmforge-lora", "lmforge-full", "peak_bytes")
    ratio("lora/full step time (lmforge)", "lmforge-lora", "lmforge-full", "step_s")
    ratio("lmforge/peft LoRA step time", "lmforge-lora", "peft-lora", "step_s")
    ratio("lmforge/peft LoRA peak tensor memory", "lmforge-lora", "peft-lora", "tensor_peak_bytes")
    ratio(f"lmforge/peft LoRA {peak_name}", "lmforge-lora", "peft-lora", "peak_bytes")
    ratio("lmforge/transformers full step time", "lmforge-full", "hf-full", "step_s")
    ratio("lmforge/transformers full peak tensor memory", "lmforge-full", "hf-full", "tensor_peak_bytes")
    for name, value in ratios.items():
        print(f"  {name}: {value:.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "results": results, "ratios": ratios}, f, indent=2)


if __name__ == "__main__":
    main()
