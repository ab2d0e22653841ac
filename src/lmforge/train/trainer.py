"""The training loop: one loop for every objective.

    build:  process group -> model (preset or checkpoint) -> data -> DDP / FSDP2 -> AdamW
    load:   the newest complete checkpoint in the run folder, if any (model, optimizer, data, RNG)
    loop:   for each step: grad_accum micro-batches (forward under autocast, backward), unscale, clip,
            step, lr schedule; log; evaluate every eval_every; checkpoint every save_every
    save:   the last step, or wherever SIGINT / SIGTERM stopped it

The objective turns a batch into a loss; everything else (accumulation, precision, clipping, schedule,
evaluation, logging, checkpoints, resume, distribution) lives here. On CPU a run killed at any moment
and resumed reproduces the uninterrupted run bit for bit: data order is a function of (seed, position),
every RNG is restored, and the same float operations run in the same order.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import math
import random
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lmforge.model.compile import compile_options
from lmforge.train import checkpoint as ckpt
from lmforge.train import distributed
from lmforge.train.config import ConfigError, TrainConfig, config_from_dict, load_config
from lmforge.train.dataset import (
    BatchSource,
    TokenWindows,
    TrainBatches,
    document_mask,
    open_split,
    read_meta,
    synthetic_corpus,
    val_batches,
)
from lmforge.train.metrics import MetricsLog, perplexity
from lmforge.train.objectives import Objective, build_objective
from lmforge.train.optim import (
    align_state_layout,
    build_optimizer,
    device_peak_flops,
    flops_per_token,
    lr_at,
    matmul_parameters,
)


@dataclass
class TrainResult:
    run_dir: Path
    step: int  # optimizer steps done
    tokens_seen: int
    checkpoint: Path | None  # the newest complete checkpoint (a HF model folder)
    loss: float | None  # the last step's training loss
    val_loss: float | None  # the last evaluation's loss
    resumed_from: Path | None = None
    rank: int = 0
    interrupted: str | None = None  # "SIGINT" / "SIGTERM" when a signal stopped the run
    metrics: list[dict] = field(default_factory=list)  # metrics.jsonl records (rank 0)


# --------------------------------------------------------------------------------------------------
# Building blocks


def build_model(cfg: TrainConfig, meta: dict | None):
    """The model to train: a preset with overrides, initialised from the seed, or a checkpoint to continue."""
    from lmforge.config import Config
    from lmforge.model import Transformer, load_model

    overrides = dict(cfg.model.config)
    if cfg.model.dropout is not None:
        for key in ("attn_dropout", "resid_dropout", "embd_dropout"):
            overrides.setdefault(key, cfg.model.dropout)
    if cfg.model.init_from is not None:
        base = load_model(cfg.model.init_from, dtype=torch.float32, device="cpu")
        config = dataclasses.replace(base.config, **overrides)
        model = Transformer(config)
        model.load_state_dict(base.state_dict())
    else:
        if meta is not None:  # the data's tokenizer decides the vocabulary unless the config says otherwise
            overrides.setdefault("vocab_size", meta["vocab_size"])
            if meta.get("eos_id") is not None:
                overrides.setdefault("eos_token_id", meta["eos_id"])
        try:
            config = Config.from_name(cfg.model.preset, **overrides)
        except TypeError as e:
            raise ConfigError(f"model: {e}") from None
        model = Transformer(config)
        model.init_weights(seed=cfg.train.seed)
    return model


def _check_fits(cfg: TrainConfig, model, meta: dict | None) -> None:
    config = model.config
    if meta is not None and meta["vocab_size"] > config.vocab_size:
        raise ConfigError(
            f"the data has vocab_size={meta['vocab_size']}, the model only {config.vocab_size} embeddings"
        )
    limit = getattr(config, "context_limit", config.max_seq_len)  # an encoder: its position table
    if limit is not None and cfg.data.seq_len > limit:
        raise ConfigError(f"data.seq_len={cfg.data.seq_len} exceeds the model's context of {limit} tokens")


def load_data(cfg: TrainConfig, vocab_size: int, eos_id: int) -> tuple[np.ndarray, np.ndarray | None]:
    d = cfg.data
    seed = cfg.train.seed if d.seed is None else d.seed
    if d.path is not None:
        train = open_split(d.path, d.train_split)
        names = [d.val_split] if d.val_split is not None else ["val", "validation"]
        found = [n for n in names if (Path(d.path) / f"{n}.bin").is_file()]
        if d.val_split is not None and not found:
            raise ConfigError(f"data.val_split={d.val_split!r}: no {d.val_split}.bin in {d.path}")
        return train, (open_split(d.path, found[0]) if found else None)
    n = d.synthetic_tokens
    return (synthetic_corpus(vocab_size, n, seed, eos_id, stream=0),
            synthetic_corpus(vocab_size, max(n // 10, 4 * (d.seq_len + 1)), seed, eos_id, stream=1))  # fmt: skip


def _to_batch(arr: np.ndarray, device: torch.device, eos_id: int | None, mask_documents: bool) -> dict:
    x = torch.from_numpy(arr).to(device, non_blocking=True)
    batch = {"input_ids": x[:, :-1].contiguous(), "labels": x[:, 1:].contiguous()}
    if mask_documents and eos_id is not None:
        batch["positions"], batch["attention_mask"] = document_mask(batch["input_ids"], eos_id)
    return batch


def _to_device(batch: dict, device: torch.device) -> dict:
    return {
        k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()
    }


def _precision(name: str, device: torch.device) -> str:
    if name != "auto":
        return name
    return "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"


def _call_objective(objective):
    """A plain function around an objective (objectives may be callable dataclasses) for torch.compile."""

    def forward_loss(model, batch):
        return objective(model, batch)

    return forward_loss


def _autocast(precision: str, device: torch.device):
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)


class _StopSignal:
    """SIGINT / SIGTERM ask the loop to save and stop after the current step.

    A second signal within 3 s is taken as the launcher forwarding the same request (torchrun relays the
    terminal's Ctrl-C); a later one aborts at once.
    """

    def __init__(self) -> None:
        self.signum: int | None = None
        self._at = 0.0
        self._previous: dict[int, Any] = {}

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        if self.signum is None:
            self.signum, self._at = signum, time.monotonic()
        elif time.monotonic() - self._at > 3.0:
            raise KeyboardInterrupt

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    @property
    def name(self) -> str | None:
        return None if self.signum is None else signal.Signals(self.signum).name


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)  # CPU and every CUDA device


def _as_config(config: TrainConfig | dict | str | Path) -> TrainConfig:
    if isinstance(config, TrainConfig):
        return config
    if isinstance(config, dict):
        return config_from_dict(config)
    return load_config(config)


# --------------------------------------------------------------------------------------------------
# The loop


def train(
    config: TrainConfig | dict | str | Path,
    out_dir: str | Path | None = None,
    model=None,
    objective: Objective | None = None,
    data: BatchSource | None = None,
    eval_fn=None,
) -> TrainResult:
    """Train (or resume) the run described by `config` in `out_dir` (default: config.out_dir).

    model: a `Transformer` (or a BERT `Encoder`, with an encoder objective) to train instead of building one
        from `config.model` (e.g. with some parameters frozen: the optimiser only sees those with
        requires_grad).
    objective: an Objective instance instead of `config.objective` (one not in OBJECTIVES).
    data: batches of another kind than token windows (e.g. SFT examples): a `BatchSource`; `config.data`
        is then not read.
    eval_fn: `eval_fn(model) -> dict` of further validation metrics (e.g. exact match of generations),
        called after each evaluation (on every rank) and logged with it.
    Under torchrun every process calls this; the process group is created here unless one exists.
    """
    cfg = _as_config(config)
    if out_dir is not None:
        cfg = dataclasses.replace(cfg, out_dir=str(out_dir))
    if cfg.out_dir is None:
        raise ConfigError("no output folder: pass --out DIR (or set out_dir in the config)")
    if (
        cfg.train.tensorboard and importlib.util.find_spec("tensorboard") is None
    ):  # fail before any rank waits
        raise ConfigError("train.tensorboard=true needs the tensorboard package (pip install tensorboard)")
    ctx = distributed.setup(cfg.train.device, cfg.dist.backend)
    try:
        return _train(cfg, ctx, model, objective, data, eval_fn)
    finally:
        ctx.close()


def _train(cfg: TrainConfig, ctx: distributed.DistContext, model, objective, data, eval_fn) -> TrainResult:
    t, device = cfg.train, ctx.device
    run_dir = Path(cfg.out_dir)
    label = getattr(data, "label", None) or "pretrain"  # names the run in messages and the progress bar
    if ctx.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(cfg.to_yaml())
    ctx.barrier()
    _seed_everything(t.seed + ctx.rank)  # dropout differs per rank; restored from the checkpoint on resume

    # ---- build
    meta = read_meta(cfg.data.path) if cfg.data.path is not None and data is None else None
    if model is None:
        model = build_model(cfg, meta)
    _check_fits(cfg, model, meta)
    mcfg = model.config
    eos_ids = getattr(mcfg, "eos_ids", None)  # encoders have none
    eos_id = meta.get("eos_id") if meta is not None else (eos_ids[0] if eos_ids else 0)
    data_seed = t.seed if cfg.data.seed is None else cfg.data.seed
    if data is None:
        train_tokens, val_tokens = load_data(cfg, mcfg.vocab_size, eos_id)
        loader = TrainBatches(TokenWindows(train_tokens, cfg.data.seq_len, data_seed), t.micro_batch_size,
                              ctx.rank, ctx.world_size)  # fmt: skip
        val_windows = TokenWindows(val_tokens, cfg.data.seq_len) if val_tokens is not None else None
        if val_windows is not None and val_windows.n_windows < ctx.world_size:
            val_windows = None
        seq_len = cfg.data.seq_len
    else:
        loader = data.loader(t.micro_batch_size, ctx.rank, ctx.world_size, data_seed)
        val_windows = data if data.has_validation else None
        seq_len = data.seq_len

    model.to(device)
    model.train()
    model.gradient_checkpointing = t.activation_checkpointing
    n_matmul = matmul_parameters(model)
    n_params = model.num_parameters()
    wrapped = distributed.wrap(model, ctx, cfg.dist.strategy, cfg.dist.reshard_after_forward)
    optimizer = build_optimizer(model, t.lr, t.weight_decay, (t.beta1, t.beta2), t.eps)
    trainable = [p for p in model.parameters() if p.requires_grad]
    if objective is None:
        objective = build_objective(cfg.objective.name, cfg.objective.options)
    forward_loss = objective
    if t.compile and ctx.distributed:
        blocks = model.layers if cfg.dist.strategy == "fsdp" else [model]
        for m in blocks:
            m.compile()  # in place: parameter names (and so checkpoints) stay the same
    elif t.compile:
        # One graph for the forward pass and the loss, so inductor also fuses the cross-entropy and
        # every element-wise op with its backward (docs/benchmarks.md: ~1.2x the eager step on CPU).
        forward_loss = torch.compile(_call_objective(objective), options=compile_options(device))
    precision = _precision(t.precision, device)
    scaler = torch.amp.GradScaler(device.type) if precision == "fp16" else None

    # ---- load
    step, elapsed_before, resumed_from = 0, 0.0, ckpt.latest_checkpoint(run_dir)
    if resumed_from is not None:
        state = ckpt.load_checkpoint(resumed_from, model, optimizer, ctx)
        step = state["step"]
        loader.load_state_dict(state["data"])
        elapsed_before = state.get("elapsed_s", 0.0)
        if scaler is not None and state.get("grad_scaler"):
            scaler.load_state_dict(state["grad_scaler"])
    global_batch = t.micro_batch_size * t.grad_accum_steps * ctx.world_size
    tokens_per_step = global_batch * seq_len
    decay_steps = t.lr_decay_steps if t.lr_decay_steps is not None else t.max_steps
    fpt = flops_per_token(n_matmul, mcfg.n_layer, mcfg.n_head, mcfg.head_dim, seq_len)
    peak = device_peak_flops(device)

    log = MetricsLog(run_dir, step, t.tensorboard) if ctx.is_main else None
    bar = None
    if ctx.is_main:
        from tqdm.auto import tqdm

        where = f"resuming from {resumed_from.name}" if resumed_from else "starting"
        print(f"{label}: {where}; {n_params / 1e6:.2f} M parameters, world size {ctx.world_size}, "
              f"global batch {global_batch} x {seq_len} tokens, precision {precision}, "
              f"run folder {run_dir}", file=sys.stderr)  # fmt: skip
        bar = tqdm(total=t.max_steps, initial=min(step, t.max_steps), disable=not t.progress, desc=label,
                   unit="step", dynamic_ncols=True, mininterval=0.5, file=sys.stderr)  # fmt: skip

    def save(at: int, elapsed: float) -> Path:
        trainer_state = {
            "step": at,
            "tokens_seen": at * tokens_per_step,
            "data": loader.state_dict(),
            "scheduler": {"name": "warmup_cosine", "step": at, "lr": t.lr, "min_lr": t.min_lr,
                          "warmup_steps": t.warmup_steps, "decay_steps": decay_steps},
            "grad_scaler": scaler.state_dict() if scaler is not None else None,
            "elapsed_s": elapsed,
            "config": cfg.to_dict(),
        }  # fmt: skip
        tokenizer_dir = Path(cfg.data.path) / "tokenizer" if cfg.data.path is not None else None
        if data is not None:
            tokenizer_dir = getattr(data, "tokenizer_dir", None)
        return ckpt.save_checkpoint(
            run_dir, at, wrapped, optimizer, trainer_state, ctx, t.keep_last, tokenizer_dir
        )

    def evaluate() -> float | None:
        if val_windows is None:
            return None
        wrapped.eval()
        total = torch.zeros(2, dtype=torch.float64, device=device)
        if data is None:
            batches = (_to_batch(arr, device, eos_id, cfg.data.mask_documents) for arr in
                       val_batches(val_windows, t.micro_batch_size, t.eval_sequences, ctx.rank, ctx.world_size))  # fmt: skip
        else:
            batches = (_to_device(b, device) for b in
                       data.val_batches(t.micro_batch_size, t.eval_sequences, ctx.rank, ctx.world_size))  # fmt: skip
        with torch.no_grad():
            for batch in batches:
                with _autocast(precision, device):
                    loss, metrics = forward_loss(wrapped, batch)
                weight = metrics.get("n_tokens", batch["input_ids"].shape[0])
                total[0] += loss.double() * weight
                total[1] += weight
        wrapped.train()
        ctx.all_reduce_sum(total)
        return (total[0] / total[1]).item() if total[1] > 0 else None

    # ---- loop
    stop = _StopSignal()
    stop.install()
    start_time = time.perf_counter()
    last_loss = last_val = None
    saved_at = step if resumed_from is not None else None
    evaluated_at = interrupted = None
    try:
        while step < t.max_steps:
            step_start = time.perf_counter()
            lr = lr_at(step, t.lr, t.min_lr, t.warmup_steps, decay_steps)
            for group in optimizer.param_groups:
                group["lr"] = lr
            loss_sum = torch.zeros((), dtype=torch.float64, device=device)
            extra: dict[str, float] = {}
            for micro in range(t.grad_accum_steps):
                if data is None:
                    batch = _to_batch(loader.next(), device, eos_id, cfg.data.mask_documents)
                else:
                    batch = _to_device(loader.next(), device)
                with distributed.gradient_sync(wrapped, micro == t.grad_accum_steps - 1):
                    with _autocast(precision, device):
                        loss, metrics = forward_loss(wrapped, batch)
                    scaled = loss / t.grad_accum_steps
                    (scaler.scale(scaled) if scaler is not None else scaled).backward()
                loss_sum += loss.detach()
                for key, value in metrics.items():
                    if key != "n_tokens":
                        extra[key] = extra.get(key, 0.0) + float(value) / t.grad_accum_steps
            if scaler is not None:
                scaler.unscale_(optimizer)
            if t.grad_clip:
                grad_norm = torch.nn.utils.clip_grad_norm_(trainable, t.grad_clip)
            else:
                grad_norm = torch.nn.utils.get_total_norm([p.grad for p in trainable if p.grad is not None])
            if scaler is not None:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1

            # one all-reduce carries the loss of every rank and whether any rank was asked to stop
            sync = torch.stack([loss_sum / t.grad_accum_steps,
                                torch.tensor(float(stop.signum is not None), dtype=torch.float64, device=device)])  # fmt: skip
            ctx.all_reduce_sum(sync)
            last_loss = sync[0].item() / ctx.world_size
            stop_requested = sync[1].item() > 0
            grad_norm_value = distributed.full_tensor(grad_norm).item()
            now = time.perf_counter()
            dt = now - step_start
            tokens_per_s = tokens_per_step / dt if dt > 0 else None
            mfu = fpt * tokens_per_s / (peak * ctx.world_size) if peak and tokens_per_s else None

            if ctx.is_main:
                record = {"step": step, "loss": last_loss, "lr": lr, "grad_norm": grad_norm_value,
                          "tokens_seen": step * tokens_per_step, "tokens_per_s": tokens_per_s, "step_time_s": dt,
                          "mfu": mfu, "elapsed_s": elapsed_before + now - start_time, **extra}  # fmt: skip
                log.log(record)
                bar.set_postfix(loss=f"{last_loss:.4f}", lr=f"{lr:.2e}",
                                tok_s=f"{tokens_per_s:,.0f}" if tokens_per_s else "-", refresh=False)  # fmt: skip
                bar.update(1)
                if not math.isfinite(last_loss):
                    bar.write(f"warning: step {step}: loss is {last_loss}")

            final = step == t.max_steps
            if (val_windows is not None or eval_fn is not None) and (
                final or (t.eval_every and step % t.eval_every == 0)
            ):
                last_val = evaluate()
                evaluated_at = step
                more = {}
                if eval_fn is not None:
                    wrapped.eval()
                    more = eval_fn(distributed.unwrap(wrapped)) or {}
                    wrapped.train()
                    align_state_layout(optimizer)  # e.g. a compiled generation re-laid out weights
                if ctx.is_main and (last_val is not None or more):
                    shown = [f"{k} {v:.4f}" for k, v in more.items() if isinstance(v, float)]
                    if last_val is not None:
                        more = {"val_loss": last_val, "val_perplexity": perplexity(last_val), **more}
                        shown.insert(0, f"val_loss {last_val:.4f}, perplexity {perplexity(last_val):.2f}")
                    log.log({"step": step, **more})
                    log.plot()
                    bar.write(f"step {step}: {', '.join(shown)}")
            if final or stop_requested or (t.save_every and step % t.save_every == 0):
                save(step, elapsed_before + time.perf_counter() - start_time)
                saved_at = step
            if stop_requested:
                interrupted = stop.name or "signal on another rank"
                break
    finally:
        stop.restore()
        if bar is not None:
            bar.close()

    if step >= t.max_steps and saved_at != step and resumed_from is None:
        save(step, elapsed_before)  # max_steps == 0: save the initial model so the run folder holds a model
    if ctx.is_main:
        if evaluated_at is None and log.records:
            log.plot()
        log.close()
        if interrupted is not None:
            print(f"{label}: stopped by {interrupted} at step {step}; checkpoint saved. "
                  "Rerun the same command to resume.", file=sys.stderr)  # fmt: skip
    latest = ckpt.latest_checkpoint(run_dir)
    return TrainResult(
        run_dir=run_dir,
        step=step,
        tokens_seen=step * tokens_per_step,
        checkpoint=latest,
        loss=last_loss,
        val_loss=last_val,
        resumed_from=resumed_from,
        rank=ctx.rank,
        interrupted=interrupted,
        metrics=list(log.records) if log is not None else [],
    )
