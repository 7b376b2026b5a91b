"""The table and the learning-curve plot of a comparison, from finished run directories.

A run directory is what ``advtrain train`` writes (``summary.json``, ``metrics.jsonl``);
:func:`read_run` reads one, :func:`summarize` groups runs by configuration (in first-seen order)
into one :class:`ConfigRow` each, :func:`write_tables` writes ``compare.md``, ``compare.csv``
(one row per configuration) and ``runs.csv`` (one row per run), :func:`plot_curves` the
learning curves (``curves.png``). Usable on any list of run directories::

    runs = [read_run(d, config=d.parent.name) for d in sorted(Path("cmp/runs").glob("*/seed*"))]
    rows = summarize(runs, target=0.5)
    write_tables(rows, runs, Path("cmp"))
    plot_curves(runs, Path("cmp/curves.png"))

Per run: the monitored value (``options.monitor``, in ``options.mode``) at the best epoch (the
epoch whose weights were kept) and at the last epoch; the held-out test metric (see
:func:`test_metric`); the wall time (``summary.json``'s ``wall_seconds``: data, training and
test of the process that finished the run) and the training time (the epochs' ``seconds`` summed
over the metrics log, so a resumed run counts every epoch once); the first epoch whose monitored
value reaches ``target`` (``<=`` for ``mode='min'``, ``>=`` for ``'max'``) and the training time
up to it. Per configuration: mean, standard deviation (``ddof=1``) and the 95% Student-t
interval of the mean over the seeds (:mod:`.intervals`), and how many runs reached the target.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .intervals import Interval, mean_interval

__all__ = ["ConfigRow", "RunResult", "markdown_table", "plot_curves", "read_run", "summarize",
           "test_metric", "write_tables"]

#: The held-out metric of a summary.json, in order of preference: (column, where it is).
_TEST_KEYS = (("test_accuracy", ("test_accuracy",)), ("test_bce", ("test_bce",)),
              ("test_uar", ("test", "uar")), ("test_ccc", ("test", "ccc")))


@dataclass(frozen=True)
class RunResult:
    """One finished run: what the comparison's table and plot need of it."""

    config: str
    seed: int
    run_dir: Path
    monitor: str
    mode: str
    curve: list[float]        # the monitored value per epoch, epochs 1..len
    seconds: list[float]      # each epoch's training time (s)
    best_epoch: int | None
    best_value: float | None  # the monitored value at best_epoch
    final_value: float | None
    test_name: str | None
    test_value: float | None
    wall_seconds: float | None
    epochs_run: int

    @property
    def train_seconds(self) -> float:
        """The epochs' training time summed (s)."""
        return math.fsum(self.seconds)

    def epochs_to(self, target: float | None) -> int | None:
        """The first epoch whose monitored value reaches ``target``; None: never (or no target)."""
        if target is None:
            return None
        for epoch, v in enumerate(self.curve, 1):
            if math.isfinite(v) and (v <= target if self.mode == "min" else v >= target):
                return epoch
        return None

    def seconds_to(self, target: float | None) -> float | None:
        """The training time (s) up to the end of :meth:`epochs_to`'s epoch; None: never."""
        e = self.epochs_to(target)
        return None if e is None else math.fsum(self.seconds[:e])


def test_metric(summary: dict[str, Any]) -> tuple[str | None, float | None]:
    """The held-out metric of a run's summary: ``test_accuracy`` (emotion), ``test_bce``
    (notes), ``test_uar`` or ``test_ccc`` (``--data``), the first present; (None, None)."""
    for name, path in _TEST_KEYS:
        v: Any = summary
        for k in path:
            v = v.get(k) if isinstance(v, dict) else None
        if isinstance(v, (int, float)):
            return name, float(v)
    return None, None


def _history(metrics: Path, epochs_run: int) -> list[dict[str, Any]]:
    """The metrics log's rows by epoch (a later row of an epoch wins: a resumed run may have
    logged an epoch again), epochs 1..epochs_run; a line cut short is skipped."""
    rows: dict[int, dict[str, Any]] = {}
    for line in metrics.read_text().splitlines() if metrics.is_file() else []:
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict) and isinstance(row.get("epoch"), int):
            rows[row["epoch"]] = row
    return [rows[e] for e in sorted(rows) if e <= epochs_run]


