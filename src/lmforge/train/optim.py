"""AdamW parameter groups, the learning-rate schedule, and model FLOPs / MFU."""

from __future__ import annotations

import math

import torch
from torch import nn


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Trainable parameters in two groups: matrices decay; norms, biases and embedding tables do not.

    Decay on a norm gain or a bias pulls it toward 0, which is not a regulariser for them; on embeddings it
    shrinks rare tokens' rows (GPT-3, Chinchilla and nanoGPT exempt them). A head tied to the embedding is
    the embedding, so it does not decay either.
    """
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    decay, no_decay = [], []
    for _, p in model.named_parameters():  # shared (tied) parameters appear once
        if not p.requires_grad:
            continue
        (no_decay if p.dim() < 2 or id(p) in embeddings else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def param_group_names(model: nn.Module, weight_decay: float) -> tuple[list[str], list[str]]:
    """Names of the decayed and non-decayed trainable parameters (for logs and tests)."""
    by_id = {id(p): n for n, p in model.named_parameters()}
    groups = param_groups(model, weight_decay)
    named = [[by_id[id(p)] for p in g["params"]] for g in groups]
    decay = next((n for g, n in zip(groups, named) if g["weight_decay"] > 0), [])
    no_decay = next((n for g, n in zip(groups, named) if g["weight_decay"] == 0), [])
    return decay, no_decay


def build_optimizer(model: nn.Module, lr: float, weight_decay: float, betas, eps: float) -> torch.optim.AdamW:
    groups = param_groups(model, weight_decay)
    if not groups:
        raise ValueError("the model has no trainable parameters (requires_grad is False everywhere)")
    return torch.optim.AdamW(groups, lr=lr, betas=tuple(betas), eps=eps, fused=fused_adamw_ok(groups))


def fused_adamw_ok(groups: list[dict]) -> bool:
    """Use torch's fused AdamW (one kernel for every tensor; what transformers' Trainer also picks on
    torch >= 2.8) where it exists: float parameters on CPU or CUDA, not sharded DTensors (FSDP2), which
    keep the default multi-tensor implementation."""
    params = [p for g in groups for p in g["params"]]
    return all(
        p.device.type in ("cpu", "cuda") and p.is_floating_point() and type(p.data) is torch.Tensor
        for p in params
    )


def align_state_layout(optimizer: torch.optim.Optimizer) -> None:
    """Give each parameter's optimizer state (exp_avg, exp_avg_sq) the parameter's memory layout.

    torch's fused AdamW walks a parameter, its gradient and its state as flat memory, so they must share
    strides; with different ones it updates wrong elements without an error. They drift apart when state
    saved contiguous is loaded into a parameter stored column-major, or when a weight is re-laid out after
    its state was made (lmforge.model.compile.wide_weights_column_major: a compiled generation inside an
    eval_fn). load_checkpoint and the trainer (after eval_fn) call it. Copies only what differs."""
    for group in optimizer.param_groups:
        for p in group["params"]:
            for key, value in optimizer.state.get(p, {}).items():
                if torch.is_tensor(value) and value.shape == p.shape and value.stride() != p.stride():
                    optimizer.state[p][key] = torch.empty_like(p, dtype=value.dtype).copy_(value)


def lr_at(step: int, lr: float, min_lr: float, warmup_steps: int, decay_steps: int) -> float:
    """Learning rate of optimizer step `step` (0-based): linear warmup to lr, then cosine decay to min_lr.

    warmup:  lr * (step + 1) / warmup_steps
    decay:   min_lr + (lr - min_lr) * (1 + cos(pi * progress)) / 2,  progress = (step - warmup) / (decay - warmup)
    after decay_steps: min_lr
    """
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    if step >= decay_steps:
        return min_lr
    progress = (step - warmup_steps) / max(1, decay_steps - warmup_steps)
    return min_lr + 0.5 * (lr - min_lr) * (1.0 + math.cos(math.pi * progress))


# --------------------------------------------------------------------------------------------------
# FLOPs and MFU


def matmul_parameters(model: nn.Module) -> int:
    """Parameters that take part in a matmul per token: all, minus lookup-only tables.

    The token embedding is a lookup, unless the head is tied to it (then it is the head's matmul);
    a learned position table is always a lookup.
    """
    seen: set[int] = set()
    total = 0
    head = getattr(getattr(model, "lm_head", None), "weight", None)
    lookups = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        if id(p) in lookups and (head is None or p is not head):
            continue
        total += p.numel()
    return total


def flops_per_token(n_matmul_params: int, n_layer: int, n_head: int, head_dim: int, seq_len: int) -> int:
    """Training FLOPs per token (PaLM, Chowdhery et al. 2022, appendix B): 6N + 12 * L * H * Q * T.

    6N: forward (2N) and backward (4N) through the weights; 12LHQT: the attention scores and values
    (q k^T and p v), forward and backward, without exploiting causality.
    """
    return 6 * n_matmul_params + 12 * n_layer * n_head * head_dim * seq_len


# Peak dense bf16 (fp16 where the card has no bf16) tensor-core FLOP/s per device, from vendor data sheets.
# Matched in order against torch.cuda.get_device_name(); first hit wins.
PEAK_FLOPS: list[tuple[str, float]] = [
    ("GB200", 2.5e15),
    ("B200", 2.25e15),
    ("H200", 989e12),
    ("H100 PCIe", 756e12),
    ("H100", 989e12),  # SXM
    ("H800", 989e12),
    ("A100", 312e12),
    ("A800", 312e12),
    ("A10G", 70e12),  # the AWS variant of the A10
    ("A10", 125e12),
    ("L40S", 362e12),
    ("L40", 181e12),
    ("L4", 121e12),
    ("RTX 4090", 165e12),
    ("RTX 3090", 71e12),
    ("V100", 125e12),  # fp16
    ("T4", 65e12),  # fp16
    ("MI300X", 1307e12),
    ("MI250X", 383e12),
]


def device_peak_flops(device: torch.device) -> float | None:
    """Peak dense bf16 FLOP/s of one device, or None where unknown (CPU, MPS, unlisted GPUs)."""
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name(device)
    for key, flops in PEAK_FLOPS:
        if key in name:
            return flops
    return None
