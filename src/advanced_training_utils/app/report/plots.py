"""A one-page PNG of a run: losses, LR, gradient norms, clipping, and the diagnosis text."""

from __future__ import annotations

import math
import textwrap
from collections.abc import Sequence
from pathlib import Path

from ...engine.record import HistoryRow

__all__ = ["plot_history"]


def _series(history: Sequence[HistoryRow], key: str) -> list[float]:
    return [float("nan") if h.get(key) is None else float(h[key]) for h in history]


def plot_history(history: Sequence[HistoryRow], path: Path | str, title: str = "",
                 diagnosis: str = "") -> Path:
    """Write a PNG with four panels (loss, LR, grad norm, clip fraction) and the diagnosis.

    Returns:
        The path written.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ep = [h["epoch"] for h in history]
    fig = plt.figure(figsize=(11, 8.5))
    grid = fig.add_gridspec(3, 2, height_ratios=[1, 1, 0.7])
    ax = fig.add_subplot(grid[0, 0])
    ax.plot(ep, _series(history, "train_loss"), "o-", label="train")
    if any(math.isfinite(v) for v in _series(history, "val_loss")):
        ax.plot(ep, _series(history, "val_loss"), "o-", label="val")
    ax.set_title("loss")
    ax.set_xlabel("epoch")
    ax.legend(loc="center right")
    acc_keys = [k for k in (history[0] if history else {}) if k.startswith("val_")
                and k != "val_loss"]
    if acc_keys:
        ax2 = ax.twinx()
        for k in acc_keys:
            ax2.plot(ep, _series(history, k), "s--", color="tab:green", alpha=0.6, label=k)
        ax2.legend(loc="upper right")
        ax2.set_ylabel(", ".join(acc_keys))
    ax = fig.add_subplot(grid[0, 1])
    ax.plot(ep, _series(history, "lr"), "o-", color="tab:purple")
    ax.set_yscale("log")
    ax.set_title("learning rate (end of epoch)")
    ax.set_xlabel("epoch")
    ax = fig.add_subplot(grid[1, 0])
    ax.plot(ep, _series(history, "grad_norm_mean"), "o-", label="mean")
    ax.plot(ep, _series(history, "grad_norm_max"), "^-", label="max")
    ax.set_yscale("log")
    ax.set_title("gradient norm (before clipping)")
    ax.set_xlabel("epoch")
    ax.legend()
    ax = fig.add_subplot(grid[1, 1])
    ax.bar(ep, _series(history, "clip_fraction"), color="tab:orange", label="clipped")
    skipped = _series(history, "skipped_steps")
    if any(s > 0 for s in skipped if math.isfinite(s)):
        ax.plot(ep, skipped, "rx", label="skipped steps")
    ax.set_title("fraction of steps clipped")
    ax.set_xlabel("epoch")
    ax.legend()
    ax = fig.add_subplot(grid[2, :])
    ax.axis("off")
    wrapped = "\n".join(textwrap.fill(line, 150, subsequent_indent="    ")
                        for line in diagnosis.splitlines())
    ax.text(0, 1, "Diagnosis\n" + wrapped, va="top", ha="left", family="monospace",
            fontsize=8, wrap=True)
    fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path
