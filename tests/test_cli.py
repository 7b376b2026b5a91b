import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from advanced_training_utils.app.cli import main
from advanced_training_utils.checkpoint import EPOCH_KEY, STEP_KEY, load_checkpoint

ROOT = Path(__file__).resolve().parents[1]

FAST = ["--quiet", "--epochs", "1", "--set", "per_piece=1", "--device", "cpu"]


pytestmark = pytest.mark.usefixtures("isolated_cache")


def test_presets_lists_all(capsys):
    assert main(["presets"]) == 0
    out = capsys.readouterr().out
    for name in ("fast", "stable", "memory_constrained (alias: memory)", "scheduler_type: onecycle"):
        assert name in out


@pytest.mark.filterwarnings("ignore:y_pred contains classes not in y_true")
def test_train_emotion_writes_run_dir_and_resumes(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--task", "emotion", "--preset", "fast", "--out", str(out), *FAST]) == 0
    for name in ("metrics.jsonl", "summary.json", "report.png", "diagnosis.txt",
                 "checkpoints/emotion_last.pt", "checkpoints/emotion_best.pt"):
        assert (out / name).exists(), name
    s = json.loads((out / "summary.json").read_text())
    assert s["task"] == "emotion" and s["epochs_run"] == 1 and 0 <= s["test_accuracy"] <= 1
    assert s["options"]["scheduler_type"] == "onecycle"
    assert "held-out test accuracy" in capsys.readouterr().out
    _assert_test_metrics_equal_scikit_learn(out, s)
    _assert_report_panels(out, s)
    # Resume to 2 epochs: continues the same run.
    assert main(["train", "--task", "emotion", "--preset", "fast", "--out", str(out), "--resume",
                 "--quiet", "--epochs", "2", "--set", "per_piece=1", "--device", "cpu"]) == 0
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["epoch"] for x in lines] == [1, 2]


def _assert_test_metrics_equal_scikit_learn(out, s):
    """summary.json's test metrics = scikit-learn on the best weights' test predictions."""
    from sklearn.metrics import (
        balanced_accuracy_score,
        confusion_matrix,
        f1_score,
        recall_score,
    )

    from advanced_training_utils.app.tasks import build_task
    from advanced_training_utils.checkpoint import MODEL_KEY, load_checkpoint

    task = build_task("emotion", s["seed"], s["task_options"])
    task.model.load_state_dict(load_checkpoint(out / "checkpoints" / "emotion_best.pt")[MODEL_KEY])
    x, y = task.test_loader.dataset.tensors
    with torch.no_grad():
        pred = task.model.eval()(x).argmax(1).numpy()
    y = y.numpy()
    t = s["test"]
    assert t["class_names"] == ["happy", "calm", "sad", "tense"] == s["classes"]
    assert t["accuracy"] == pytest.approx((pred == y).mean(), abs=1e-12) == s["test_accuracy"]
    assert t["uar"] == pytest.approx(balanced_accuracy_score(y, pred), abs=1e-12)
    assert t["macro_f1"] == pytest.approx(f1_score(y, pred, average="macro"), abs=1e-12)
    recall = recall_score(y, pred, labels=range(4), average=None, zero_division=np.nan)
    mine = [np.nan if t["per_class_recall"][c] is None else t["per_class_recall"][c]
            for c in t["class_names"]]
    assert mine == pytest.approx(list(recall), abs=1e-12, nan_ok=True)
    assert t["confusion_matrix"] == confusion_matrix(y, pred, labels=range(4)).tolist()


def _assert_report_panels(out, s):
    """The report of a built-in emotion run: confusion, recall and the training inputs."""
    from advanced_training_utils.app.report import build_report_figure, load_run_details

    history = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    fig = build_report_figure(history, details=load_run_details(out, s, s["options"], history))
    titles = [ax.get_title() for ax in fig.axes]
    assert "test confusion matrix (rows normalised; counts)" in titles
    assert f"test recall per class (dashed: UAR {s['test']['uar']:.3f})" in titles
    assert titles[-3:] == [f"training input {i}: as loaded (no augmentation in this run)"
                           for i in (1, 2, 3)]   # the fast preset does not augment
    assert "gradient norm (no clipping)" in titles  # nor clip


