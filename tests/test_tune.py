"""advtrain tune (app/tune): a 6-trial study on the built-in notes task prunes, survives a
SIGKILL of the tune and its trial (resumes without rerunning finished trials, retries the
interrupted one), and writes a best.yaml that advtrain train --config accepts; a trial past
--timeout is killed and fails; bad spaces and options exit 2 with one line before any work."""

import csv
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

optuna = pytest.importorskip("optuna")

from advanced_training_utils.app import cli  # noqa: E402
from advanced_training_utils.app.tune import PruningReporter, command  # noqa: E402
from advanced_training_utils.app.tune.study import (  # noqa: E402
    STUDY_NAME,
    StudyMismatch,
    finished_count,
    open_study,
    storage_url,
)
from advanced_training_utils.app.tune.trial import OrphanedTrial  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
# Log-uniform over 4.5 decades: the low learning rates barely move the loss, so a median pruner
# fed after each epoch has trials clearly worse than the completed ones to prune.
SPACE = "learning_rate: {type: float, low: 1.0e-7, high: 3.0e-3, log: true}\n"


@pytest.fixture
def child_env(monkeypatch):
    """Trials are processes: they import this checkout's sources."""
    monkeypatch.setenv("PYTHONPATH", str(ROOT / "src") + os.pathsep
                       + os.environ.get("PYTHONPATH", ""))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")


def _args(space, out, *extra):
    return ["tune", "--task", "notes", "--space", str(space), "--out", str(out), "--epochs", "2",
            "--seed", "0", *extra]


def _study(out):
    return optuna.load_study(study_name=STUDY_NAME, storage=storage_url(out))


def _kill_trials_of(out):
    """SIGKILL every trial process working in ``out`` (they run in sessions of their own)."""
    for proc in Path("/proc").iterdir():
        try:
            cmd = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"advanced_training_utils.app.tune" in cmd and any(str(out).encode() in c
                                                                for c in cmd):
            os.kill(int(proc.name), signal.SIGKILL)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="finds the trials in /proc")
