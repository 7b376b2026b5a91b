"""``advtrain tune``: search training options with Optuna, trials as processes, pruned early.

    advtrain tune (--task T | --data D [--target ...]) --space SPACE.yaml --trials N --out DIR
                  [--pruner median|asha] [--timeout S] [--epochs E] [--seed S] [--preset P]
                  [--set key=value ...] [--device D]

Each trial is an ``advtrain train`` run of the tune's options plus the trial's parameters
(:mod:`.space`), in a process of its own (:mod:`.trial`) with its folder ``DIR/trials/<n>/``
(``checkpoints/``, ``metrics.jsonl``, ``trial.log``). After each epoch the trial reports its
monitored value (``monitor``, default ``val_loss``, in ``mode``) to the study through the run's
``on_epoch_end`` callback, and stops when the pruner (``median``: optuna's MedianPruner;
``asha``: its SuccessiveHalvingPruner; :mod:`.study` has their settings) says so; the tune then
records it as pruned. ``--timeout`` S kills a trial's process group after S seconds (the trial
fails). The study lives in ``DIR/study.db`` (SQLite): running the same command again continues
it (complete and pruned trials are kept; a trial cut short by a killed tune is failed and its
parameters run again; ``--trials`` counts the trials that ended by themselves, so a larger N
extends a finished study). One tune at a time per folder (``DIR/tune.lock``).

Outputs (:mod:`.outputs`): ``DIR/best.yaml`` (for ``advtrain train --config``), ``trials.csv``
and ``tune.png``. Every option and the search space are checked before any trial starts (one
line, exit code 2); optuna is the ``tune`` extra: ``pip install advanced-training-utils[tune]``.

Example::

    advtrain tune --task notes --space space.yaml --trials 20 --epochs 8 --out runs/tune
    advtrain train --task notes --config runs/tune/best.yaml --out runs/best
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import logging
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ...checkpoint import CheckpointError
from ...engine.config import TrainConfig
from ...engine.runlock import RunLock
from .space import Dimension, SpaceError, check_values, read_space
from .study import PRUNERS, StudyMismatch, finished_count, open_study, recover_interrupted
from .trial import OUTCOME_FILE

__all__ = ["add_parser", "main", "TunePlan"]

log = logging.getLogger(__name__)

_EPILOG = """\
Examples:
  advtrain tune --task notes --space space.yaml --trials 20 --epochs 8 --out runs/tune
  advtrain tune --task emotion --space space.yaml --trials 30 --pruner asha --timeout 600 \\
                --set per_piece=2 --out runs/tune-emotion
  advtrain train --task notes --config runs/tune/best.yaml --out runs/best

space.yaml:
  learning_rate: {type: float, low: 1.0e-4, high: 1.0e-2, log: true}
  batch_size: {type: int, low: 16, high: 128, step: 16}
  scheduler_type: {type: categorical, choices: [cosine, plateau]}

Run the same command again to continue a stopped tune (or raise --trials to extend it)."""

def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``advtrain tune``."""
    from ..cli import _HelpFormatter, add_source_arguments

    t = subparsers.add_parser(
        "tune", help="search training options with Optuna (needs the tune extra)",
        description="Search training options: trials as processes, a pruner fed after each "
        "epoch, the study in DIR/study.db (resumable); writes DIR/best.yaml, trials.csv, "
        "tune.png.", epilog=_EPILOG, formatter_class=_HelpFormatter)
    add_source_arguments(t, "a built-in task; not with --data (default: emotion)")
    t.add_argument("--space", type=Path, required=True,
                   help="the search space, YAML (default: none; required)")
    t.add_argument("--trials", type=int, required=True,
                   help="trials to finish: complete, pruned or failed; interrupted ones run "
                   "again (default: none; required)")
    t.add_argument("--out", type=Path, required=True,
                   help="the tune's folder (default: none; required)")
    t.add_argument("--pruner", choices=PRUNERS, default="median",
                   help="median: optuna's MedianPruner; asha: its SuccessiveHalvingPruner")
    t.add_argument("--timeout", type=float, default=None,
                   help="seconds per trial; a trial past it is killed and fails "
                   "(default: none)")
    t.add_argument("--epochs", type=int, default=None,
                   help="epochs per trial (default: from --set/the preset, else the task's)")
    t.add_argument("--seed", type=int, default=0, help="every trial's seed, and the sampler's")
    t.add_argument("--preset", default="stable", help="as for advtrain train")
    t.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                   help="an option fixed for every trial, repeatable (default: none)")
    t.add_argument("--device", default=None, help="as for advtrain train (default: auto)")
    return t


