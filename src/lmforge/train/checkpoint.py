"""Training checkpoints: `run_dir/step-XXXXXXXX/`, written atomically, never unpickled.

    step-00001000/
        config.json, model.safetensors    the model in Hugging Face layout (lmforge.model.save_model), or
        trainable.safetensors             when adapters wrap the model (PEFT): the trained parameters only
        tokenizer.json, ...               the data's tokenizer, when the shard folder has one
        optimizer.safetensors             AdamW moments and step counts, keyed "<param fqn>/<name>"
        trainer_state.json                step, data position, scheduler, grad scaler, param groups, config
        rng-rank00000.safetensors         this rank's torch / CUDA / numpy / python RNG states
        COMPLETE                          written last; a folder without it is never resumed from

Writing: rank 0 makes `.tmp-step-XXXXXXXX/`, every file is fsynced, the folder is renamed to its final
name, and only then is COMPLETE written (and fsynced with its folder). A crash at any moment leaves
either a temporary folder, a folder without COMPLETE, or a complete checkpoint.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from lmforge.train.dataset import fsync_dir
from lmforge.train.optim import align_state_layout

MARKER = "COMPLETE"
TRAINABLE = "trainable.safetensors"  # PEFT runs: the trained parameters only, by module path
STATE = "trainer_state.json"
OPTIMIZER = "optimizer.safetensors"
_STEP_DIR = re.compile(r"^step-(\d{8,})$")


def trainable_names(model: nn.Module) -> list[str]:
    """State-dict names of the parameters that train (shared parameters once)."""
    return [n for n, p in model.named_parameters() if p.requires_grad]


def step_dir_name(step: int) -> str:
    return f"step-{step:08d}"


def _fsync_file(path: Path) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def _write_json(path: Path, obj: Any) -> None:
    with open(path, "w") as f:
        f.write(json.dumps(obj, indent=2) + "\n")
        f.flush()
        os.fsync(f.fileno())


def _save_tensors(
    path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None
) -> None:
    from safetensors.torch import save_file

    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(path), metadata=metadata)
    _fsync_file(path)


def _load_tensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from safetensors import safe_open

    tensors = {}
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata() or {}
        for k in f.keys():
            tensors[k] = f.get_tensor(k)
    return tensors, metadata


# --------------------------------------------------------------------------------------------------
# Finding checkpoints


def complete_checkpoints(run_dir: str | Path) -> list[tuple[int, Path]]:
    """(step, folder) of every complete checkpoint in run_dir, oldest first."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    found = []
    for p in run_dir.iterdir():
        m = _STEP_DIR.match(p.name)
        if m and p.is_dir() and (p / MARKER).is_file():
            found.append((int(m.group(1)), p))
    return sorted(found)


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The newest complete checkpoint; folders without the COMPLETE marker are ignored."""
    found = complete_checkpoints(run_dir)
    return found[-1][1] if found else None


def prune(run_dir: Path, keep_last: int) -> None:
    """Keep the newest `keep_last` complete checkpoints; drop older ones and stale partial folders."""
    found = complete_checkpoints(run_dir)
    newest = found[-1][0] if found else -1
    for _, path in found[:-keep_last]:
        shutil.rmtree(path, ignore_errors=True)
    for p in run_dir.iterdir():
        m = _STEP_DIR.match(p.name)
        if p.name.startswith(".tmp-step-") or (m and not (p / MARKER).exists() and int(m.group(1)) < newest):
            shutil.rmtree(p, ignore_errors=True)


# --------------------------------------------------------------------------------------------------
# RNG states


def rng_state() -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Every RNG this process draws from: tensors for safetensors, the python/numpy scalars as metadata."""
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda.{i}"] = s
    name, keys, pos, has_gauss, cached = np.random.get_state()
    tensors["numpy.keys"] = torch.from_numpy(np.asarray(keys, dtype=np.int64))
    version, state, gauss = random.getstate()
    tensors["python.state"] = torch.tensor(state, dtype=torch.int64)
    meta = {
        "numpy": json.dumps(
            {"name": name, "pos": int(pos), "has_gauss": int(has_gauss), "cached": float(cached)}
        ),
        "python": json.dumps({"version": version, "gauss": gauss}),
    }
    return tensors, meta


def set_rng_state(tensors: dict[str, torch.Tensor], meta: dict[str, str]) -> None:
    torch.set_rng_state(tensors["torch"])
    cuda = [
        tensors[k] for k in sorted((k for k in tensors if k.startswith("cuda.")), key=lambda k: int(k[5:]))
    ]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
    n = json.loads(meta["numpy"])
    np.random.set_state(
        (n["name"], tensors["numpy.keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"])
    )
    p = json.loads(meta["python"])
    random.setstate((p["version"], tuple(int(x) for x in tensors["python.state"].tolist()), p["gauss"]))


# --------------------------------------------------------------------------------------------------
# Optimizer state (FQN-keyed, as torch.distributed.checkpoint.state_dict returns it)


def _flatten_optimizer(osd: dict) -> tuple[dict[str, torch.Tensor], list[dict]]:
    tensors = {}
    for fqn, state in osd["state"].items():
        for key, value in state.items():
            tensors[f"{fqn}/{key}"] = value if isinstance(value, torch.Tensor) else torch.tensor(value)
    groups = []
    for g in osd["param_groups"]:
        g = {k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()}
        groups.append(g)
    return tensors, groups


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], groups: list[dict]) -> dict:
    state: dict[str, dict[str, torch.Tensor]] = {}
    for name, t in tensors.items():
        fqn, key = name.rsplit("/", 1)
        state.setdefault(fqn, {})[key] = t
    param_groups = []
    for g in groups:
        g = dict(g)
        if "betas" in g:
            g["betas"] = tuple(g["betas"])
        param_groups.append(g)
    return {"state": state, "param_groups": param_groups}


