"""torchrun: two CPU processes (gloo) with DDP and with FSDP2 reproduce one process with the same global batch.

Marked `torchrun` (select with `pytest -m torchrun`, skip with `-m "not torchrun"`): it launches
`torchrun --standalone --nproc_per_node=2` once, and that launch runs both strategies (about 10 s).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from lmforge.train import train
from lmforge.train.config import config_from_dict
from lmforge.train.metrics import read_metrics

CONFIG = {
    "model": {"preset": "tiny-llama", "n_layer": 2, "n_embd": 32, "n_head": 4, "n_kv_head": 2,
              "intermediate_size": 64, "vocab_size": 128},
    "data": {"synthetic": True, "synthetic_tokens": 20_000, "seq_len": 32},
    "train": {"max_steps": 8, "micro_batch_size": 2, "grad_accum_steps": 2, "lr": 1e-2, "min_lr": 1e-3,
              "warmup_steps": 2, "eval_every": 4, "eval_sequences": 8, "save_every": 4, "progress": False},
}  # fmt: skip

# Both strategies in one launch: the process group is created once here, and train() joins it.
# After each run the last checkpoint loses its COMPLETE marker, so the rerun resumes from step 4 and
# recomputes steps 5-8 through the distributed load path.
WORKER = """
import json, os, shutil, sys
import torch.distributed as dist
from lmforge.train import train
from lmforge.train.config import config_from_dict

config, out = json.loads(sys.argv[1]), sys.argv[2]
dist.init_process_group("gloo")
for strategy in ("ddp", "fsdp"):
    config["dist"] = {"strategy": strategy}
    run = f"{out}/{strategy}"
    train(config_from_dict(config), out_dir=run)
    if dist.get_rank() == 0:
        shutil.copy(f"{run}/metrics.jsonl", f"{run}/first-pass.jsonl")
        os.remove(f"{run}/step-00000008/COMPLETE")
    dist.barrier()
    result = train(config_from_dict(config), out_dir=run)
    assert result.resumed_from.name == "step-00000004", result.resumed_from
dist.destroy_process_group()
"""


def _losses(run_dir: Path, key: str = "loss") -> list[float]:
    return [r[key] for r in read_metrics(run_dir) if key in r]


@pytest.mark.torchrun
def test_torchrun_ddp_and_fsdp2_match_one_process(tmp_path):
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or shutil.which("torchrun")
    if torchrun is None:
        pytest.skip("torchrun not found")
    worker = tmp_path / "worker.py"
    worker.write_text(textwrap.dedent(WORKER))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [torchrun, "--standalone", "--nproc_per_node=2", str(worker), json.dumps(CONFIG), str(tmp_path)],
        env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]

    # one process, same global batch (2 per rank x 2 ranks x 2 accumulation = 2 x 4 accumulation)
    single = config_from_dict({**CONFIG, "train": {**CONFIG["train"], "grad_accum_steps": 4}})
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train(single, out_dir=tmp_path / "single")
    finally:
        torch.set_num_threads(threads)

    expected = _losses(tmp_path / "single")
    assert len(expected) == 8
    for strategy in ("ddp", "fsdp"):
        got = _losses(tmp_path / strategy)
        assert got == pytest.approx(expected, rel=1e-4), strategy
        assert _losses(tmp_path / strategy, "val_loss") == pytest.approx(_losses(tmp_path / "single", "val_loss"),
                                                                         rel=1e-4)  # fmt: skip
        first_pass = [
            json.loads(line) for line in (tmp_path / strategy / "first-pass.jsonl").read_text().splitlines()
        ]
        assert got == [r["loss"] for r in first_pass if "loss" in r]  # resumed from step 4: bit for bit
        final = tmp_path / strategy / "step-00000008"
        assert (final / "COMPLETE").is_file() and (final / "model.safetensors").is_file()
        assert {p.name for p in final.glob("rng-rank*")} == {
            "rng-rank00000.safetensors",
            "rng-rank00001.safetensors",
        }
        assert json.loads((final / "trainer_state.json").read_text())["world_size"] == 2
