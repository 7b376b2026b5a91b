"""The history row: one epoch's record, typed, built from the epoch's numbers, and printed.

:class:`HistoryRow` is what ``train_model_advanced`` returns in ``history``, writes as a line of
``{model_name}_metrics.jsonl`` and stores in checkpoints; the report (``app/report``) reads the
same keys. It is a ``TypedDict``: a plain dict at run time (JSON, checkpoints and user code see
dicts), with keys a type checker knows.

Example:
    >>> row = HistoryRow(epoch=1, train_loss=0.5, val_loss=0.6, lr=1e-3, grad_norm_mean=0.2,
    ...                  grad_norm_max=0.4, clip_fraction=0.0, skipped_steps=0, spike_steps=0,
    ...                  nonfinite_train_examples=0, rollbacks=0, seconds=1.0, improved=True)
    >>> summary_line(row, epochs=3)
    'epoch 1/3 train_loss=0.5000 val_loss=0.6000 lr=0.001 grad_norm=0.2 clip=0% (1.0s) *'
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any, TypedDict

__all__ = ["HistoryRow", "epoch_row", "summary_line", "run_grad_stats", "log_stability"]

log = logging.getLogger(__name__)


class _OptionalFields(TypedDict, total=False):
    nonfinite_val_examples: int   # with a val_loader: validation examples with a non-finite loss
    recovery_event: str           # a rollback in this epoch: what happened
    stability_healthy: bool       # a stability check ran this epoch: no NaN/Inf found
    nonfinite_params: list[str]   # ... and the parameters whose gradients or weights were not
    stopped_by_callback: bool     # on_epoch_end returned True: the run stopped after this epoch


class HistoryRow(_OptionalFields):
    """One epoch of the history (plus a ``val_<metric>`` float per metric, after ``val_loss``).

    Losses are example-weighted means (NaN when no finite batch); ``lr`` is the first param
    group's at the end of the epoch; the grad-norm fields are the clipper's pre-clip statistics
    over the epoch's optimizer steps; ``rollbacks`` counts the run's rollbacks so far;
    ``improved`` says the epoch became the best.
    """

    epoch: int
    train_loss: float
    val_loss: float
    lr: float
    grad_norm_mean: float
    grad_norm_max: float
    clip_fraction: float
    skipped_steps: int
    spike_steps: int
    nonfinite_train_examples: int
    rollbacks: int
    seconds: float
    improved: bool


def epoch_row(epoch: int, nums: Mapping[str, Any], clip: Mapping[str, float], lr: float,
              skipped: int, spikes: int, rollbacks: int, seconds: float, improved: bool,
              event: str | None, stability: Mapping[str, Any] | None) -> HistoryRow:
    """The row of ``epoch`` from its read numbers (:func:`.loop.read_sums`), the clipper's
    statistics, the monitor's counts and (when it ran this epoch) the stability check."""
    row: dict[str, Any] = {
        "epoch": epoch,
        "train_loss": nums["train_loss"],
        "val_loss": nums.get("val_loss", float("nan")),
        **{k: v for k, v in nums.items() if k.startswith("val_") and k != "val_loss"},
        "lr": lr,
        "grad_norm_mean": clip["mean_norm"],
        "grad_norm_max": clip["max_norm"],
        "clip_fraction": clip["clip_fraction"],
        "skipped_steps": skipped,
        "spike_steps": spikes,
        "nonfinite_train_examples": nums["nonfinite_train_examples"],
        **({"nonfinite_val_examples": nums["nonfinite_val_examples"]}
           if "nonfinite_val_examples" in nums else {}),
        "rollbacks": rollbacks,
        "seconds": seconds,
        "improved": improved,
    }
    if event is not None:
        row["recovery_event"] = event
    if stability is not None and stability["epoch"] == epoch:
        g, w = stability["gradients"], stability["weights"]
        row["stability_healthy"] = g["healthy"] and w["healthy"]
        row["nonfinite_params"] = sorted(set(
            g["nan_grad_params"] + g["inf_grad_params"]
            + w["nan_weight_params"] + w["inf_weight_params"]))
    return row  # type: ignore[return-value]  # the val_<metric> keys are open-ended


def summary_line(e: Mapping[str, Any], epochs: int) -> str:
    """The one-line summary of a row, as printed after each epoch."""
    extra = "".join(f" {k}={v:.4f}" for k, v in e.items()
                    if k.startswith("val_") and k != "val_loss" and isinstance(v, float))
    skipped = f" skipped={e['skipped_steps']}" if e["skipped_steps"] else ""
    event = f" [{e['recovery_event']}]" if e.get("recovery_event") else ""
    return (f"epoch {e['epoch']}/{epochs} train_loss={e['train_loss']:.4f} "
            f"val_loss={e['val_loss']:.4f}{extra} lr={e['lr']:.3g} "
            f"grad_norm={e['grad_norm_mean']:.3g} clip={e['clip_fraction']:.0%}{skipped} "
            f"({e['seconds']:.1f}s){' *' if e['improved'] else ''}{event}")


def run_grad_stats(history: Sequence[Mapping[str, Any]]) -> dict[str, float]:
    """The clipper's statistics over the run: mean of the epoch means, max of the maxima."""
    if not history:
        return {"mean_norm": 0.0, "max_norm": 0.0, "clip_fraction": 0.0}
    return {
        "mean_norm": sum(h["grad_norm_mean"] for h in history) / len(history),
        "max_norm": max(h["grad_norm_max"] for h in history),
        "clip_fraction": sum(h["clip_fraction"] for h in history) / len(history),
    }


def log_stability(s: Mapping[str, Any]) -> None:
    """Log a stability check's findings (a warning naming the parameters when unhealthy)."""
    g, w = s["gradients"], s["weights"]
    if g["healthy"] and w["healthy"]:
        log.info("epoch %d stability: healthy (grad norm %.4g, max |w| %.4g)", s["epoch"],
                 g["total_norm"], w["max_weight"])
    else:
        log.warning("epoch %d stability: NaN/Inf in gradients of %s, weights of %s", s["epoch"],
                    g["nan_grad_params"] + g["inf_grad_params"],
                    w["nan_weight_params"] + w["inf_weight_params"])