def test_a_six_trial_study_prunes_resumes_after_sigkill_and_writes_the_best(tmp_path,
                                                                            child_env):
    space, out = tmp_path / "space.yaml", tmp_path / "tune"
    space.write_text(SPACE)
    tune = subprocess.Popen([sys.executable, "-m", "advanced_training_utils",
                             *_args(space, out, "--trials", "6")], start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while not (out / "trials" / "2" / "trial.log").exists():  # trials 0 and 1 have ended
        assert tune.poll() is None and time.monotonic() < deadline
        time.sleep(0.05)
    os.killpg(tune.pid, signal.SIGKILL)
    tune.wait()
    _kill_trials_of(out)
    before = {t.number: t for t in _study(out).get_trials()}
    assert before[2].state.name == "RUNNING" and finished_count(_study(out)) == 2
    stamps = {n: (out / "trials" / str(n) / "trial.json").stat().st_mtime_ns for n in (0, 1)}

    assert cli.main(_args(space, out, "--trials", "6")) == 0  # the same command resumes

    trials = _study(out).get_trials()
    assert finished_count(_study(out)) == 6
    assert len(trials) == 7  # 0, 1 kept; 2 interrupted; 3..6 new, one of them 2's retry
    assert trials[2].state.name == "FAIL" and trials[2].user_attrs["interrupted"] is True
    retry = [t for t in trials if t.user_attrs.get("retry_of") == 2]
    assert len(retry) == 1 and retry[0].params == before[2].params
    for n in (0, 1):  # not rerun
        assert trials[n].state == before[n].state and trials[n].value == before[n].value
        assert (out / "trials" / str(n) / "trial.json").stat().st_mtime_ns == stamps[n]
    pruned = [t for t in trials if t.state.name == "PRUNED"]
    assert len(pruned) >= 1
    assert all(len(t.intermediate_values) < 2 for t in pruned)  # stopped before the last epoch
    rows = list(csv.DictReader((out / "trials.csv").open()))
    assert [r["state"] for r in rows] == [t.state.name for t in trials]
    assert (out / "tune.png").stat().st_size > 0
    best = _study(out).best_trial
    args = cli.build_parser().parse_args(["train", "--task", "notes", "--config",
                                          str(out / "best.yaml"), "--out", str(tmp_path / "b")])
    options, _ = cli.resolve_options(args)  # advtrain train --config accepts it
    assert options["learning_rate"] == best.params["learning_rate"]
    assert options["epochs"] == 2 and options["seed"] == 0


def test_a_trial_past_its_timeout_is_killed_and_fails(tmp_path, child_env, capsys):
    space, out = tmp_path / "space.yaml", tmp_path / "tune"
    space.write_text("learning_rate: {type: categorical, choices: [1.0e-3]}\n")
    started = time.monotonic()
    assert cli.main(_args(space, out, "--trials", "1", "--timeout", "0.5")) == 1  # none complete
    assert time.monotonic() - started < 30
    (row,) = csv.DictReader((out / "trials.csv").open())
    assert row["state"] == "FAIL" and row["failure"] == "timeout: killed after 0.5s"
    assert not (out / "best.yaml").exists()
    assert "no trial completed" in capsys.readouterr().out


@pytest.mark.parametrize("text, extra, message", [
    ("nope: {type: float, low: 0.0, high: 1.0}\n", [], r"--space: unknown option\(s\) nope; valid "
     r"options: .*learning_rate"),
    ("learning_rate: {type: float, low: 1.0e-2, high: 1.0e-3}\n", [],
     r"learning_rate: low must be below high, got low=0\.01, high=0\.001"),
    ("learning_rate: {type: float, low: 0.0, high: 1.0e-3, log: true}\n", [],
     r"learning_rate: log: true needs low > 0"),
    ("learning_rate: {type: normal, low: 0.0, high: 1.0}\n", [],
     r"learning_rate: type must be one of float, int, categorical, got 'normal'"),
    ("learning_rate: {type: float, low: 0.0, high: 1.0, lo: 2}\n", [],
     r"learning_rate: unknown key\(s\) lo for type float"),
    ("batch_size: {type: int, low: 8.5, high: 64}\n", [], r"batch_size: low must be an integer"),
    ("learning_rate: {type: float, low: 0.0, high: 1.0e-3}\n", [],
     r"--space: learning_rate=0\.0 is refused: learning_rate must be > 0"),
    ("scheduler_type: {type: categorical, choices: [cosine, cosin]}\n", [],
     r"--space: scheduler_type='cosin' is refused: .*scheduler_type"),
    ("epochs: {type: int, low: 1, high: 5}\n", [], r"epochs cannot be searched"),
    ("- learning_rate\n", [], r"expected a non-empty mapping"),
    ("learning_rate: {type: float, low: [\n", [], r"not valid YAML"),
    (SPACE, ["--set", "learning_rate=1e-3"], r"learning_rate are both searched .* and fixed"),
    (SPACE, ["--trials", "0"], r"--trials must be >= 1, got 0"),
    (SPACE, ["--timeout", "-1"], r"--timeout must be a positive number"),
    (SPACE, ["--set", "nope=1"], r"--set: unknown option\(s\) nope"),
])
def test_a_bad_space_or_option_exits_2_with_one_line_before_any_work(tmp_path, capsys, text,
                                                                      extra, message):
    import re

    space, out = tmp_path / "space.yaml", tmp_path / "tune"
    space.write_text(text)
    trials = [] if "--trials" in extra else ["--trials", "3"]
    assert cli.main(_args(space, out, *trials, *extra)) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("advtrain: error: ") and "\n" not in err
    assert re.search(message, err), err
    assert not out.exists()  # nothing was created


def test_without_optuna_the_tune_says_how_to_install_it(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(command.importlib.util, "find_spec",
                        lambda name: None if name == "optuna" else object())
    space = tmp_path / "space.yaml"
    space.write_text(SPACE)
    assert cli.main(_args(space, tmp_path / "tune", "--trials", "1")) == 2
    assert "pip install advanced-training-utils[tune]" in capsys.readouterr().err


def test_a_folder_holding_a_study_of_other_settings_is_refused(tmp_path):
    settings = {"task": "notes", "monitor": "val_loss", "mode": "min", "epochs": 2}
    open_study(tmp_path, settings, "median", 0)
    open_study(tmp_path, dict(settings), "asha", 0)  # the same settings continue it
    with pytest.raises(StudyMismatch, match=r"epochs: 2 -> 3"):
        open_study(tmp_path, {**settings, "epochs": 3}, "median", 0)


class _FakeTrial:
    number = 7

    def __init__(self, prune_from):
        self.reported, self.prune_from = [], prune_from

    def report(self, value, step):
        self.reported.append((step, value))

    def should_prune(self):
        return len(self.reported) >= self.prune_from


def test_the_reporter_reports_the_monitored_value_and_stops_when_the_pruner_says():
    trial = _FakeTrial(prune_from=2)
    r = PruningReporter(trial, "val_accuracy")
    assert r({"epoch": 1, "val_accuracy": 0.5}) is False
    assert r({"epoch": 2, "val_accuracy": math.nan}) is False  # not reported
    assert r({"epoch": 3, "val_accuracy": 0.25}) is True and r.pruned
    assert trial.reported == [(1, 0.5), (3, 0.25)] and r.last_value == 0.25


def test_a_trial_whose_tune_is_gone_stops():
    r = PruningReporter(_FakeTrial(prune_from=99), "val_loss", parent_pid=os.getppid() + 10**6)
    with pytest.raises(OrphanedTrial, match="the tune .* is gone"):
        r({"epoch": 1, "val_loss": 1.0})


@pytest.mark.parametrize("pruner", ["median", "asha"])
def test_each_pruner_prunes_a_clearly_worse_trial_at_its_first_epoch(pruner):
    from advanced_training_utils.app.tune.study import make_pruner

    study = optuna.create_study(pruner=make_pruner(pruner))  # in memory: the same pruners
    for good in (0.12, 0.10):  # each better than the last (ASHA keeps the best of few trials)
        t = study.ask()
        r = PruningReporter(t, "val_loss")
        assert [r({"epoch": e, "val_loss": good / e}) for e in (1, 2, 3)] == [False] * 3
        study.tell(t, good / 3)
    bad = study.ask()
    assert PruningReporter(bad, "val_loss")({"epoch": 1, "val_loss": 5.0}) is True
    fine = study.ask()
    assert PruningReporter(fine, "val_loss")({"epoch": 1, "val_loss": 0.05}) is False
