"""``advtrain compare``: configurations x seeds into run folders, the table, the plot, resume."""

import csv
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from _audio_corpus import folder_corpus
from advanced_training_utils.app import compare as cmp
from advanced_training_utils.app.cli import main
from advanced_training_utils.app.report.comparison import read_run, summarize
from advanced_training_utils.app.report.intervals import mean_interval, t_quantile, t_two_sided

ROOT = Path(__file__).resolve().parents[1]
# the notes task, one epoch of large batches: about a second per run
NOTES = ["--task", "notes", "--device", "cpu", "--set", "batch_size=1024"]

pytestmark = pytest.mark.usefixtures("isolated_cache")


# ---- the interval: Student t quantiles against a printed table and numpy

@pytest.mark.parametrize(("df", "t975", "t995"), [
    (1, 12.7062, 63.6567), (2, 4.3027, 9.9248), (3, 3.1824, 5.8409), (4, 2.7764, 4.6041),
    (5, 2.5706, 4.0321), (9, 2.2622, 3.2498), (10, 2.2281, 3.1693), (30, 2.0423, 2.7500),
    (120, 1.9799, 2.6174)])
def test_t_quantile_matches_the_table(df, t975, t995):
    assert t_quantile(0.975, df) == pytest.approx(t975, abs=1e-4)
    assert t_quantile(0.995, df) == pytest.approx(t995, abs=1e-4)
    assert t_two_sided(t975, df) == pytest.approx(0.95, abs=1e-5)


def test_t_quantile_matches_scipy():
    stats = pytest.importorskip("scipy.stats")
    for df in (1, 2, 3, 6, 7, 15, 16, 50, 1001):
        for p in (0.6, 0.9, 0.975, 0.999):
            assert t_quantile(p, df) == pytest.approx(stats.t.ppf(p, df), rel=1e-8)


def test_mean_interval_against_numpy():
    x = np.array([0.81, 0.77, 0.85, 0.79])
    iv = mean_interval(list(x))
    half = 3.182446305 * x.std(ddof=1) / 2  # t(0.975, 3) * s / sqrt(4)
    assert (iv.n, iv.mean, iv.std) == (4, pytest.approx(x.mean()), pytest.approx(x.std(ddof=1)))
    assert (iv.low, iv.high) == (pytest.approx(x.mean() - half), pytest.approx(x.mean() + half))
    one = mean_interval([0.5])
    assert one.mean == 0.5 and math.isnan(one.std) and math.isnan(one.low)
    with pytest.raises(ValueError, match="p must be in"):
        t_quantile(0.4, 3)


# ---- configurations from presets, files and --set grids (no training)

def _args(*argv):
    from advanced_training_utils.app.cli import build_parser

    return build_parser().parse_args(["compare", "--seeds", "1", "--out", "x", *argv])


def test_configurations_are_the_product_of_presets_files_and_grids(tmp_path):
    f = tmp_path / "mine.yaml"
    f.write_text("learning_rate: 1.0e-3\n")
    got = cmp.configurations(_args("--preset", "fast", "--config", str(f), "--set",
                                   "scheduler_type=cosine,plateau", "--set", "epochs=3",
                                   "--set", "metrics=[accuracy,uar]"))
    assert list(got) == ["fast+scheduler_type=cosine", "fast+scheduler_type=plateau",
                         "mine+scheduler_type=cosine", "mine+scheduler_type=plateau"]
    assert got["mine+scheduler_type=plateau"] == {
        "learning_rate": 1e-3, "scheduler_type": "plateau", "epochs": 3,
        "metrics": ["accuracy", "uar"]}
    assert got["fast+scheduler_type=cosine"]["preset"] == "fast"


def test_config_files_sharing_a_stem_are_named_by_their_folders(tmp_path):
    # `--config runs/tune1/best.yaml --config runs/tune2/best.yaml` (two different files) was
    # refused as "configuration 'best' given twice"; so was a file fast.yaml with --preset fast.
    for folder in ("tune1", "tune2", "x"):
        (tmp_path / folder).mkdir()
    (tmp_path / "tune1" / "best.yaml").write_text("learning_rate: 1.0e-3\n")
    (tmp_path / "tune2" / "best.yaml").write_text("learning_rate: 2.0e-3\n")
    (tmp_path / "x" / "fast.yaml").write_text("learning_rate: 3.0e-3\n")
    got = cmp.configurations(_args("--preset", "fast", "--config", str(tmp_path / "tune1/best.yaml"),
                                   "--config", str(tmp_path / "tune2/best.yaml"),
                                   "--config", str(tmp_path / "x/fast.yaml")))
    assert list(got) == ["fast", "tune1/best", "tune2/best", "x/fast"]
    assert [got[k].get("learning_rate") for k in got] == [None, 1e-3, 2e-3, 3e-3]
    with pytest.raises(cmp.CLIError, match="configuration 'best' given twice"):
        cmp.configurations(_args("--config", str(tmp_path / "tune1/best.yaml"),
                                 "--config", str(tmp_path / "tune1/../tune1/best.yaml")))