@dataclass
class TunePlan:
    """A checked tune: the study's settings, the space, the trials' command."""

    args: argparse.Namespace
    dims: list[Dimension]
    options: dict[str, Any]        # the resolved options every trial shares (before its params)
    settings: dict[str, Any] = field(default_factory=dict)

    def train_argv(self, out: Path, params: dict[str, Any] | None = None) -> list[str]:
        """The ``advtrain train`` command of a trial with ``params`` (``--set`` each)."""
        from ..cli import _CSV_FLAGS

        a = self.args
        argv = ["train", *(["--task", a.task] if a.task else []),
                *(["--data", str(a.data)] if a.data is not None else [])]
        for flag, _ in _CSV_FLAGS:
            value = getattr(a, flag[2:].replace("-", "_"))
            argv += [flag, value] if value is not None else []
        argv += ["--preset", a.preset, "--seed", str(a.seed), "--quiet", "--out", str(out)]
        argv += ["--epochs", str(a.epochs)] if a.epochs is not None else []
        argv += ["--device", a.device] if a.device is not None else []
        sets = [*a.sets, *(f"{k}={json.dumps(v)}" for k, v in (params or {}).items())]
        return argv + [x for s in sets for x in ("--set", s)]


def _resolve(plan: TunePlan, params: dict[str, Any]) -> dict[str, Any]:
    """The trial's options with ``params`` (raises the CLI's error)."""
    from ..cli import build_parser, resolve_options

    args = build_parser().parse_args(plan.train_argv(plan.args.out, params))
    return resolve_options(args)[0]


def _check_value(plan: TunePlan, params: dict[str, Any]) -> str | None:
    from ..cli import CLIError

    try:
        _resolve(plan, params)
    except CLIError as e:
        return str(e)
    return None


def prepare(args: argparse.Namespace) -> TunePlan:
    """Check everything before any work: optuna, the numbers, the options, the space.

    Raises:
        CLIError / SpaceError: one line naming the problem.
    """
    from ..cli import CLIError, _load_yaml, _valid_keys, task_name

    if importlib.util.find_spec("optuna") is None:
        raise CLIError("advtrain tune needs optuna: pip install advanced-training-utils[tune]")
    if args.trials < 1:
        raise CLIError(f"--trials must be >= 1, got {args.trials}")
    if args.timeout is not None and not (math.isfinite(args.timeout) and args.timeout > 0):
        raise CLIError(f"--timeout must be a positive number of seconds, got {args.timeout}")
    if args.out.exists() and not args.out.is_dir():
        raise CLIError(f"--out {args.out} exists and is not a directory")
    if not args.space.is_file():
        raise CLIError(f"--space: no such file {args.space}")
    plan = TunePlan(args, read_space(args.space, _load_yaml), {})
    options = _resolve(plan, {})
    cfg = TrainConfig.from_options(**options)  # the defaults of what the options leave out
    plan.options = {**options, "epochs": cfg.epochs, "monitor": cfg.monitor, "mode": cfg.mode}
    fixed = {s.partition("=")[0].strip() for s in args.sets}
    both = sorted(fixed & {d.name for d in plan.dims})
    if both:
        raise CLIError(f"option(s) {', '.join(both)} are both searched (--space) and fixed "
                       "(--set); keep one")
    check_values(plan.dims, _valid_keys(task_name(args)), lambda p: _check_value(plan, p))
    plan.settings = {"task": task_name(args), "data": str(args.data) if args.data else None,
                     "preset": args.preset, "sets": sorted(args.sets),
                     "epochs": plan.options["epochs"], "seed": args.seed,
                     "monitor": plan.options["monitor"], "mode": plan.options["mode"],
                     "space": {d.name: repr(d.distribution()) for d in plan.dims}}
    return plan


