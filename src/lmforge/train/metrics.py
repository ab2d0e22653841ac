"""Run outputs a person can open: metrics.jsonl (one JSON object per step and per evaluation), loss.png,
and optionally TensorBoard events. Only rank 0 writes them."""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path

METRICS = "metrics.jsonl"
PLOT = "loss.png"


def read_metrics(run_dir: str | Path) -> list[dict]:
    """The records of metrics.jsonl; a torn last line (a killed run) is skipped."""
    path = Path(run_dir) / METRICS
    if not path.is_file():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


class MetricsLog:
    def __init__(self, run_dir: Path, resume_step: int, tensorboard: bool = False):
        self.run_dir = run_dir
        self.path = run_dir / METRICS
        # Resuming from step s: what a killed run logged after s is recomputed, so drop it.
        self.records = [r for r in read_metrics(run_dir) if r.get("step", 0) <= resume_step]
        tmp = self.path.with_name(f".{METRICS}.tmp")
        with open(tmp, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in self.records)
        os.replace(tmp, self.path)
        self._file = open(self.path, "a")
        self._tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise ValueError(
                    "train.tensorboard=true needs the tensorboard package (pip install tensorboard)"
                ) from None
            self._tb = SummaryWriter(str(run_dir / "tensorboard"), purge_step=resume_step + 1)
        self._warned_plot = False

    def log(self, record: dict) -> None:
        self.records.append(record)
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._tb is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)) and value is not None:
                    self._tb.add_scalar(key.replace("val_", "val/") if key.startswith("val_") else f"train/{key}",
                                        value, record["step"])  # fmt: skip

    def plot(self) -> None:
        """loss.png: training loss per step (and its moving average) with validation loss, written atomically."""
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            if not self._warned_plot:
                print("note: matplotlib is not installed; no loss.png", file=sys.stderr)
                self._warned_plot = True
            return
        train = [(r["step"], r["loss"]) for r in self.records if "loss" in r]
        val = [(r["step"], r["val_loss"]) for r in self.records if "val_loss" in r]
        fig, ax = plt.subplots(figsize=(7, 4.2), dpi=100)
        if train:
            steps, losses = zip(*train)
            ax.plot(steps, losses, color="tab:blue", alpha=0.35, linewidth=1, label="train")
            k = max(1, len(losses) // 50)
            if k > 1:
                smooth = [sum(losses[max(0, i - k + 1) : i + 1]) / len(losses[max(0, i - k + 1) : i + 1])
                          for i in range(len(losses))]  # fmt: skip
                ax.plot(steps, smooth, color="tab:blue", linewidth=1.5, label=f"train (mean of {k})")
        if val:
            steps, losses = zip(*val)
            ax.plot(steps, losses, "o-", color="tab:orange", markersize=3, label="validation")
        ax.set_xlabel("step")
        ax.set_ylabel("loss (nats / token)")
        ax.set_title(self.run_dir.name)
        ax.grid(alpha=0.3)
        if train or val:
            ax.legend()
        fig.tight_layout()
        tmp = self.run_dir / f".{PLOT}.tmp"
        fig.savefig(tmp, format="png")
        plt.close(fig)
        os.replace(tmp, self.run_dir / PLOT)

    def close(self) -> None:
        self._file.close()
        if self._tb is not None:
            self._tb.close()


def perplexity(loss: float) -> float:
    return math.exp(loss) if loss < 700 else float("inf")


def format_eta(seconds: float) -> str:
    seconds = int(seconds)
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m:02d}:{s:02d}"
