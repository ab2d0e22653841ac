"""Checkpoints and resume: a run killed (SIGKILL) or stopped (SIGTERM) anywhere and resumed reproduces the
uninterrupted run's per-step losses exactly; a checkpoint without its COMPLETE marker is never used."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from lmforge.train import latest_checkpoint, train
from lmforge.train.cli import main as pretrain_main
from lmforge.train.config import config_from_dict
from lmforge.train.metrics import read_metrics

CONFIG = {
    "model": {"preset": "tiny-llama", "n_layer": 2, "n_embd": 32, "n_head": 4, "n_kv_head": 2,
              "intermediate_size": 64, "vocab_size": 128, "dropout": 0.1},  # dropout: the torch RNG matters
    "data": {"synthetic": True, "synthetic_tokens": 20_000, "seq_len": 32},
    "train": {"max_steps": 40, "micro_batch_size": 4, "grad_accum_steps": 2, "lr": 1e-2, "min_lr": 1e-3,
              "warmup_steps": 3, "eval_every": 9, "eval_sequences": 8, "save_every": 5, "keep_last": 2,
              "progress": False},
}  # fmt: skip


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models run fastest on one thread, above all on a busy machine; subprocesses get the same."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def losses(run_dir) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(run_dir) if "loss" in r}


def val_losses(run_dir) -> dict[int, float]:
    return {r["step"]: r["val_loss"] for r in read_metrics(run_dir) if "val_loss" in r}


def start(config_path: Path, out: Path) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # the same kernels as this process
    return subprocess.Popen([sys.executable, "-m", "lmforge.train", "--config", str(config_path), "--out", str(out)],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)  # fmt: skip


def wait_for_step(proc: subprocess.Popen, run_dir: Path, step: int, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not any(s >= step for s in losses(run_dir)):
        assert proc.poll() is None, f"the run ended before step {step}: {proc.stderr.read().decode()}"
        assert time.monotonic() < deadline, f"no step {step} after {timeout} s"
        time.sleep(0.002)


def test_resume_after_sigkill_and_sigterm_is_bitwise_exact(tmp_path):
    reference = train(config_from_dict(CONFIG), out_dir=tmp_path / "reference")
    assert reference.step == 40
    config_path = tmp_path / "run.yaml"
    config_path.write_text(yaml.safe_dump(CONFIG))
    run = tmp_path / "run"

    killed = start(config_path, run)  # SIGKILL: no chance to save; resume from the last checkpoint
    wait_for_step(killed, run, 8)
    killed.kill()
    assert killed.wait() == -signal.SIGKILL
    assert latest_checkpoint(run) is not None

    stopped = start(config_path, run)  # SIGTERM: saves a checkpoint where it is and exits cleanly
    wait_for_step(stopped, run, 18)
    stopped.send_signal(signal.SIGTERM)
    _, err = stopped.communicate(timeout=60)
    assert stopped.returncode == 128 + signal.SIGTERM, err.decode()
    assert b"stopped by SIGTERM" in err and b"Traceback" not in err
    stopped_at = int(latest_checkpoint(run).name.removeprefix("step-"))
    assert stopped_at >= 18

    resumed = train(config_from_dict(CONFIG), out_dir=run)
    assert resumed.resumed_from.name == f"step-{stopped_at:08d}"
    assert losses(run) == losses(tmp_path / "reference")  # every step, bit for bit
    assert val_losses(run) == val_losses(tmp_path / "reference")
    assert len(list(run.glob("step-*"))) == 2  # keep_last


def test_incomplete_checkpoint_is_ignored(tmp_path):
    cfg = config_from_dict({**CONFIG, "train": {**CONFIG["train"], "max_steps": 12, "keep_last": 3}})
    run = tmp_path / "run"
    train(cfg, out_dir=run)
    reference = losses(run)
    assert [p.name for p in sorted(run.glob("step-*"))] == ["step-00000005", "step-00000010", "step-00000012"]
    # A crash between the rename and the marker leaves a folder without COMPLETE; one while writing, a .tmp-.
    (run / "step-00000012" / "COMPLETE").unlink()
    (run / "step-00000010" / "COMPLETE").unlink()
    shutil.copytree(run / "step-00000005", run / ".tmp-step-00000011")
    assert latest_checkpoint(run).name == "step-00000005"

    result = train(cfg, out_dir=run)
    assert result.resumed_from.name == "step-00000005"
    assert losses(run) == reference
    assert sorted(p.name for p in run.glob("*step-*")) == ["step-00000005", "step-00000010", "step-00000012"]
    assert all((p / "COMPLETE").is_file() for p in run.glob("step-*"))


def test_cli_runs_with_dotted_overrides(tmp_path, capsys, monkeypatch):
    import lmforge.cli

    monkeypatch.setattr(lmforge.cli, "_PLUGINS", ["lmforge.train.cli"])  # `lmforge pretrain`
    config_path = tmp_path / "run.yaml"
    config_path.write_text(yaml.safe_dump(CONFIG))
    code = lmforge.cli.main(["pretrain", "--config", str(config_path), "--out", str(tmp_path / "run"),
                             "--train.max_steps=3", "--train.save_every", "2", "--model.dropout=0.0"])  # fmt: skip
    assert code == 0
    assert "pretrain: done (step 3" in capsys.readouterr().err
    assert sorted(p.name for p in (tmp_path / "run").glob("step-*")) == ["step-00000002", "step-00000003"]
    assert pretrain_main(["--config", str(config_path), "--out", str(tmp_path / "x"), "--train.lr=fast"]) == 1
    assert "train.lr: expected a number" in capsys.readouterr().err