def test_train_notes_with_yaml_config_and_set(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("learning_rate: 0.005\nbatch_size: 128\ngradient_clip: 2.0\n")
    out = tmp_path / "notes"
    rc = main(["train", "--task", "notes", "--out", str(out), "--config", str(cfg), "--quiet",
               "--epochs", "2", "--set", "gradient_clip=0.5", "--set", "use_augmentation=false"])
    assert rc == 0
    s = json.loads((out / "summary.json").read_text())
    assert s["options"]["learning_rate"] == 0.005  # from the file
    assert s["options"]["gradient_clip"] == 0.5     # --set wins over the file
    assert s["options"]["use_augmentation"] is False
    assert s["task_options"]["batch_size"] == 128
    assert s["test_bce"] > 0 and "scale_degree_probe" in s


def test_report_subcommand(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.jsonl").write_text("\n".join(json.dumps(
        {"epoch": i, "train_loss": 1 / i, "val_loss": 1 / i, "lr": 1e-3, "grad_norm_mean": 1.0,
         "grad_norm_max": 2.0, "clip_fraction": 0.0, "skipped_steps": 0}) for i in range(1, 4)))
    assert main(["report", str(out)]) == 0
    assert (out / "report.png").exists()
    assert "Healthy run" in capsys.readouterr().out