# --------------------------------------------------------------------------------------------------
# Save / load


def save_checkpoint(
    run_dir: Path,
    step: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    trainer_state: dict,
    ctx,
    keep_last: int,
    tokenizer_dir: Path | None = None,
) -> Path:
    """Write step-XXXXXXXX/ (a collective: every rank calls it). Returns the final folder.

    `tokenizer_dir` (the shards' tokenizer) is copied in, so the checkpoint loads with `lmforge generate`.
    """
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    from lmforge.model import Transformer, save_model
    from lmforge.model.encoder import Encoder
    from lmforge.model.hf import save_encoder
    from lmforge.train.distributed import unwrap

    inner = unwrap(model)
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    model_sd = get_model_state_dict(inner, options=options)  # gathers FSDP shards onto rank 0
    optim_sd = get_optimizer_state_dict(inner, optimizer, options=options)

    final = run_dir / step_dir_name(step)
    tmp = run_dir / f".tmp-{final.name}"
    if ctx.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    ctx.barrier()
    tensors, meta = rng_state()
    _save_tensors(tmp / f"rng-rank{ctx.rank:05d}.safetensors", tensors, meta)
    if ctx.is_main:
        encoder = isinstance(inner, Encoder)
        with torch.device("meta"):
            full = (Encoder if encoder else Transformer)(inner.config)
        if set(model_sd) == set(full.state_dict()):
            # the savers want a model: build one around the gathered full tensors (no copy, no init)
            full.load_state_dict(model_sd, assign=True)
            if encoder:
                save_encoder(full, tmp)  # a BertModel / BertForMaskedLM folder
            else:
                if inner.config.tie_embeddings:
                    full.lm_head.weight = full.embed_tokens.weight
                save_model(full, tmp)
        else:  # adapters wrap the model (PEFT): only what is trained goes into the checkpoint
            names = trainable_names(inner)
            _save_tensors(tmp / TRAINABLE, {n: model_sd[n] for n in names})
        if tokenizer_dir is not None and tokenizer_dir.is_dir():
            for f in tokenizer_dir.iterdir():
                if f.is_file() and not f.name.startswith("."):
                    shutil.copyfile(f, tmp / f.name)
        for f in tmp.iterdir():
            _fsync_file(f)
        opt_tensors, groups = _flatten_optimizer(optim_sd)
        _save_tensors(tmp / OPTIMIZER, opt_tensors)
        _write_json(
            tmp / STATE, {**trainer_state, "optimizer_param_groups": groups, "world_size": ctx.world_size}
        )
    ctx.barrier()
    if ctx.is_main:
        fsync_dir(tmp)
        if final.exists():  # e.g. an interrupted run saved this step before; replace it whole
            shutil.rmtree(final)
        os.replace(tmp, final)
        fsync_dir(run_dir)
        _write_json(final / MARKER, {"step": step})
        fsync_dir(final)
        prune(run_dir, keep_last)
    ctx.barrier()
    return final


def load_checkpoint(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, ctx) -> dict:
    """Restore model weights, optimizer and this rank's RNG from a complete checkpoint; returns trainer_state.

    Every rank reads the files itself (the run folder is shared, as it must be for saving too).
    """
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    from lmforge.model.encoder import Encoder
    from lmforge.model.hf import bert_from_hf, from_hf_state_dict, read_safetensors, safetensors_files
    from lmforge.train.distributed import unwrap

    if not (path / MARKER).is_file():
        raise ValueError(f"{path}: incomplete checkpoint (no {MARKER} marker)")
    state = json.loads((path / STATE).read_text())
    if state.get("world_size", 1) != ctx.world_size:
        raise ValueError(
            f"{path}: saved by {state.get('world_size')} process(es), resumed with {ctx.world_size}; "
            "resume with the same world size"
        )
    inner = unwrap(model)
    config = inner.config
    if (path / TRAINABLE).is_file():  # a PEFT run: the trained tensors only, the rest is the base model
        model_sd, _ = _load_tensors(path / TRAINABLE)
        missing = sorted(set(trainable_names(inner)) - set(model_sd))
        if missing:
            raise ValueError(
                f"{path}: {TRAINABLE} lacks {', '.join(missing[:5])}; was the run's model changed?"
            )
        set_model_state_dict(inner, model_sd, options=StateDictOptions(full_state_dict=True, strict=False))
    elif isinstance(inner, Encoder):
        model_sd = bert_from_hf(read_safetensors(safetensors_files(path)))
        set_model_state_dict(inner, model_sd, options=StateDictOptions(full_state_dict=True))
    else:
        model_sd = from_hf_state_dict(read_safetensors(safetensors_files(path)), config)
        if config.tie_embeddings:
            model_sd["lm_head.weight"] = model_sd["embed_tokens.weight"]
        set_model_state_dict(inner, model_sd, options=StateDictOptions(full_state_dict=True))
    # strict=False: a trainable parameter that never got a gradient (e.g. a BERT pooler under masked LM)
    # has no AdamW state in the checkpoint, as it had none in the run; the model load above is strict
    options = StateDictOptions(full_state_dict=True, strict=False)
    opt_tensors, _ = _load_tensors(path / OPTIMIZER)
    set_optimizer_state_dict(inner, optimizer, _unflatten_optimizer(opt_tensors, state["optimizer_param_groups"]),
                             options=options)  # fmt: skip
    align_state_layout(optimizer)  # saved contiguous; a parameter may be stored column-major
    rng_file = path / f"rng-rank{ctx.rank:05d}.safetensors"
    tensors, meta = _load_tensors(rng_file)
    set_rng_state(tensors, meta)
    return state
