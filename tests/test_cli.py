import json

import pytest

from advanced_training_utils.cli import main

FAST = ["--quiet", "--epochs", "1", "--set", "per_piece=1", "--device", "cpu"]


@pytest.fixture(autouse=True)
def _cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("ADVTRAIN_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))


def test_presets_lists_all(capsys):
    assert main(["presets"]) == 0
    out = capsys.readouterr().out
    for name in ("fast", "stable", "memory_constrained (alias: memory)", "scheduler_type: onecycle"):
        assert name in out


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
    # Resume to 2 epochs: continues the same run.
    assert main(["train", "--task", "emotion", "--preset", "fast", "--out", str(out), "--resume",
                 "--quiet", "--epochs", "2", "--set", "per_piece=1", "--device", "cpu"]) == 0
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["epoch"] for x in lines] == [1, 2]


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
    (["train", "--set", "checkpoint_dir=/x"], "unknown option(s) checkpoint_dir"),
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
