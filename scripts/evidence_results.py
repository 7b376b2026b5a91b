"""What one evidence cell measured, read from its finished run directories (scripts/evidence.py).

Per run, on top of :class:`~advanced_training_utils.app.report.comparison.RunResult`: the
training loss at the kept (best) epoch and the gap ``val_loss - train_loss`` there, the mean
training seconds per epoch, the mean fraction of clipped steps, the skipped steps and rollbacks
summed over the epochs (``metrics.jsonl``), and the process's peak resident memory when the run
ran in its own process (``peak_rss.json``, written by compare's worker).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from evidence_studies import Cell

from advanced_training_utils.app.report.comparison import RunResult, read_run
from advanced_training_utils.app.report.intervals import Interval, mean_interval

__all__ = ["CellResult", "StudyResult", "run_extras", "read_cell"]


def _rows(run_dir: Path) -> list[dict[str, Any]]:
    rows: dict[int, dict[str, Any]] = {}
    path = run_dir / "metrics.jsonl"
    for line in path.read_text().splitlines() if path.is_file() else []:
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict) and isinstance(row.get("epoch"), int):
            rows[row["epoch"]] = row  # a resumed run may log an epoch again: the later wins
    return [rows[e] for e in sorted(rows)]


def _num(v: Any) -> float:
    return float(v) if isinstance(v, (int, float)) else math.nan


def run_extras(run: RunResult) -> dict[str, float]:
    """The per-run numbers the module docstring lists (NaN where missing)."""
    rows = _rows(run.run_dir)[: run.epochs_run]
    best = rows[run.best_epoch - 1] if run.best_epoch and run.best_epoch <= len(rows) else {}
    train = _num(best.get("train_loss"))
    val = _num(best.get("val_loss"))
    try:
        rss = float(json.loads((run.run_dir / "peak_rss.json").read_text())["peak_rss_mb"])
    except (OSError, ValueError, KeyError, TypeError):
        rss = math.nan
    return {
        "train_loss": train, "gap": val - train,
        "s_per_epoch": run.train_seconds / max(1, run.epochs_run),
        "clip_fraction": (math.fsum(_num(r.get("clip_fraction")) for r in rows) / len(rows)
                          if rows else math.nan),
        "skipped": math.fsum(_num(r.get("skipped_steps", 0)) for r in rows),
        "rollbacks": max((_num(r.get("rollbacks", 0)) for r in rows), default=math.nan),
        "peak_rss_mb": rss,
        "grad_norm_max": [_num(r.get("grad_norm_max")) for r in rows],
    }


@dataclass
class CellResult:
    """One cell's finished runs (``planned``: how many it should have)."""

    cell: Cell
    key: str                      # the configuration's name in compare (its folder)
    run_dirs: list[Path]
    runs: list[RunResult] = field(default_factory=list)
    extras: list[dict[str, Any]] = field(default_factory=list)

    @property
    def planned(self) -> int:
        return len(self.run_dirs)

    def values(self, name: str) -> list[float]:
        """Per-run values of ``name``: a RunResult attribute (``test_value``, ``best_value``,
        ``final_value``, ``train_seconds``) or an extra (``gap``, ``s_per_epoch``, ...)."""
        if self.runs and hasattr(self.runs[0], name):
            vals = [getattr(r, name) for r in self.runs]
        else:
            vals = [e.get(name) for e in self.extras]
        return [float(v) for v in vals if isinstance(v, (int, float)) and math.isfinite(v)]

    def iv(self, name: str) -> Interval:
        """The 95% interval of the mean of ``name`` over the runs."""
        return mean_interval(self.values(name))

    def epochs_to(self, target: float | None, budget: int) -> Interval:
        """Epochs to reach ``target`` per run, an unreached target counting as ``budget + 1``."""
        if target is None:
            return mean_interval([])
        return mean_interval([float(r.epochs_to(target) or budget + 1) for r in self.runs])

    def seconds_to(self, target: float | None) -> Interval:
        """Training seconds to reach ``target``, over the runs that reached it."""
        if target is None:
            return mean_interval([])
        return mean_interval([float(t) for r in self.runs
                              if (t := r.seconds_to(target)) is not None])

    def reached(self, target: float | None) -> int:
        return sum(r.epochs_to(target) is not None for r in self.runs)


def read_cell(cell: Cell, key: str, run_dirs: list[Path]) -> CellResult:
    """The :class:`CellResult` of ``run_dirs`` (unfinished runs are left out)."""
    res = CellResult(cell, key, list(run_dirs))
    for d in run_dirs:
        try:
            run = read_run(d, config=cell.label)
        except ValueError:
            continue
        res.runs.append(run)
        res.extras.append(run_extras(run))
    return res


@dataclass
class StudyResult:
    """A study's cells, the target it used, what it skipped, its plots and failures."""

    name: str
    title: str
    task: str
    what: str
    epochs: int
    cells: list[CellResult]
    target: float | None = None
    skipped: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    plots: list[Path] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def cell(self, label: str) -> CellResult | None:
        return next((c for c in self.cells if c.cell.label == label), None)

    @property
    def test_name(self) -> str:
        for c in self.cells:
            for r in c.runs:
                if r.test_name:
                    return r.test_name
        return "test"

    @property
    def higher_is_better(self) -> bool:
        return self.test_name != "test_bce"
