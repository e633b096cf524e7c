"""Metrics as JSON lines (``metrics.jsonl``) and the loss-curve PNG drawn from them.

Each training line: ``{"type": "train", "iteration", "loss", "loss_classifier", ...,
"lr", "images_per_s", "time_s"}`` (losses averaged over the lines' period, across ranks).
Each evaluation line: ``{"type": "eval", "iteration", "bbox": {"AP": ...}, "segm": {...}}``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path


class MetricsWriter:
    """Appends JSON lines; on resume, first drops the lines the interrupted run wrote after its checkpoint."""

    def __init__(self, path: str | os.PathLike, resume_iteration: int | None = None):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_iteration is None:
            self.path.write_text("")
        elif self.path.exists():
            kept = [line for line in read_metrics(self.path) if line.get("iteration", 0) <= resume_iteration]
            self.path.write_text("".join(json.dumps(r) + "\n" for r in kept))

    def write(self, record: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")


def read_metrics(path: str | os.PathLike) -> list[dict]:
    rows = []
    with open(path) as f:
        for line in f:
            line = line.strip()
            if line:
                rows.append(json.loads(line))
    return rows


def plot_loss_curves(metrics_path: str | os.PathLike, out_path: str | os.PathLike) -> bool:
    """Draw each loss, the learning rate and the evaluation APs against the iteration; False if no data."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(metrics_path)
    train = [r for r in rows if r.get("type") == "train"]
    evals = [r for r in rows if r.get("type") == "eval"]
    if not train:
        return False
    its = [r["iteration"] for r in train]
    names = [k for k in train[0] if k.startswith("loss")]
    fig, axes = plt.subplots(1, 3 if evals else 2, figsize=(15 if evals else 10, 4))
    ax = axes[0]
    for name in names:
        ax.plot(its, [r[name] for r in train], label=name, linewidth=2.0 if name == "loss" else 1.0)
    ax.set_yscale("log")
    ax.set_xlabel("iteration")
    ax.set_title("training losses")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    axes[1].plot(its, [r["lr"] for r in train])
    axes[1].set_xlabel("iteration")
    axes[1].set_title("learning rate")
    axes[1].grid(True, alpha=0.3)
    if evals:
        ev_its = [r["iteration"] for r in evals]
        for kind in ("bbox", "segm"):
            axes[2].plot(ev_its, [r[kind]["AP"] for r in evals], marker="o", label=f"{kind} AP")
            axes[2].plot(ev_its, [r[kind]["AP50"] for r in evals], marker=".", linestyle="--", label=f"{kind} AP50")
        axes[2].set_xlabel("iteration")
        axes[2].set_title("validation (COCO AP)")
        axes[2].grid(True, alpha=0.3)
        axes[2].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out_path, dpi=100)
    plt.close(fig)
    return True