@pytest.mark.parametrize("argv, message", [
    (["train", "--preset", "turbo"], "unknown preset 'turbo'; valid presets: fast, stable"),
    (["train", "--set", "lr=0.1"], "--set: unknown option(s) lr; valid options: "),
    (["train", "--set", "epochs"], "--set expects KEY=VALUE, got 'epochs'"),
    (["train", "--set", "epochs=0"], "epochs must be >= 1, got 0"),
    (["train", "--set", "checkpoint_dir=/x"], "--set: checkpoint_dir cannot be set here: the "
     "command sets it itself (the run directory --out holds the checkpoints"),
    (["train", "--set", "on_epoch_end=x"], "on_epoch_end cannot be set here"),
    (["train", "--config", "/nonexistent.yaml"], "--config: no such file"),
    (["report", "/nonexistent-run"], "no such run directory"),
])
def test_bad_input_is_a_clear_error(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("advtrain: error: ") and message in err


def test_bad_yaml_and_unknown_config_key(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("learning_rate: [1, 2\n")
    assert main(["train", "--config", str(bad)]) == 2
    assert "not valid YAML" in capsys.readouterr().err
    unk = tmp_path / "unk.yaml"
    unk.write_text("warmup: 3\n")
    assert main(["train", "--config", str(unk)]) == 2
    assert "unknown option(s) warmup" in capsys.readouterr().err
    lst = tmp_path / "list.yaml"
    lst.write_text("- 1\n")
    assert main(["train", "--config", str(lst)]) == 2
    assert "expected a mapping of options" in capsys.readouterr().err


def test_report_on_dir_without_metrics(tmp_path, capsys):
    assert main(["report", str(tmp_path)]) == 2
    assert "has no metrics.jsonl" in capsys.readouterr().err


def test_unknown_task_and_subcommand_exit_by_argparse(capsys):
    with pytest.raises(SystemExit) as e:
        main(["train", "--task", "video"])
    assert e.value.code == 2
    assert "invalid choice: 'video'" in capsys.readouterr().err


def test_module_entry_point():
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-m", "advanced_training_utils", "presets"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "memory_constrained" in r.stdout


def test_nproc_per_node_launches_torchrun(tmp_path, monkeypatch):
    import os
    from pathlib import Path

    import advanced_training_utils

    src = str(Path(advanced_training_utils.__file__).resolve().parents[1])
    monkeypatch.setenv("PYTHONPATH", src + os.pathsep + os.environ.get("PYTHONPATH", ""))
    out = tmp_path / "ddp"
    rc = main(["train", "--task", "notes", "--epochs", "1", "--quiet", "--device", "cpu",
               "--out", str(out), "--nproc-per-node", "2"])
    assert rc == 0
    s = json.loads((out / "summary.json").read_text())
    assert s["world_size"] == 2 and s["epochs_run"] == 1
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == [
        "notes.lock", "notes_best.pt", "notes_last.pt"]  # the run's lock: rank 0 only


def test_nproc_per_node_rejects_zero(capsys):
    assert main(["train", "--nproc-per-node", "0"]) == 2
    assert "--nproc-per-node must be >= 1, got 0" in capsys.readouterr().err


# ---------------------------------------------------------------- seed precedence (#8)
class _Stop(Exception):
    """Raised by the stand-in task builder: the test has seen what it needs."""


@pytest.fixture
def task_seed(monkeypatch):
    """Replace the task builder: record the seed it is given, then stop before any data."""
    import advanced_training_utils.app.tasks as tasks

    seen = []

    def build(name, seed, options):
        seen.append(seed)
        raise _Stop

    monkeypatch.setattr(tasks, "build_task", build)
    return seen


@pytest.mark.parametrize("config, sets, flag, expected", [
    (None, [], None, 0),            # the documented default
    ("seed: 5\n", [], None, 5),     # --config
    (None, ["seed=7"], None, 7),    # --set
    ("seed: 5\n", ["seed=7"], None, 7),      # --set wins over --config
    ("seed: 5\n", ["seed=7"], 9, 9),         # --seed wins over both
    (None, [], 3, 3),               # --seed alone
    ("seed: 5\n", ["seed=null"], None, 0),   # an explicit null falls back to the default
])
def test_seed_precedence(tmp_path, task_seed, config, sets, flag, expected):
    from advanced_training_utils.app.cli import build_parser, resolve_options

    argv = ["train", "--task", "notes", "--out", str(tmp_path / "run"), "--quiet"]
    if config is not None:
        (tmp_path / "c.yaml").write_text(config)
        argv += ["--config", str(tmp_path / "c.yaml")]
    for s in sets:
        argv += ["--set", s]
    if flag is not None:
        argv += ["--seed", str(flag)]
    options, _ = resolve_options(build_parser().parse_args(argv))
    assert options["seed"] == expected          # the seed train_model_advanced gets
    with pytest.raises(_Stop):
        main(argv)
    assert task_seed == [expected]              # the seed of the data and the model init


def test_yaml_exponent_floats_are_floats():
    from advanced_training_utils.app.cli import build_parser, resolve_options

    args = build_parser().parse_args(["train", "--set", "learning_rate=3e-4", "--set",
                                      "min_delta=1E-6"])
    options, _ = resolve_options(args)
    assert options["learning_rate"] == 3e-4 and options["min_delta"] == 1e-6


# ---------------------------------------------------------------- bad values (#20, #19)
def _bomb(levels=9, width=9):
    """A YAML alias bomb: a few hundred bytes that expand to width**levels values."""
    lines = ["augment_options:", "  a: &a [" + ",".join(["1"] * width) + "]"]
    for i in range(1, levels):
        prev, cur = "abcdefghi"[i - 1], "abcdefghi"[i]
        lines.append(f"  {cur}: &{cur} [" + ",".join([f"*{prev}"] * width) + "]")
    return "\n".join(lines) + "\n"


def _deep(depth=40):
    return "augment_options: {noise_level: " + "[" * depth + "1" + "]" * depth + "}\n"


# (extra argv, files to write {name: text}, expected text of the one error line)
BAD = [
    # int ranges and types
    (["--set", "batch_size=0"], {}, "batch_size must be >= 1, got 0 (task 'emotion')"),
    (["--set", "batch_size=abc"], {}, "batch_size must be an integer, got 'abc'"),
    (["--set", "per_piece=-2"], {}, "per_piece must be >= 1, got -2"),
    (["--set", "train_fraction=0"], {}, "train_fraction must be in (0, 1], got 0 (task 'emotion')"),
    (["--set", "train_fraction=1.5"], {}, "train_fraction must be in (0, 1], got 1.5"),
    (["--set", "train_fraction=all"], {}, "train_fraction must be a real number, got 'all'"),
    (["--epochs", "0"], {}, "epochs must be >= 1, got 0"),
    (["--seed", "-1"], {}, "seed must be >= 0, got -1"),
    (["--set", "seed=1.5"], {}, "seed must be an integer, got 1.5"),
    (["--set", "accumulation_steps=0"], {}, "accumulation_steps must be >= 1, got 0"),
    # float ranges and types
    (["--set", "learning_rate=-1"], {}, "learning_rate must be > 0, got -1"),
    (["--set", "factor=5"], {}, "factor must be in (0, 1), got 5"),
    (["--preset", "fast", "--set", "pct_start=1.5"], {}, "pct_start must be in (0, 1), got 1.5"),
    (["--set", "scheduler_type=step", "--set", "gamma=3"], {}, "gamma must be in (0, 1], got 3"),
    (["--set", "gradient_clip=0"], {}, "gradient_clip must be > 0, got 0"),
    (["--set", "min_lr=abc"], {}, "min_lr must be a real number, got 'abc'"),
    # choices
    (["--set", "scheduler_type=linear"], {}, "scheduler_type must be one of 'plateau'"),
    (["--set", "amp_dtype=fp8"], {}, "amp_dtype must be one of 'float16', 'bfloat16', 'auto'"),
    (["--preset", "turbo"], {}, "unknown preset 'turbo'; valid presets: fast, stable"),
    # booleans
    (["--set", "use_scheduler=maybe"], {}, "use_scheduler must be a bool, got 'maybe'"),
    (["--set", "recovery=2"], {}, "recovery must be a bool, got 2"),
    # metric names
    (["--set", "metrics=f1"], {}, "metrics: unknown metric 'f1'; built-in metrics: accuracy"),
    (["--set", "metrics=[accuracy, 3]"], {}, "metrics: each item must be a built-in name "
     "(accuracy, uar, macro_f1, per_class_recall, ccc, mae), a torchmetrics.Metric or a callable, "
     "got 3 of type int"),
    (["--set", "monitor=val_uar"], {}, "monitor must be a key the run logs, one of val_loss, "
     "train_loss, val_accuracy; got 'val_uar'"),
    # device strings
    (["--device", "meta"], {}, "device must be 'auto', 'cpu', 'cuda' or 'cuda:N'; got 'meta'"),
    (["--device", "xla"], {}, "got 'xla' (torch_xla is not installed)"),
    (["--device", "mps"], {}, "got 'mps' (MPS is not available"),
    (["--device", "gpu"], {}, "device must be 'auto', 'cpu', 'cuda' or 'cuda:N'; got 'gpu'"),
    (["--set", "device=cuda:x"], {}, "got 'cuda:x'"),
    # augment options
    (["--set", "augment_options={noise_level: -1}"], {}, "augment_options={'noise_level': -1} "
     "do not fit augment='audio': audio: noise_level must be >= 0, got -1"),
    (["--set", "augment_options={bogus: 1}"], {}, "audio: unknown option(s) bogus; valid: "),
    (["--set", "augment_options=[1]"], {}, "augment_options must be a dict, got [1]"),
    # YAML syntax errors
    (["--set", "learning_rate=[1"], {}, "--set learning_rate: not valid YAML (line 1, column 3"),
    (["--config", "{d}/bad.yaml"], {"bad.yaml": "learning_rate: [1, 2\n"},
     "bad.yaml: not valid YAML (line 2, column 1"),
    (["--config", "{d}/list.yaml"], {"list.yaml": "- 1\n"}, "expected a mapping of options"),
    (["--config", "{d}/bin.yaml"], {"bin.yaml": b"\xff\xfe\x00"}, "bin.yaml: cannot read it"),
    # unknown and reserved keys
    (["--set", "lr=0.1"], {}, "--set: unknown option(s) lr; valid options: "),
    (["--config", "{d}/unk.yaml"], {"unk.yaml": "warmup: 3\n"}, "unknown option(s) warmup"),
    (["--set", "model_name=x"], {}, "--set: model_name cannot be set here: the command sets it itself"),
    (["--set", "epochs"], {}, "--set expects KEY=VALUE, got 'epochs'"),
    # size bounds
    (["--config", "{d}/bomb.yaml"], {"bomb.yaml": _bomb()},
     "bomb.yaml: more than 10000 values once YAML aliases are expanded; refused"),
    (["--set", "augment_options={a: &a [1,1,1,1,1,1,1,1,1,1], b: &b [*a,*a,*a,*a,*a,*a,*a,*a,*a,"
      "*a], c: &c [*b,*b,*b,*b,*b,*b,*b,*b,*b,*b], d: [*c,*c,*c,*c,*c,*c,*c,*c,*c,*c]}"], {},
     "--set augment_options: more than 10000 values once YAML aliases are expanded"),
    (["--set", "augment_options=&a [*a]"], {}, "--set augment_options: nested more than 32 deep"),
    (["--config", "{d}/deep.yaml"], {"deep.yaml": _deep()}, "deep.yaml: nested more than 32 deep"),
    (["--config", "{d}/strs.yaml"], {"strs.yaml": "augment_options: {s: &s " + "x" * 30000
                                      + ", l: [" + ",".join(["*s"] * 9000) + "]}\n"},
     "strs.yaml: more than 100000 characters once YAML aliases are expanded"),
    (["--config", "{d}/big.yaml"], {"big.yaml": "# x\n" * 20000},
     "big.yaml: 80000 bytes; a config file may hold at most 65536"),
    # CLI-only options
    (["--nproc-per-node", "0"], {}, "--nproc-per-node must be >= 1, got 0"),
    (["--out", "{d}/afile"], {"afile": "x"}, "afile exists and is not a directory"),
    (["--set", "patience=2"], {}, "--set: option 'patience' is ambiguous in train_model_advanced: "
     "pass plateau_patience="),
    (["--config", "{d}/p.yaml"], {"p.yaml": "patience: 2\n"}, "early_stop_patience= (epochs"),
]


@pytest.mark.parametrize("extra, files, message", BAD, ids=[" ".join(b[0])[:40] for b in BAD])
def test_bad_values_exit_2_with_one_line_before_any_work(tmp_path, monkeypatch, capsys, extra,
                                                         files, message):
    import advanced_training_utils.app.tasks as tasks

    def no_data(*a, **k):
        raise AssertionError("the task's data was built before the options were checked")

    monkeypatch.setattr(tasks, "build_task", no_data)
    monkeypatch.setattr(tasks, "emotion_dataset", no_data)
    for name, text in files.items():
        (tmp_path / name).write_bytes(text if isinstance(text, bytes) else text.encode())
    run = tmp_path / "run"
    argv = ["train", "--out", str(run), "--quiet",
            *[a.replace("{d}", str(tmp_path)) for a in extra]]
    assert main(argv) == 2
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("advtrain: error: "), lines
    assert message in lines[0]
    assert not run.exists()  # nothing was written either


def test_alias_bomb_is_small_on_disk_and_anchors_within_bounds_are_fine(tmp_path):
    assert len(_bomb().encode()) < 400  # like the bomb: 405 bytes, 9**9 values
    from advanced_training_utils.app.cli import build_parser, resolve_options

    ok = tmp_path / "ok.yaml"
    ok.write_text("learning_rate: &lr 0.01\nmax_lr: *lr\naugment_options: &o {noise_level: 0.1}\n")
    options, _ = resolve_options(build_parser().parse_args(["train", "--config", str(ok)]))
    assert options["max_lr"] == options["learning_rate"] == 0.01


def test_bad_value_in_a_fresh_process_prints_one_line_and_nothing_else(tmp_path):
    """Through the real entry point: no traceback, no log or warning line, exit code 2."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    import advanced_training_utils

    src = str(Path(advanced_training_utils.__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": src + os.pathsep + os.environ.get("PYTHONPATH", "")}
    r = subprocess.run([sys.executable, "-m", "advanced_training_utils", "train", "--out",
                        str(tmp_path / "run"), "--device", "meta", "--set", "batch_size=8"],
                       capture_output=True, text=True, timeout=120, env=env)
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.splitlines() == [
        "advtrain: error: device must be 'auto', 'cpu', 'cuda' or 'cuda:N'; got 'meta' (the meta "
        "device holds no data, so nothing can be trained on it)"]
    assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------- report of an API run
def _api_run(directory, name, epochs=2, **options):
    import torch

    from advanced_training_utils import train_model_advanced

    g = torch.Generator().manual_seed(0)
    x = torch.randn(32, 4, generator=g)
    y = x.sum(1, keepdim=True)
    data = torch.utils.data.TensorDataset(x, y)
    loader = torch.utils.data.DataLoader(data, batch_size=8)
    return train_model_advanced(torch.nn.Linear(4, 1), loader, loader, torch.nn.MSELoss(),
                                epochs=epochs, checkpoint_dir=directory, model_name=name,
                                verbose=False, **options)


def test_report_reads_a_python_api_run(tmp_path, capsys):
    ckpt = tmp_path / "ckpt"
    _api_run(ckpt, "tiny", gradient_clip=0.25)
    assert main(["report", str(ckpt)]) == 0
    png, txt = ckpt / "tiny_report.png", ckpt / "tiny_diagnosis.txt"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    out = capsys.readouterr().out
    assert txt.read_text() == out.split(f"wrote {png}")[0]
    # The remedies follow the options saved in the run's checkpoint: make the history explode.
    metrics = ckpt / "tiny_metrics.jsonl"
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    rows = [dict(rows[0], epoch=i + 1, grad_norm_max=500.0 if i == 3 else 1.0,
                 grad_norm_mean=1.0) for i in range(6)]
    metrics.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert main(["report", str(ckpt)]) == 0
    assert ("  remedies: gradient clipping is on (max_norm=0.25): lower max_norm; reduce the "
            "learning rate.") in txt.read_text().splitlines()


def test_report_of_an_api_run_has_the_history_panels_and_its_clip_line(tmp_path):
    from advanced_training_utils.app.cli import _config_from_checkpoint, _read_history
    from advanced_training_utils.app.report import build_report_figure, load_run_details

    ckpt = tmp_path / "ckpt"
    res = _api_run(ckpt, "tiny", epochs=3, gradient_clip=0.25)
    history = _read_history(ckpt / "tiny_metrics.jsonl")
    details = load_run_details(ckpt, None, _config_from_checkpoint(ckpt, "tiny"), history)
    assert (details.best_epoch, details.gradient_clip) == (res["best_epoch"], 0.25)
    assert details.test is details.predictions is details.inputs is None
    fig = build_report_figure(history, details=details)
    assert [ax.get_title() for ax in fig.axes] == [
        "loss", "learning rate (end of epoch)", "gradient norm (before clipping)",
        "fraction of steps clipped"]
    clip = [ln for ln in fig.axes[2].lines if ln.get_label() == "clip threshold 0.25"]
    assert list(clip[0].get_ydata()) == [0.25, 0.25]


def test_report_of_an_older_run_without_the_new_summary_keys(tmp_path, capsys):
    """A summary.json written before the test metrics, confusion and samples existed."""
    from advanced_training_utils.app.cli import _read_history
    from advanced_training_utils.app.report import build_report_figure, load_run_details

    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.jsonl").write_text("".join(json.dumps(
        {"epoch": i, "train_loss": 1 / i, "val_loss": 1 / i, "val_accuracy": 0.5, "lr": 1e-3,
         "grad_norm_mean": 1.0, "grad_norm_max": 2.0, "clip_fraction": 0.0, "skipped_steps": 0,
         "improved": True}) + "\n" for i in range(1, 4)))
    old = {"task": "emotion", "preset": "stable", "test_accuracy": 0.9, "best_epoch": 3,
           "confusion": [[1, 0], [0, 1]], "classes": ["a", "b"],
           "options": {"gradient_clip": 1.0, "use_augmentation": True, "augment": "audio"}}
    (out / "summary.json").write_text(json.dumps(old))
    assert main(["report", str(out)]) == 0 and (out / "report.png").is_file()
    history = _read_history(out / "metrics.jsonl")
    fig = build_report_figure(history, details=load_run_details(out, old, old["options"],
                                                                history))
    assert [ax.get_title() for ax in fig.axes] == [
        "loss", "validation metrics", "learning rate (end of epoch)",
        "gradient norm (before clipping)", "fraction of steps clipped"]


def test_report_skips_a_last_line_cut_short_by_a_crash(tmp_path, capsys):
    ckpt = tmp_path / "ckpt"
    _api_run(ckpt, "tiny", epochs=3)
    metrics = ckpt / "tiny_metrics.jsonl"
    metrics.write_text(metrics.read_text()[:-20])  # the last epoch's line is cut short
    assert main(["report", str(ckpt)]) == 0
    assert "Healthy run: 2 epochs" in (ckpt / "tiny_diagnosis.txt").read_text()
    metrics.write_text("{bad\n" + metrics.read_text())
    assert main(["report", str(ckpt)]) == 2
    assert f"{metrics}: line 1 is not JSON" in capsys.readouterr().err


def test_report_of_several_api_runs_needs_a_model_name(tmp_path, capsys):
    ckpt = tmp_path / "checkpoints"
    _api_run(ckpt, "a", epochs=1)
    _api_run(ckpt, "b", epochs=1)
    assert main(["report", str(tmp_path)]) == 2  # the parent of checkpoints/ works too
    assert capsys.readouterr().err == (
        f"advtrain: error: {tmp_path} holds the metrics of several models (a, b); pass "
        "--model-name NAME\n")
    assert main(["report", str(tmp_path), "--model-name", "b"]) == 0
    assert (ckpt / "b_report.png").is_file() and not (ckpt / "a_report.png").exists()
    assert main(["report", str(ckpt), "--model-name", "c"]) == 2
    assert "--model-name 'c': no c_metrics.jsonl in" in capsys.readouterr().err


def _children() -> dict[int, list[int]]:
    """ppid -> pids, from /proc."""
    out: dict[int, list[int]] = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                stat = (d / "stat").read_text()
            except OSError:
                continue
            out.setdefault(int(stat.rsplit(")", 1)[1].split()[1]), []).append(int(d.name))
    return out


def _alive(pid: int) -> bool:
    try:
        return (Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]) != "Z"
    except OSError:
        return False


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads the process tree in /proc")
def _epochs_checkpointed(out, deadline: float) -> int:
    """Epochs finished, read once the newest checkpoint holds the last logged one: an epoch's
    metrics line is written just before its checkpoint, so a signal between the two would find
    the checkpoint at that epoch (where training did stop), not newer than it."""
    while True:
        done = len((out / "metrics.jsonl").read_text().splitlines())
        last = out / "checkpoints" / "notes_last.pt"
        if last.is_file() and load_checkpoint(last)[EPOCH_KEY] >= done:
            return done
        assert time.monotonic() < deadline, "no checkpoint of the logged epochs"
        time.sleep(0.05)


def test_sigterm_to_the_ddp_launcher_preempts_torchrun_and_every_worker(tmp_path):
    out = tmp_path / "run"
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src") + os.pathsep
               + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    env.pop("WORLD_SIZE", None)
    p = subprocess.Popen([sys.executable, "-m", "advanced_training_utils", "train", "--task",
                          "notes", "--preset", "fast", "--epochs", "100000", "--device", "cpu",
                          "--quiet", "--nproc-per-node", "2", "--out", str(out)],
                         env=env, start_new_session=True, stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL)
    tree: list[int] = []
    try:
        deadline = time.monotonic() + 180
        while not (out / "metrics.jsonl").is_file() or not (out / "metrics.jsonl").stat().st_size:
            assert p.poll() is None and time.monotonic() < deadline, "training did not start"
            time.sleep(0.2)
        kids = _children()
        torchrun = kids.get(p.pid, [])
        tree = torchrun + [w for t in torchrun for w in kids.get(t, [])]
        assert len(tree) == 3, tree  # torchrun and its two workers
        done = _epochs_checkpointed(out, deadline)
        os.kill(p.pid, signal.SIGTERM)
        rc = p.wait(timeout=90)
        deadline = time.monotonic() + 30
        while any(_alive(q) for q in tree) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not [q for q in tree if _alive(q)], "torchrun or a worker outlived the launcher"
        assert rc == 143
        # a checkpoint newer than the last epoch checkpointed before the signal: mid-epoch
        # (the signal came during a training step) or at the next epoch's end (during its
        # validation, when the step position is back at 0)
        ck = load_checkpoint(out / "checkpoints" / "notes_last.pt")
        assert ck[STEP_KEY] > 0 or ck[EPOCH_KEY] > done, (ck[EPOCH_KEY], ck[STEP_KEY], done)
    finally:
        for q in [p.pid, *tree]:
            if _alive(q):
                os.kill(q, signal.SIGKILL)


# ---- --version and --help (defaults and an example for every command)

def _subparsers():
    import argparse

    from advanced_training_utils.app.cli import build_parser

    action = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return action.choices


def test_version_prints_the_package_version(capsys):
    import advanced_training_utils

    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0
    assert capsys.readouterr().out == f"advtrain {advanced_training_utils.__version__}\n"


def test_every_command_is_checked_by_the_help_test():
    assert set(_subparsers()) >= {"train", "report", "presets"}


@pytest.mark.parametrize("command", [None, *_subparsers()])
def test_help_shows_an_example_and_every_default(command, capsys):
    import argparse

    argv = ["--help"] if command is None else [command, "--help"]
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "Example" in out and ("advtrain " + (command or "train")) in out.split("Example")[1]
    if command is None:
        return
    flat = " ".join(out.split())  # help lines are wrapped
    for action in _subparsers()[command]._actions:
        if (not action.option_strings or action.default is argparse.SUPPRESS
                or action.nargs == 0):
            continue  # positionals, --help, on/off flags (off unless given)
        d = action.default
        if d is None or d is False or d == []:
            # the value then comes from elsewhere (a config, the task): the help says which
            assert "(default: " in action.help, action.option_strings
        else:
            assert f"(default: {d})" in flat, (action.option_strings, d)


# ---------------------------------------------------------------- found by a new user's code
NOTES_FAST = ["--quiet", "--epochs", "1", "--device", "cpu"]


def test_resume_into_another_tasks_run_is_refused_before_any_work(tmp_path, capsys, monkeypatch):
    from advanced_training_utils.app import tasks

    out = tmp_path / "run"
    assert main(["train", "--task", "notes", "--out", str(out), *NOTES_FAST]) == 0
    before = {p.name: p.stat().st_mtime_ns for p in out.rglob("*")}
    capsys.readouterr()

    def no_data(*a, **k):
        raise AssertionError("the task's data was built before --out was checked")

    monkeypatch.setattr(tasks, "build_task", no_data)
    for extra in (["--resume"], []):
        assert main(["train", "--task", "emotion", "--out", str(out), *FAST, *extra]) == 2
        err = capsys.readouterr().err.splitlines()
        assert err == [f"advtrain: error: --out {out} holds a run of task 'notes', not "
                       "'emotion'; choose another --out (or the same task to continue it with "
                       "--resume)"]
    assert {p.name: p.stat().st_mtime_ns for p in out.rglob("*")} == before


def test_an_empty_out_is_refused(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as e:
        main(["train", "--task", "notes", "--out", "", *NOTES_FAST])
    assert e.value.code == 2
    assert "--out: must name a folder, got an empty string" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("option, message", [
    ("class_weights=balanced", "class_weights='balanced' needs a classification task "
     "(cross-entropy over class labels); --task notes (BCE) has no classes to weight"),
    # label_smoothing rendered the data, then stopped at the first batch with a traceback
    ("label_smoothing=0.1", "label_smoothing=0.1 needs a classification task (cross-entropy "
     "over class labels); --task notes (BCE) has no classes to smooth"),
])
def test_class_options_on_a_task_without_classes_are_one_line_before_any_work(
        tmp_path, capsys, monkeypatch, option, message):
    from advanced_training_utils.app import tasks

    def no_data(*a, **k):
        raise AssertionError("the task's data was built before the options were checked")

    monkeypatch.setattr(tasks, "build_task", no_data)
    out = tmp_path / "run"
    assert main(["train", "--task", "notes", "--out", str(out), *NOTES_FAST,
                 "--set", option]) == 2
    assert capsys.readouterr().err.splitlines() == [f"advtrain: error: {message}"]
    assert not out.exists()