def main(args: argparse.Namespace) -> int:
    """Run ``advtrain tune``: 0 with a best trial, 1 when none completed, 2 on a usage error,
    130/143 when stopped by a signal (run it again to continue)."""
    from ..cli import CLIError

    try:
        plan = prepare(args)
    except (CLIError, SpaceError) as e:
        print("advtrain: error: " + " ".join(str(e).split()), file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    lock = RunLock(args.out / "tune.lock")
    try:
        lock.acquire()
        study = open_study(args.out, plan.settings, args.pruner, args.seed)
    except (CheckpointError, StudyMismatch) as e:  # RunLockedError: another tune holds DIR
        lock.release()
        print("advtrain: error: " + " ".join(str(e).split()), file=sys.stderr)
        return 2
    try:
        with _signals_stop():
            recover_interrupted(study)
            while finished_count(study) < args.trials:
                _one_trial(study, plan)
        return _finish(study, plan)
    except _Stopped as e:
        print(f"advtrain tune: stopped by signal {e.signum}; run the same command to continue",
              file=sys.stderr)
        return 128 + e.signum
    finally:
        lock.release()


class _Stopped(BaseException):
    """SIGTERM or SIGINT reached the tune."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


@contextlib.contextmanager
def _signals_stop() -> Iterator[None]:
    """SIGTERM/SIGINT raise :class:`_Stopped` (the running trial's process group is stopped on
    the way out; the trial stays RUNNING in the study and runs again next time)."""
    def stop(signum: int, frame: Any) -> None:
        raise _Stopped(signum)

    previous = {s: signal.signal(s, stop) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def _one_trial(study: Any, plan: TunePlan) -> None:
    """Ask the study for a trial, run its process, tell the study how it ended."""
    from optuna.trial import TrialState

    from .study import storage_url

    trial = study.ask({d.name: d.distribution() for d in plan.dims})
    folder = plan.args.out / "trials" / str(trial.number)
    if folder.exists():  # left by an earlier study.db of this folder: not this trial's
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    cmd = [sys.executable, "-m", "advanced_training_utils.app.tune",
           "--storage", storage_url(plan.args.out), "--trial-id", str(trial._trial_id),
           "--pruner", plan.args.pruner, "--parent-pid", str(os.getpid()), "--",
           *plan.train_argv(folder, trial.params)]
    started = time.perf_counter()
    failure = _spawn(cmd, folder, plan.args.timeout)
    outcome = _read_outcome(folder) if failure is None else None
    seconds = time.perf_counter() - started
    trial.set_user_attr("seconds", round(seconds, 2))
    value = outcome.get("value") if outcome else None
    if outcome is not None and outcome["state"] == "pruned":
        study.tell(trial, state=TrialState.PRUNED)
        what = f"pruned after epoch {outcome['epochs_run']} ({_fmt(value)})"
    elif outcome is not None and isinstance(value, (int, float)) and math.isfinite(value):
        study.tell(trial, value)
        what = f"complete: {plan.options['monitor']}={_fmt(value)}"
    else:
        failure = failure or f"no finite {plan.options['monitor']} (see {folder}/trial.log)"
        trial.set_user_attr("failure", failure)
        study.tell(trial, state=TrialState.FAIL)
        what = f"failed: {failure}"
    log.info("tune: trial %d %s; %s [%.1fs]", trial.number, trial.params, what, seconds)


def _fmt(value: Any) -> str:
    return f"{value:.5g}" if isinstance(value, (int, float)) else str(value)


def _spawn(cmd: list[str], folder: Path, timeout: float | None) -> str | None:
    """Run a trial's process (its own session, output to ``trial.log``); None when it exited
    with 0, else why not. Past ``timeout`` its process group is killed; on the way out of the
    tune (a signal, an error) it is sent SIGTERM (the trial checkpoints and stops)."""
    with (folder / "trial.log").open("wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            _kill_group(proc, signal.SIGKILL)
            return f"timeout: killed after {timeout:g}s"
        except BaseException:
            _kill_group(proc, signal.SIGTERM, wait=30.0)
            raise
    return None if rc == 0 else f"exit code {rc} (see {folder / 'trial.log'})"


def _kill_group(proc: subprocess.Popen[bytes], sig: int, wait: float | None = None) -> None:
    """Signal the trial's process group; wait for it (SIGKILL after ``wait`` seconds)."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, sig)
    try:
        proc.wait(timeout=wait)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def _read_outcome(folder: Path) -> dict[str, Any] | None:
    try:
        outcome = json.loads((folder / OUTCOME_FILE).read_text())
    except (OSError, ValueError):
        return None
    return outcome if isinstance(outcome, dict) and "state" in outcome else None


def _finish(study: Any, plan: TunePlan) -> int:
    """Write best.yaml, trials.csv and tune.png; print the summary."""
    from .outputs import best_trial, plot_trials, write_best, write_csv

    out, monitor = plan.args.out, plan.options["monitor"]
    trials = study.get_trials(deepcopy=False)
    best = best_trial(study)
    write_csv(out / "trials.csv", trials, [d.name for d in plan.dims])
    plot_trials(out / "tune.png", trials, monitor, best.number if best else None)
    counts = {s: sum(t.state.name == s for t in trials) for s in ("COMPLETE", "PRUNED", "FAIL")}
    print(f"tune: {len(trials)} trials ({counts['COMPLETE']} complete, {counts['PRUNED']} "
          f"pruned, {counts['FAIL']} failed or interrupted)")
    if best is None:
        print(f"tune: no trial completed; see {out}/trials.csv and {out}/trials/*/trial.log")
        return 1
    a = plan.args
    fixed = {**_fixed_sets(plan), "epochs": plan.options["epochs"], "seed": a.seed}
    source = f"--task {a.task}" if a.task else (f"--data {a.data}" if a.data else "")
    header = [f"advtrain tune: best of {len(trials)} trials: #{best.number}, {monitor}="
              f"{_fmt(best.value)} ({plan.options['mode']})",
              f"advtrain train {source} --preset {a.preset} --config {out / 'best.yaml'} "
              "--out runs/best"]
    path = write_best(out / "best.yaml", best, fixed, header)
    print(f"tune: best trial #{best.number} {best.params}: {monitor}={_fmt(best.value)}; "
          f"wrote {path}, {out / 'trials.csv'}, {out / 'tune.png'}")
    return 0


def _fixed_sets(plan: TunePlan) -> dict[str, Any]:
    """The tune's ``--set`` options as values (parsed the way ``advtrain train`` parses them)."""
    from ..cli import _parse_sets

    return _parse_sets(plan.args.sets)