def read_run(run_dir: Path, config: str | None = None) -> RunResult:
    """The :class:`RunResult` of a finished run directory (``config``: its configuration's
    name; default the parent folder's name).

    Raises:
        ValueError: no readable ``summary.json`` (the run is not finished).
    """
    run_dir = Path(run_dir)
    try:
        s = json.loads((run_dir / "summary.json").read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"{run_dir}: no readable summary.json; is the run finished? ({e})"
                         ) from None
    opts = s.get("options", {})
    monitor, mode = opts.get("monitor", "val_loss"), opts.get("mode", "min")
    hist = _history(run_dir / "metrics.jsonl", int(s.get("epochs_run") or 0))
    curve = [float(r.get(monitor, math.nan)) for r in hist]
    best = s.get("best_epoch")
    name, value = test_metric(s)
    return RunResult(
        config=config or run_dir.parent.name, seed=int(s.get("seed", 0)), run_dir=run_dir,
        monitor=monitor, mode=mode, curve=curve,
        seconds=[float(r.get("seconds", 0.0)) for r in hist], best_epoch=best,
        best_value=curve[best - 1] if best and best <= len(curve) else None,
        final_value=curve[-1] if curve else None, test_name=name, test_value=value,
        wall_seconds=s.get("wall_seconds"), epochs_run=len(curve))


@dataclass(frozen=True)
class ConfigRow:
    """One configuration's line of the table (intervals over its runs; see the module doc)."""

    config: str
    runs: int
    monitor: str
    mode: str
    best: Interval                 # the monitored value at the best epoch
    final: Interval                # ... at the last epoch
    test_name: str | None
    test: Interval
    wall_seconds: float            # mean
    train_seconds: float           # mean
    best_epoch: float              # mean
    target: float | None
    reached: int                   # runs that reached the target
    epochs_to_target: float        # mean over the runs that reached it (NaN: none)
    seconds_to_target: float       # mean training time to it over the same runs
    seeds: list[int] = field(default_factory=list)


def _finite(values: Sequence[float | None]) -> list[float]:
    return [float(v) for v in values if v is not None and math.isfinite(v)]


def _mean(values: Sequence[float | None]) -> float:
    v = _finite(values)
    return math.fsum(v) / len(v) if v else math.nan


def summarize(runs: Sequence[RunResult], target: float | None = None,
              level: float = 0.95) -> list[ConfigRow]:
    """One :class:`ConfigRow` per configuration of ``runs`` (first-seen order)."""
    groups: dict[str, list[RunResult]] = {}
    for r in runs:
        groups.setdefault(r.config, []).append(r)
    rows = []
    for name, rs in groups.items():
        reached = [r for r in rs if r.epochs_to(target) is not None]
        rows.append(ConfigRow(
            config=name, runs=len(rs), monitor=rs[0].monitor, mode=rs[0].mode,
            best=mean_interval(_finite([r.best_value for r in rs]), level),
            final=mean_interval(_finite([r.final_value for r in rs]), level),
            test_name=rs[0].test_name,
            test=mean_interval(_finite([r.test_value for r in rs]), level),
            wall_seconds=_mean([r.wall_seconds for r in rs]),
            train_seconds=_mean([r.train_seconds for r in rs]),
            best_epoch=_mean([r.best_epoch for r in rs]), target=target, reached=len(reached),
            epochs_to_target=_mean([r.epochs_to(target) for r in reached]),
            seconds_to_target=_mean([r.seconds_to(target) for r in reached]),
            seeds=[r.seed for r in rs]))
    return rows


def _csv_row(row: ConfigRow) -> dict[str, Any]:
    out: dict[str, Any] = {k: v for k, v in asdict(row).items()
                           if k not in ("best", "final", "test", "seeds")}
    for key in ("best", "final", "test"):
        iv: Interval = getattr(row, key)
        out.update({f"{key}_mean": iv.mean, f"{key}_std": iv.std, f"{key}_ci_low": iv.low,
                    f"{key}_ci_high": iv.high})
    out["seeds"] = " ".join(map(str, row.seeds))
    return out


def _run_row(r: RunResult, target: float | None) -> dict[str, Any]:
    return {"config": r.config, "seed": r.seed, "run_dir": str(r.run_dir), "monitor": r.monitor,
            "mode": r.mode, "best_value": r.best_value, "best_epoch": r.best_epoch,
            "final_value": r.final_value, "test_name": r.test_name, "test_value": r.test_value,
            "wall_seconds": r.wall_seconds, "train_seconds": r.train_seconds,
            "epochs_run": r.epochs_run, "epochs_to_target": r.epochs_to(target),
            "seconds_to_target": r.seconds_to(target)}


def _write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]) if rows else ["config"])
        w.writeheader()
        w.writerows({k: "" if v is None or v != v else v for k, v in r.items()} for r in rows)


