"""Next-token cross-entropy through the output head without the whole (B, T, V) logits.

With a 49k-token vocabulary the logits of 512 positions take 100 MB in float32, and the usual path
(logits, log-softmax, their gradients) keeps three or four such tensors alive: for a small model they are
the largest activations of a fine-tuning step. Two ways around that:

* `linear_cross_entropy`, for a plain linear head: one chunk of positions at a time, compute the logits,
  the loss and, at once, the gradients the loss sends to the hidden states and to the head,
      d loss / d logits = softmax(logits) - onehot(label)       (zero for ignored labels)
      d loss / d hidden = (d loss / d logits) W,      d loss / d W = (d loss / d logits)^T hidden
  then drop the chunk's logits. Backward only scales the stored gradients by the incoming one. The
  matmuls are the ones autograd would run, so it costs no recomputation (the "fused linear
  cross-entropy" of Liger Kernel and Apple's Cut Cross-Entropy, written with plain PyTorch ops).
* `chunked_cross_entropy` falls back, for any other head (an adapter-wrapped or sharded one), to
  activation checkpointing per chunk: the chunk's logits are recomputed in backward.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

IGNORE_INDEX = -100


def _loss_and_grads(hidden, weight, bias, labels, chunk: int, ignore_index: int, need=(False, False, False)):
    """The summed loss and, for the inputs flagged in `need` (hidden, weight, bias), its gradients.
    hidden (N, D), labels (N,)."""
    need_h, need_w, need_b = need
    total = torch.zeros((), dtype=torch.float32, device=hidden.device)
    grad_h = torch.empty_like(hidden) if need_h else None
    # a low-precision head accumulates its gradient over the chunks in float32
    grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
    grad_b = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) if need_b else None
    for s in range(0, hidden.shape[0], chunk):
        # one function call per chunk, so its (c, V) tensor is freed before the next chunk's is made
        total += _chunk(hidden[s : s + chunk], weight, bias, labels[s : s + chunk], ignore_index,
                        None if grad_h is None else grad_h[s : s + chunk], grad_w, grad_b)  # fmt: skip
    return total, grad_h, grad_w, grad_b


def _chunk(h, weight, bias, y, ignore_index, grad_h, grad_w, grad_b) -> torch.Tensor:
    """The chunk's summed loss; adds its gradients into grad_w and grad_b and writes grad_h."""
    logits = F.linear(h, weight, bias).float()  # (c, V)
    counted = y != ignore_index
    target = torch.where(counted, y, 0)
    picked = logits.gather(1, target[:, None])[:, 0]  # (c,) the labels' logits
    # log-sum-exp with the exponentials written over the logits: no other (c, V) tensor
    top = logits.amax(-1)
    p = logits.sub_(top[:, None]).exp_()  # exp(logits - max)
    z = p.sum(-1)
    loss = torch.where(counted, z.log() + top - picked, 0.0).sum()  # sum of -log softmax[label]
    if grad_h is None and grad_w is None and grad_b is None:
        return loss
    g = p.div_(z[:, None])  # softmax
    g[torch.arange(len(y), device=g.device), target] -= 1.0
    g.mul_(counted[:, None])  # (c, V) = d loss / d logits
    gw = g.to(weight.dtype)
    if grad_h is not None:
        grad_h.copy_(gw @ weight)
    if grad_w is not None:
        if gw.dtype == torch.float32:
            grad_w.addmm_(gw.t(), h)
        else:
            grad_w += gw.t() @ h.to(weight.dtype)
    if grad_b is not None:
        grad_b += g.sum(0)
    return loss


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, chunk: int, ignore_index: int):
        total, grad_h, grad_w, grad_b = _loss_and_grads(
            hidden, weight, bias, labels, chunk, ignore_index, ctx.needs_input_grad[:3]
        )
        ctx.save_for_backward(grad_h, grad_w, grad_b)
        ctx.dtypes = (weight.dtype, None if bias is None else bias.dtype)
        ctx.used = False
        return total

    @staticmethod
    def backward(ctx, grad_out):
        if ctx.used:
            raise RuntimeError("linear_cross_entropy: backward can run once (retain_graph is not supported)")
        ctx.used = True
        grad_h, grad_w, grad_b = ctx.saved_tensors
        # scaled in place: these tensors exist only for this backward
        grad_h = grad_h.mul_(grad_out) if grad_h is not None else None
        grad_w = grad_w.mul_(grad_out).to(ctx.dtypes[0]) if grad_w is not None else None
        grad_b = grad_b.mul_(grad_out).to(ctx.dtypes[1]) if grad_b is not None else None
        return grad_h, grad_w, grad_b, None, None, None


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    labels: torch.Tensor,
    chunk_size: int = 1024,
    ignore_index: int = IGNORE_INDEX,
) -> torch.Tensor:
    """Summed cross-entropy of F.linear(hidden, weight, bias) against labels, `chunk_size` rows at a time.

    hidden (…, D) and labels (…) are flattened; the result equals
    F.cross_entropy(F.linear(hidden, weight, bias).float(), labels, reduction="sum") and so do its gradients.
    """
    h, y = hidden.reshape(-1, hidden.shape[-1]), labels.reshape(-1)
    if not torch.is_grad_enabled():
        return _loss_and_grads(h, weight, bias, y, chunk_size, ignore_index)[0]
    return _LinearCrossEntropy.apply(h, weight, bias, y, chunk_size, ignore_index)


def plain_linear_head(head) -> nn.Linear | None:
    """The nn.Linear behind `head` when `head` is a model's `logits` method that applies just that layer
    (lmforge's Transformer), with ordinary (not sharded) weights; else None."""
    from lmforge.model.decoder import Transformer

    model = getattr(head, "__self__", None)
    if not isinstance(model, Transformer) or getattr(head, "__func__", None) is not Transformer.logits:
        return None
    lm_head = model.lm_head
    if type(lm_head) is not nn.Linear or type(lm_head.weight.data) is not torch.Tensor:
        return None
    return lm_head


def _chunk_ce_sum(head, hidden: torch.Tensor, labels: torch.Tensor, ignore_index: int) -> torch.Tensor:
    logits = head(hidden).float()  # (B, c, V), float32 for a stable log-softmax under autocast
    return F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=ignore_index, reduction="sum")


def chunked_cross_entropy(
    head, hidden: torch.Tensor, labels: torch.Tensor, chunk_size: int, ignore_index: int = IGNORE_INDEX
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed next-token cross-entropy and the count of counted labels, without the whole (B, T, V) logits.

    hidden: (B, T, D), labels: (B, T); `head` maps hidden states to logits (`model.logits`). A plain linear
    head goes through `linear_cross_entropy` (chunk_size rows of B * T at a time); any other head runs on
    chunk_size positions of every row at a time, recomputed in backward (activation checkpointing).
    """
    n = (labels != ignore_index).sum()
    linear = plain_linear_head(head)
    if linear is not None:
        return linear_cross_entropy(hidden, linear.weight, linear.bias, labels, chunk_size, ignore_index), n
    T = hidden.shape[1]
    total = hidden.new_zeros((), dtype=torch.float32)
    for s in range(0, T, chunk_size):
        h, y = hidden[:, s : s + chunk_size], labels[:, s : s + chunk_size]
        if torch.is_grad_enabled() and chunk_size < T:
            total = total + checkpoint(_chunk_ce_sum, head, h, y, ignore_index, use_reentrant=False)
        else:
            total = total + _chunk_ce_sum(head, h, y, ignore_index)
    return total, n
