"""One trial of ``advtrain tune``, in a process of its own.

    python -m advanced_training_utils.app.tune --storage URL --trial-id ID \\
        --pruner median --parent-pid PID -- train --task notes ... --out DIR/trials/N

The arguments after ``--`` are an ``advtrain train`` command (the tune's options and the
trial's parameters as ``--set``); they are resolved and checked the same way. The run goes to
``--out`` (``checkpoints/``, ``metrics.jsonl``; no test evaluation or report, which a trial does
not need: ``advtrain report DIR/trials/N`` draws one). After each epoch,
:class:`PruningReporter` (the run's ``on_epoch_end``) reports the monitored value to the study
(``trial.report(value, epoch)``) and returns True when the pruner says prune, which stops the
run after that epoch's checkpoint. The process then writes ``trial.json``: ``state``
(``complete`` or ``pruned``), ``value`` (the best monitored value; a pruned trial's last
reported one), ``epochs_run``. The tune reads it and tells the study; a trial whose process
fails or times out is failed by the tune.

A trial whose tune is gone (killed) stops at its next epoch end: its parent process changed.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
from pathlib import Path
from typing import Any

from ...engine.config import TrainConfig
from ...engine.record import HistoryRow
from .study import PRUNERS, STUDY_NAME, make_pruner

__all__ = ["PruningReporter", "OrphanedTrial", "main", "OUTCOME_FILE"]

log = logging.getLogger(__name__)

#: What a trial's process leaves in its folder for the tune.
OUTCOME_FILE = "trial.json"


class OrphanedTrial(RuntimeError):
    """The tune that started this trial is gone."""


class PruningReporter:
    """``on_epoch_end`` of a trial: report the monitored value, stop when the pruner says so.

    Args:
        trial: the ``optuna.Trial`` of this process.
        monitor: the history key the study optimises (``val_loss``, ``val_accuracy``...).
        parent_pid: the tune's pid (None: not checked).
    """

    def __init__(self, trial: Any, monitor: str, parent_pid: int | None = None) -> None:
        self.trial, self.monitor, self.parent_pid = trial, monitor, parent_pid
        self.pruned = False
        self.last_value: float | None = None

    def __call__(self, row: HistoryRow) -> bool:
        if self.parent_pid is not None and os.getppid() != self.parent_pid:
            raise OrphanedTrial(f"the tune (pid {self.parent_pid}) is gone; stopping trial "
                                f"{self.trial.number} after epoch {row['epoch']}")
        value = row.get(self.monitor)
        if not isinstance(value, (int, float)) or not math.isfinite(value):
            return False  # nothing to report: the pruner judges reported values only
        self.last_value = float(value)
        self.trial.report(self.last_value, step=int(row["epoch"]))
        self.pruned = bool(self.trial.should_prune())
        return self.pruned


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="advtrain-tune-trial", description=__doc__)
    p.add_argument("--storage", required=True, help="the study's SQLite URL")
    p.add_argument("--trial-id", type=int, required=True, help="optuna's trial id")
    p.add_argument("--pruner", choices=PRUNERS, required=True)
    p.add_argument("--parent-pid", type=int, default=None)
    return p


def _build_task(args: argparse.Namespace, name: str, seed: int, task_opts: dict[str, Any]
                ) -> Any:
    from ..cli import audio_plan
    from ..tasks import build_task
    from ..usertask import AUDIO_TASK, build_audio_task

    if name == AUDIO_TASK:
        return build_audio_task(audio_plan(args), seed, task_opts)
    return build_task(name, seed, task_opts)


def run_trial(own: argparse.Namespace, train_argv: list[str]) -> tuple[dict[str, Any], Path]:
    """Train the trial's command with the pruning reporter; return its outcome and folder."""
    import optuna

    from ...engine.run import train_model_advanced
    from ..cli import build_parser, resolve_options, task_name

    args = build_parser().parse_args(train_argv)
    options, task_opts = resolve_options(args)
    monitor = TrainConfig.from_options(**options).monitor
    name = task_name(args)
    study = optuna.load_study(study_name=STUDY_NAME, storage=own.storage,
                              pruner=make_pruner(own.pruner))
    trial = optuna.trial.Trial(study, own.trial_id)
    reporter = PruningReporter(trial, monitor, own.parent_pid)
    task = _build_task(args, name, options["seed"], task_opts)
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    res = train_model_advanced(task.model, task.train_loader, task.val_loader, task.criterion,
                               checkpoint_dir=out / "checkpoints", model_name=name,
                               metrics_file=out / "metrics.jsonl", on_epoch_end=reporter,
                               **options)
    pruned = bool(res["stopped_by_callback"])
    value = reporter.last_value if pruned else res["best_metric"]
    return {"state": "pruned" if pruned else "complete", "value": value,
            "epochs_run": res["epochs_run"], "best_epoch": res["best_epoch"]}, out


def main(argv: list[str] | None = None) -> int:
    """Run one trial; 0 with ``trial.json`` written, 2 on an option error, else the error."""
    from ..cli import CLIError

    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--" not in argv:
        print("advtrain-tune-trial: error: expected -- and a train command", file=sys.stderr)
        return 2
    cut = argv.index("--")
    own = _parser().parse_args(argv[:cut])
    train_argv = argv[cut + 1:]
    try:
        outcome, out = run_trial(own, train_argv)
    except CLIError as e:
        print("advtrain: error: " + " ".join(str(e).split()), file=sys.stderr)
        return 2
    tmp = out / (OUTCOME_FILE + ".tmp")
    tmp.write_text(json.dumps(outcome) + "\n")
    os.replace(tmp, out / OUTCOME_FILE)
    return 0

