"""What ``advtrain tune`` leaves in its folder: ``best.yaml``, ``trials.csv``, ``tune.png``.

* ``best.yaml``: the best complete trial's options as a config file for
  ``advtrain train --config DIR/best.yaml`` (with the tune's ``--task``/``--data`` and
  ``--preset``, named in its header): the tune's ``--set`` options, the trial's parameters,
  ``epochs`` and ``seed``.
* ``trials.csv``: one row per trial: number, state, value, epochs reported, seconds, the trial
  it retries, why it failed, and each parameter (``param_<name>``).
* ``tune.png``: each trial's monitored value per epoch (as reported to the pruner); pruned
  trials end in a cross, failed ones are dashed, the best trial is drawn thick.
"""

from __future__ import annotations

import csv
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from ...safeio import atomic_write

__all__ = ["write_best", "write_csv", "plot_trials", "best_trial"]

#: The figure's size in inches and resolution.
SIZE, DPI = (7.0, 4.0), 110


def best_trial(study: Any) -> Any | None:
    """The best complete trial, or None (no trial completed)."""
    from optuna.trial import TrialState

    if not study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        return None
    return study.best_trial


def write_best(path: Path, trial: Any, fixed: Mapping[str, Any], header: Sequence[str]) -> Path:
    """Write ``trial``'s options (``fixed`` then its parameters) as a YAML config file with
    ``header`` as comment lines."""
    options = {**fixed, **trial.params}
    text = "".join(f"# {line}\n" for line in header)
    text += yaml.safe_dump(options, sort_keys=False, default_flow_style=False)
    atomic_write(path, lambda f: f.write(text.encode()))  # never a half-written config
    return path


def write_csv(path: Path, trials: Sequence[Any], names: Sequence[str]) -> Path:
    """One row per trial (see the module docstring)."""
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["number", "state", "value", "epochs", "seconds", "retry_of", "failure",
                    *(f"param_{n}" for n in names)])
        for t in trials:
            seconds = (round((t.datetime_complete - t.datetime_start).total_seconds(), 2)
                       if t.datetime_complete and t.datetime_start else "")
            w.writerow([t.number, t.state.name, "" if t.value is None else t.value,
                        len(t.intermediate_values), seconds, t.user_attrs.get("retry_of", ""),
                        t.user_attrs.get("failure", "interrupted" if t.user_attrs.get(
                            "interrupted") else ""), *(t.params.get(n, "") for n in names)])
    return path


def plot_trials(path: Path, trials: Sequence[Any], monitor: str, best: int | None,
                title: str = "") -> Path:
    """Each trial's reported values per epoch (module docstring); ``best``: its number."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    fig = Figure(figsize=SIZE, layout="constrained")
    ax = fig.add_subplot()
    for t in trials:
        steps = sorted(t.intermediate_values)
        if not steps:
            continue
        values = [t.intermediate_values[s] for s in steps]
        state = t.state.name
        style = {"lw": 2.6 if t.number == best else 1.0, "ls": "--" if state == "FAIL" else "-",
                 "alpha": 1.0 if t.number == best or state == "COMPLETE" else 0.6}
        (line,) = ax.plot(steps, values, marker=".", **style,
                          label=f"#{t.number} {state.lower()}" + (" (best)" if t.number == best
                                                                  else ""))
        if state == "PRUNED":
            ax.plot(steps[-1], values[-1], "x", color=line.get_color(), ms=10, mew=2)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("epoch")
    ax.set_ylabel(monitor)
    ax.grid(alpha=0.3)
    if 0 < len(ax.get_lines()) and len(trials) <= 20:
        ax.legend(fontsize=7, ncol=2)
    ax.set_title(title or f"advtrain tune: {monitor} per epoch (x: pruned)", fontsize=10)
    fig.savefig(path, dpi=DPI)
    return path
