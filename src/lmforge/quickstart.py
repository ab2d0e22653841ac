"""`lmforge quickstart`: the whole pretraining path on the embedded default, on a laptop CPU.

    curate the stdlib docstrings -> train a BPE tokenizer -> tokenise into shards -> pretrain a small
    Llama-style model -> evaluate against a unigram baseline -> save a HF checkpoint -> sample -> report

Every stage is the same function the individual commands call (`lmforge data prepare`, `tokenizer
train`, `data tokenize`, `pretrain`), writing its usual files under the output folder, so a user can
rerun or replace any stage by hand. Rerunning resumes training from the newest checkpoint.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

#: The model and schedule: about 5 minutes of training on 2 CPU cores.
QUICKSTART_MODEL = dict(preset="tiny-llama", n_layer=4, n_embd=192, n_head=6, n_kv_head=2,
                        intermediate_size=512, max_seq_len=512)  # fmt: skip
SAMPLE_PROMPTS = ("Return the", "Create a new", "This module provides", "If the file")


@dataclass
class QuickstartResult:
    out_dir: Path
    final_dir: Path
    val_perplexity: float
    unigram_perplexity: float
    samples: dict[str, str]
    report: Path


def _log(message: str) -> None:
    print(f"[quickstart] {message}", flush=True)


def unigram_nll(train_tokens, eval_tokens, vocab_size: int) -> float:
    """Mean negative log-likelihood of eval tokens under add-one-smoothed train token frequencies."""
    import numpy as np

    counts = np.bincount(np.asarray(train_tokens, dtype=np.int64), minlength=vocab_size).astype(np.float64)
    logp = np.log((counts + 1.0) / (counts.sum() + vocab_size))
    return float(-logp[np.asarray(eval_tokens, dtype=np.int64)].mean())


def evaluate_windows(model, tokens, seq_len: int, batch_size: int = 16):
    """Model NLL over consecutive windows of `tokens` (each window predicts its tokens 1..T-1).
    Returns (mean NLL, the predicted token ids) so a baseline can be scored on exactly the same tokens."""
    import numpy as np
    import torch
    import torch.nn.functional as F

    n = (len(tokens) // seq_len) * seq_len
    windows = torch.as_tensor(np.asarray(tokens[:n], dtype=np.int64)).view(-1, seq_len)
    device = next(model.parameters()).device
    total, count = 0.0, 0
    with torch.inference_mode():
        for start in range(0, len(windows), batch_size):
            x = windows[start : start + batch_size].to(device)
            logits = model.logits(model(x[:, :-1])).float()
            total += F.cross_entropy(logits.flatten(0, 1), x[:, 1:].flatten(), reduction="sum").item()
            count += x[:, 1:].numel()
    return total / count, windows[:, 1:].flatten().numpy()


def run_quickstart(
    out_dir: str | Path, max_steps: int = 600, vocab_size: int = 4096, seed: int = 0
) -> QuickstartResult:

    from lmforge.data import PrepareConfig, prepare
    from lmforge.data.tokenize import tokenize_splits
    from lmforge.generate import SamplingParams, generate
    from lmforge.model.hf import load_model
    from lmforge.pretrained import save_pretrained
    from lmforge.tokenizer import Tokenizer
    from lmforge.tokenizer_train import train_tokenizer
    from lmforge.train import load_config, train
    from lmforge.train.dataset import open_split, read_meta

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}

    # 1. curate
    t = time.perf_counter()
    data_dir = out / "data"
    if not (data_dir / "report.json").is_file():
        _log("1/6 curating the standard library's docstrings")
        prepare(PrepareConfig(output_dir=str(data_dir)))
    data_report = json.loads((data_dir / "report.json").read_text())
    timings["curate_s"] = time.perf_counter() - t

    # 2. tokenizer
    t = time.perf_counter()
    tok_dir = out / "tokenizer"
    if not (tok_dir / "tokenizer.json").is_file():
        _log(f"2/6 training a byte-level BPE tokenizer ({vocab_size} tokens)")
        texts = [json.loads(line)["text"] for line in (data_dir / "train.jsonl").open(encoding="utf-8")]
        train_tokenizer(texts, kind="bpe", vocab_size=vocab_size).save(tok_dir)
    tokenizer = Tokenizer.from_dir(tok_dir)
    timings["tokenizer_s"] = time.perf_counter() - t

    # 3. shards
    t = time.perf_counter()
    shard_dir = out / "tokens"
    if not (shard_dir / "meta.json").is_file():
        _log("3/6 tokenising the splits into shards")
        tokenize_splits(data_dir, tokenizer, shard_dir, progress=False)
    meta = read_meta(shard_dir)
    timings["tokenize_s"] = time.perf_counter() - t

    # 4. pretrain
    t = time.perf_counter()
    _log(f"4/6 pretraining ({max_steps} steps; rerun to resume after an interruption)")
    overrides = {f"model.{k}": v for k, v in QUICKSTART_MODEL.items()}
    overrides.update({
        "data.path": str(shard_dir), "data.seq_len": 256, "data.val_split": "validation",
        "train.max_steps": max_steps, "train.micro_batch_size": 16, "train.grad_accum_steps": 1,
        "train.lr": 2e-3, "train.min_lr": 2e-4, "train.warmup_steps": 50, "train.eval_every": 200,
        "train.save_every": 200, "train.keep_last": 1, "train.seed": seed, "train.device": "auto",
        "train.eval_sequences": 64,
    })  # fmt: skip
    result = train(load_config(None, overrides), out_dir=out / "run")
    timings["pretrain_s"] = time.perf_counter() - t

    # 5. evaluate and save
    t = time.perf_counter()
    _log("5/6 evaluating on the validation split")
    model = load_model(result.checkpoint)
    model.config.eos_token_id = tokenizer.eos_id
    val = open_split(shard_dir, "validation")
    train_tokens = open_split(shard_dir, "train")
    nll, predicted = evaluate_windows(model, val, 256)
    base = unigram_nll(train_tokens, predicted, meta["vocab_size"])
    final = out / "final"
    save_pretrained(model, final, tokenizer)
    timings["evaluate_s"] = time.perf_counter() - t

    # 6. samples and report
    _log("6/6 sampling")
    params = SamplingParams(max_new_tokens=40, temperature=0.7, top_p=0.9, seed=seed)
    prompts = [tokenizer.encode(p) for p in SAMPLE_PROMPTS]
    samples = {p: g.text for p, g in zip(SAMPLE_PROMPTS, generate(model, prompts, params, tokenizer))}
    ppl, unigram_ppl = math.exp(nll), math.exp(base)
    report = _write_report(out, result, data_report, meta, ppl, unigram_ppl, samples, timings, model)
    print()
    print(
        f"validation perplexity: {ppl:,.2f}   unigram baseline (same tokenizer, same tokens): {unigram_ppl:,.2f}"
    )
    for prompt, text in samples.items():
        print(f"  {prompt!r} -> {text!r}")
    print(f"\ncheckpoint: {final}   report: {report}")
    print(f'try: lmforge generate --model {final} --prompt "Return the"')
    return QuickstartResult(out, final, ppl, unigram_ppl, samples, report)


def _write_report(out, result, data_report, meta, ppl, unigram_ppl, samples, timings, model) -> Path:
    from lmforge.model.hf import write_text_atomic

    c = model.config
    counts = data_report.get("counts", data_report)
    lines = [
        "# lmforge quickstart report",
        "",
        "## Result",
        "",
        "| | value |",
        "|---|---|",
        f"| validation perplexity | {ppl:,.2f} |",
        f"| unigram baseline perplexity | {unigram_ppl:,.2f} |",
        f"| optimizer steps | {result.step} |",
        f"| tokens seen | {result.tokens_seen:,} |",
        f"| last training loss | {result.loss:.4f} |"
        if result.loss is not None
        else "| last training loss | - |",
        f"| model | {c.model_type}, {model.num_parameters() / 1e6:.2f} M parameters, {c.n_layer} layers, "
        f"d={c.n_embd}, {c.n_head} heads / {c.n_kv_head} kv heads |",
        f"| tokenizer | byte-level BPE, {meta['vocab_size']} tokens |",
        "",
        "![loss curve](run/loss.png)",
        "",
        "## Samples (temperature 0.7, top-p 0.9)",
        "",
    ]
    lines += [f"- **{p}**{t}" for p, t in samples.items()]
    lines += ["", "## Data", "", "![document lengths](data/length_histogram.png)", "",
              "See [data/report.md](data/report.md) for every curation stage with counts and examples.", "",
              "```json", json.dumps(counts, indent=2)[:3000], "```", "", "## Time per stage", "",
              "| stage | seconds |", "|---|---|"]  # fmt: skip
    lines += [f"| {k.removesuffix('_s')} | {v:.1f} |" for k, v in timings.items()]
    path = out / "report.md"
    write_text_atomic(path, "\n".join(lines) + "\n")
    return path