def _fmt(v: float, digits: int = 4) -> str:
    return "n/a" if v is None or not math.isfinite(v) else f"{v:.{digits}g}"


def _cell(iv: Interval) -> str:
    if iv.n == 0:
        return "n/a"
    if iv.n == 1:
        return f"{_fmt(iv.mean)} (1 run)"
    return f"{_fmt(iv.mean)} ± {_fmt(iv.std, 2)} [{_fmt(iv.low)}, {_fmt(iv.high)}]"


def markdown_table(rows: Sequence[ConfigRow], failed: Sequence[str] = ()) -> str:
    """The comparison as a Markdown table, with a line saying what the numbers are."""
    if not rows:
        return "No finished runs.\n" + "".join(f"- failed: {f}\n" for f in failed)
    r0 = rows[0]
    mixed = len({(r.monitor, r.mode) for r in rows}) > 1
    monitor = "monitored value" if mixed else r0.monitor
    test = r0.test_name or "test"
    target = ("" if r0.target is None else
              f"; epochs to {monitor} {'<=' if r0.mode == 'min' else '>='} {r0.target:g}: "
              "mean over the runs that reached it (reached/runs)")
    lines = [f"Mean ± std [95% Student-t interval of the mean] over seeds; {monitor} at the "
             f"best epoch{'' if mixed else f' (mode {r0.mode})'}; wall: seconds per run (data, "
             f"training, test){target}.",
             "", f"| config | runs | best {monitor} | final {monitor} | {test} | wall s "
             "| best epoch | epochs to target |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        to = ("n/a" if r.target is None else
              f"{_fmt(r.epochs_to_target, 3) if r.reached else 'not reached'} "
              f"({r.reached}/{r.runs})")
        name = f"{r.config} ({r.monitor}, {r.mode})" if mixed else r.config
        lines.append(f"| {name} | {r.runs} | {_cell(r.best)} | {_cell(r.final)} | "
                     f"{_cell(r.test)} | {_fmt(r.wall_seconds, 3)} | {_fmt(r.best_epoch, 3)} "
                     f"| {to} |")
    lines += [""] + [f"- failed: {f}" for f in failed]
    return "\n".join(lines).rstrip() + "\n"


def write_tables(rows: Sequence[ConfigRow], runs: Sequence[RunResult], out: Path,
                 failed: Sequence[str] = ()) -> list[Path]:
    """Write ``compare.md``, ``compare.csv`` (one row per configuration: the
    :class:`ConfigRow` fields, each interval as ``<name>_mean/_std/_ci_low/_ci_high``) and
    ``runs.csv`` (one row per run) into ``out``; an empty cell is a missing value. Returns the
    paths."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "compare.md").write_text(markdown_table(rows, failed))
    _write_csv(out / "compare.csv", [_csv_row(r) for r in rows])
    target = rows[0].target if rows else None
    _write_csv(out / "runs.csv", [_run_row(r, target) for r in runs])
    return [out / "compare.md", out / "compare.csv", out / "runs.csv"]


def plot_curves(runs: Sequence[RunResult], path: Path, title: str = "") -> Path:
    """The monitored value per epoch, one line per configuration: the mean over its seeds, and
    a band from their minimum to their maximum (at each epoch, over the runs that reached it).
    Writes a PNG at ``path``; returns it."""
    import numpy as np
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    groups: dict[str, list[RunResult]] = {}
    for r in runs:
        groups.setdefault(r.config, []).append(r)
    fig = Figure(figsize=(8, 4.5), layout="constrained")
    ax = fig.add_subplot()
    for name, rs in groups.items():
        n = max((len(r.curve) for r in rs), default=0)
        vals = np.full((len(rs), n), np.nan)
        for i, r in enumerate(rs):
            vals[i, : len(r.curve)] = r.curve
        have = ~np.all(np.isnan(vals), axis=0)
        epochs = np.arange(1, n + 1)[have]
        v = vals[:, have]
        line = ax.plot(epochs, np.nanmean(v, axis=0), marker="o", ms=3,
                       label=f"{name} ({len(rs)} seeds)")[0]
        ax.fill_between(epochs, np.nanmin(v, axis=0), np.nanmax(v, axis=0),
                        color=line.get_color(), alpha=0.2, linewidth=0)
    monitor = runs[0].monitor if runs else "monitored value"
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("epoch")
    ax.set_ylabel(monitor)
    ax.set_title(title or f"{monitor}: mean over seeds, band min-max")
    if groups:
        ax.legend(fontsize="small")
    ax.grid(alpha=0.3)
    fig.savefig(path, dpi=90)
    return Path(path)