@pytest.mark.parametrize(("argv", "message"), [
    (["--task", "notes", "--seeds", "2"], "no configuration to compare"),
    (["--task", "notes", "--preset", "fast", "--seeds", "0"], "--seeds must be >= 1, got 0"),
    (["--task", "notes", "--preset", "fast", "--seeds", "1", "--set", "lr"],
     "--set expects KEY=VALUE"),
    (["--task", "notes", "--preset", "fast", "--seeds", "1", "--set", "learning_rate=1,"],
     "--set learning_rate: an empty value"),
    (["--task", "notes", "--preset", "fast", "--seeds", "1", "--set", "bogus=1,2"],
     "unknown option(s) bogus"),
    (["--task", "notes", "--preset", "fast", "--seeds", "1", "--set", "learning_rate=-1,1"],
     "learning_rate"),
    (["--task", "notes", "--preset", "nope", "--seeds", "1"], "unknown preset 'nope'"),
    (["--preset", "fast", "--seeds", "1"], "give exactly one of --task"),
    (["--task", "notes", "--preset", "fast", "--seeds", "1", "--jobs", "0"], "--jobs must be"),
    (["--task", "notes", "--preset", "fast", "--preset", "fast", "--seeds", "1"],
     "configuration 'fast' given twice"),
])
def test_bad_arguments_exit_2_with_one_line_and_no_work(tmp_path, capsys, argv, message):
    out = tmp_path / "cmp"
    assert main(["compare", *argv, "--out", str(out)]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith("advtrain: error: "), err
    assert message in err[0]
    assert not out.exists()


# ---- a 2-config x 2-seed comparison: the run folders, the table, the plot

def _csv(path):
    with path.open() as f:
        return list(csv.DictReader(f))


def test_two_configs_two_seeds_table_equals_the_runs(tmp_path, capsys):
    out = tmp_path / "cmp"
    argv = ["compare", *NOTES, "--preset", "fast", "--preset", "stable", "--seeds", "2",
            "--epochs", "2", "--target", "0.5", "--out", str(out)]
    assert main(argv) == 0
    assert "| fast | 2 |" in capsys.readouterr().out
    for name in ("compare.md", "compare.csv", "runs.csv", "curves.png"):
        assert (out / name).stat().st_size > 0, name
    rows = {r["config"]: r for r in _csv(out / "compare.csv")}
    assert list(rows) == ["fast", "stable"]
    for config, row in rows.items():
        best, test, wall, best_epoch, reached_at = [], [], [], [], []
        for seed in (0, 1):
            d = out / "runs" / config / f"seed{seed}"
            s = json.loads((d / "summary.json").read_text())
            hist = [json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines()]
            assert s["seed"] == seed and s["preset"] == config and s["epochs_run"] == 2
            assert (d / "checkpoints" / "notes_last.pt").is_file()
            best.append(hist[s["best_epoch"] - 1]["val_loss"])
            test.append(s["test_bce"])
            wall.append(s["wall_seconds"])
            best_epoch.append(s["best_epoch"])
            reached_at += [next(h["epoch"] for h in hist if h["val_loss"] <= 0.5)] if min(
                h["val_loss"] for h in hist) <= 0.5 else []
        half = 12.706204736 * np.std(best, ddof=1) / math.sqrt(2)  # t(0.975, 1)
        assert float(row["best_mean"]) == pytest.approx(np.mean(best), rel=1e-9)
        assert float(row["best_std"]) == pytest.approx(np.std(best, ddof=1), rel=1e-9)
        assert float(row["best_ci_low"]) == pytest.approx(np.mean(best) - half, rel=1e-9)
        assert float(row["best_ci_high"]) == pytest.approx(np.mean(best) + half, rel=1e-9)
        assert float(row["test_mean"]) == pytest.approx(np.mean(test), rel=1e-9)
        assert row["test_name"] == "test_bce" and row["monitor"] == "val_loss"
        assert float(row["wall_seconds"]) == pytest.approx(np.mean(wall), rel=1e-9)
        assert float(row["best_epoch"]) == pytest.approx(np.mean(best_epoch))
        assert row["reached"] == str(len(reached_at))
        if reached_at:
            assert float(row["epochs_to_target"]) == pytest.approx(np.mean(reached_at))
        else:
            assert row["epochs_to_target"] == ""
    # this target tells the two apart: stable (lr 2e-3, plateau) reaches it in 2 epochs,
    # fast (onecycle) does not
    assert (rows["fast"]["reached"], rows["stable"]["reached"]) == ("0", "2")
    assert len(_csv(out / "runs.csv")) == 4
    # the same folder with other options is refused, before any work
    capsys.readouterr()
    assert main([*argv[:-2], "--epochs", "3", "--out", str(out)]) == 2
    assert "holds a run of other options (epochs)" in capsys.readouterr().err


def test_curves_plot_mean_and_min_max_band(tmp_path):
    """The plot's line is the seeds' mean, its band their min and max (built on fake runs)."""
    from advanced_training_utils.app.report.comparison import RunResult

    def run(seed, curve):
        return RunResult("a", seed, tmp_path, "val_loss", "min", curve, [1.0] * len(curve), 1,
                         curve[0], curve[-1], None, None, 1.0, len(curve))

    runs = [run(0, [1.0, 0.5, 0.4]), run(1, [3.0, 0.7]), run(2, [2.0, 0.6, 0.2])]
    import matplotlib.figure

    figs = []
    real = matplotlib.figure.Figure.savefig
    with pytest.MonkeyPatch.context() as m:
        m.setattr(matplotlib.figure.Figure, "savefig",
                  lambda self, *a, **k: (figs.append(self), real(self, *a, **k))[1])
        cmp.plot_curves(runs, tmp_path / "c.png")
    ax = figs[0].axes[0]
    assert list(ax.lines[0].get_ydata()) == pytest.approx([2.0, 0.6, 0.3])
    band = ax.collections[0].get_paths()[0].vertices[:, 1]
    assert {round(v, 6) for v in band} >= {1.0, 0.5, 0.2, 3.0, 0.7, 0.4}
    rows = summarize(runs, target=0.55)  # run 0 at epoch 2, run 2 at epoch 3, run 1 never
    assert (rows[0].reached, rows[0].epochs_to_target, rows[0].seconds_to_target) == (2, 2.5, 2.5)


# ---- a killed comparison resumes without rerunning finished runs

def _summaries(out):
    return {p.parent.relative_to(out): p.stat().st_mtime_ns
            for p in (out / "runs").glob("*/seed*/summary.json")}


def _unfinished_with_checkpoint(out):
    return [d for d in (out / "runs").glob("*/seed*") if not (d / "summary.json").exists()
            and (d / "checkpoints" / "notes_last.pt").exists()]


def _epochs(d):
    return [(r["epoch"], r["seconds"], r["val_loss"]) for r in map(
        json.loads, (d / "metrics.jsonl").read_text().splitlines())]


@pytest.mark.skipif(os.name != "posix", reason="kills a process group")
def test_killed_comparison_resumes_without_rerunning_finished_runs(tmp_path, caplog):
    """Killed (SIGKILL to the comparison and its two workers) once a run finished and another
    checkpointed; the same command again (here one run at a time, in this process) runs only
    the unfinished ones, continuing their checkpoints."""
    from advanced_training_utils.checkpoint import HISTORY_KEY, load_checkpoint

    out = tmp_path / "cmp"
    argv = ["compare", *NOTES, "--preset", "fast", "--preset", "stable", "--seeds", "2",
            "--epochs", "3", "--out", str(out)]
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src") + os.pathsep
               + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    p = subprocess.Popen([sys.executable, "-m", "advanced_training_utils", *argv, "--jobs", "2"],
                         env=env, start_new_session=True, stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while not (_summaries(out) and _unfinished_with_checkpoint(out)):
            assert p.poll() is None and time.monotonic() < deadline, "no run finished"
            time.sleep(0.05)
    finally:
        os.killpg(p.pid, signal.SIGKILL)  # the comparison and its workers
        p.wait()
    before = _summaries(out)
    assert 1 <= len(before) < 4, before
    saved = {d: [(r["epoch"], r["seconds"], r["val_loss"]) for r in load_checkpoint(
        d / "checkpoints" / "notes_last.pt")[HISTORY_KEY]] for d in _unfinished_with_checkpoint(out)}
    assert any(saved.values())
    caplog.set_level("INFO", logger="advanced_training_utils.app.compare")
    assert main(argv) == 0
    after = _summaries(out)
    assert len(after) == 4
    assert {k: after[k] for k in before} == before  # the finished runs were not rerun
    assert f"4 runs, {len(before)} finished before, {4 - len(before)} to run" in caplog.text
    for d, hist in saved.items():  # continued from the checkpoint, not started over
        assert _epochs(d)[:len(hist)] == hist
    for d in (out / "runs").glob("*/seed*"):
        assert [e[0] for e in _epochs(d)] == [1, 2, 3]
        assert read_run(d).epochs_run == 3


@pytest.mark.timeout(60)
@pytest.mark.skipif(os.name != "posix", reason="signals")
def test_sigterm_stops_the_parallel_workers_and_raises(monkeypatch, tmp_path):
    """SIGTERM to the comparison reaches its running workers (each would checkpoint), starts no
    other run and raises TrainingPreempted (exit code 143)."""
    import threading

    from advanced_training_utils.engine.preemption import TrainingPreempted

    started = []

    def start(run, report):  # a worker that waits for SIGTERM
        started.append(subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"]))
        return started[-1]

    monkeypatch.setattr(cmp, "_start", start)
    runs = [cmp.RunSpec(f"c{i}", 0, tmp_path / f"c{i}", "notes", "fast", {}, {}, None)
            for i in range(3)]
    threading.Timer(0.5, os.kill, (os.getpid(), signal.SIGTERM)).start()
    with pytest.raises(TrainingPreempted) as e:
        cmp._run_parallel(runs, 2, False)
    assert e.value.code == 143 and len(started) == 2
    assert [p.returncode for p in started] == [-signal.SIGTERM] * 2


# ---- --data: a wav corpus

@pytest.mark.filterwarnings("ignore:y_pred contains classes not in y_true")
def test_compare_on_a_wav_folder(tmp_path, capsys):
    root, _ = folder_corpus(tmp_path / "wavs", speakers=4, per_class=1, broken=False)
    out = tmp_path / "cmp"
    assert main(["compare", "--data", str(root), "--preset", "fast", "--set",
                 "learning_rate=1e-3,3e-3", "--set", "n_mels=32", "--seeds", "1", "--epochs",
                 "1", "--device", "cpu", "--run-reports", "--out", str(out)]) == 0
    rows = _csv(out / "compare.csv")
    assert [r["config"] for r in rows] == ["fast+learning_rate=1e-3", "fast+learning_rate=3e-3"]
    for r in rows:
        d = out / "runs" / r["config"] / "seed0"
        s = json.loads((d / "summary.json").read_text())
        assert s["task"] == "audio" and s["data"]["layout"] == "folder"
        assert (d / "report.png").is_file() and (d / "diagnosis.txt").is_file()
        assert r["test_name"] == "test_uar"
        assert float(r["test_mean"]) == pytest.approx(s["test"]["uar"])
        assert r["runs"] == "1" and r["best_std"] == ""  # one seed: no std
    assert (out / "curves.png").is_file()


@pytest.mark.parametrize(("summary", "expected"), [
    ({"test_accuracy": 0.9, "test": {"uar": 0.5, "accuracy": 0.9}}, ("test_accuracy", 0.9)),
    ({"test_bce": 0.08, "mean_baseline_bce": 0.09}, ("test_bce", 0.08)),
    ({"test": {"uar": 0.5, "accuracy": 0.7, "macro_f1": 0.4}}, ("test_uar", 0.5)),
    ({"test": {"ccc": 0.3, "mae": 0.1}}, ("test_ccc", 0.3)),
    ({"test": None}, (None, None)),
])
def test_test_metric_of_each_kind_of_summary(summary, expected):
    from advanced_training_utils.app.report.comparison import test_metric

    assert test_metric(summary) == expected


# ---- a failed run is listed, the others are tabled, the exit code is 1

def test_a_failed_run_is_listed_and_the_rest_tabled(tmp_path, monkeypatch, capsys):
    real = cmp.train_run

    def train_run(out, name, options, task_opts, **k):
        if options["seed"] == 1 and "fast" in str(out):
            raise RuntimeError("diverged")
        return real(out, name, options, task_opts, **k)

    monkeypatch.setattr(cmp, "train_run", train_run)
    out = tmp_path / "cmp"
    assert main(["compare", *NOTES, "--preset", "fast", "--seeds", "2", "--epochs", "1",
                 "--out", str(out)]) == 1
    md = (out / "compare.md").read_text()
    assert "- failed: fast seed 1: RuntimeError: diverged" in md
    assert _csv(out / "compare.csv")[0]["runs"] == "1"


def test_a_worker_records_its_peak_resident_memory(tmp_path):
    import resource

    cmp._write_peak_rss(tmp_path)
    got = json.loads((tmp_path / cmp.PEAK_RSS_FILE).read_text())["peak_rss_mb"]
    want = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB
    assert 0 < got <= want + 0.1 and got >= want * 0.99
