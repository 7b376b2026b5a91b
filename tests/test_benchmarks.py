"""Smoke tests: the own-audio benchmark cases, run.py's tables and the README figures script run
at tiny sizes in a few seconds, so they cannot rot between ``make bench`` runs."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

import demo_figures  # noqa: E402
from benchmarks import cases, run  # noqa: E402


@pytest.mark.parametrize("variant", ["cold", "cached"])
def test_audio_features_case_runs_at_tiny_size(tmp_path, monkeypatch, variant):
    monkeypatch.setenv("BENCH_TMP", str(tmp_path))
    out = cases.case_audio_features(variant, n_clips=3, reps=1)
    assert out["clips"] == 3 and out["seconds"] > 0   # the case itself checks hits and misses


def test_audio_epoch_case_gives_both_pipelines_the_same_clips_and_shape(tmp_path, monkeypatch):
    monkeypatch.setenv("BENCH_TMP", str(tmp_path))
    monkeypatch.setenv("ADVTRAIN_CACHE", str(tmp_path / "cache"))  # the case sets it too
    got = {v: cases.case_audio_epoch(v, n_train=8, n_val=4, epochs=2) for v in ("builtin", "data")}
    for out in got.values():
        assert out["input_shape"] == [1, 64, 251] and out["clips"] == 8 and out["seconds"] > 0
    assert got["data"]["build_seconds"] > 0


def test_the_audio_cases_are_registered_and_in_the_audio_table():
    assert {"audio_features", "audio_epoch"} <= set(cases.CASES)
    assert {c[1] for c in run.AUDIO_COMPARISONS} == {"audio_features", "audio_epoch"}
    with pytest.raises(SystemExit, match="unknown case"):
        run._needed(run.COMPARISONS + run.AUDIO_COMPARISONS, ["audio_feature"])


def _fake_measure(case, variant, pin):
    secs = {"cold": 0.2, "cached": 0.01, "builtin": 0.5, "data": 0.55}[variant]
    return {"case": case, "variant": variant, "seconds": secs, "clips": 64}


def test_an_audio_only_run_writes_its_section_and_keeps_the_main_table(tmp_path, monkeypatch):
    (tmp_path / "cpu.md").write_text("CPU benchmarks: the main table\n\n| a | b |\n")
    (tmp_path / "cpu.json").write_text(json.dumps({"env": {"x": 1}, "rows": [{"name": "r"}]}))
    monkeypatch.setattr(run, "_measure", _fake_measure)
    run.main(["--only", "audio_features", "audio_epoch", "--reps", "2", "--out-dir",
              str(tmp_path)])
    md = (tmp_path / "cpu.md").read_text()
    assert md.startswith("CPU benchmarks: the main table\n\n| a | b |\n\n" + run.AUDIO_HEADING)
    assert "| 20.00x (20.00-20.00) | 10.0 ms (6,400 clips/s) | 200.0 ms (320 clips/s) |" in md
    assert "| 1.10x (1.10-1.10) |" in md and "Load average" in md
    data = json.loads((tmp_path / "cpu.json").read_text())
    assert data["env"] == {"x": 1} and data["rows"] == [{"name": "r"}]
    assert [r["case"] for r in data["audio"]["rows"]] == ["audio_features", "audio_epoch"]
    # Re-running one audio case keeps the other's row (and says so) and the main table.
    run.main(["--only", "audio_epoch", "--reps", "1", "--out-dir", str(tmp_path)])
    md2 = (tmp_path / "cpu.md").read_text()
    assert md2.count(run.AUDIO_HEADING) == 1 and "| 20.00x" in md2 and "kept from" in md2
    assert md2.startswith("CPU benchmarks: the main table")


def _fake_run(run_dir: Path) -> Path:
    run_dir.mkdir()
    hist = [{"epoch": e, "val_loss": v, "val_accuracy": a}
            for e, (v, a) in enumerate([(0.5, 0.8), (0.1, 0.95), (0.2, 0.97)], start=1)]
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(h) + "\n" for h in hist))
    summary = {"task": "emotion", "test_accuracy": 0.99367, "test_examples": 316,
               "majority_baseline_accuracy": 0.3069, "best_epoch": 2, "epochs_run": 3,
               "best_val_loss": 0.1, "data": {"train_examples": 1163, "val_examples": 210,
                                              "test_examples": 316},
               "data_seconds": 4.21, "wall_seconds": 30.5, "torch": "2.13.0+cpu", "seed": 0,
               "device": "cpu", "options": {"restore_best_weights": True}}
    (run_dir / "summary.json").write_text(json.dumps(summary))
    (run_dir / "diagnosis.txt").write_text("- overfitting: val loss rose\n")
    return run_dir


def test_demo_figures_come_from_the_runs_files_and_rewrite_only_the_readme_block(tmp_path):
    run_dir = _fake_run(tmp_path / "demo")
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{demo_figures.START}\nold 0.111\n{demo_figures.END}\noutro\n")
    demo_figures.main([str(run_dir), "--readme", str(readme)])
    text = readme.read_text()
    assert text.startswith("intro\n" + demo_figures.START) and text.endswith(
        demo_figures.END + "\noutro\n")
    assert "old 0.111" not in text
    assert "| **0.994** (majority class: 0.307) |" in text     # 0.99367, from summary.json
    assert "| best validation accuracy | 0.970 (epoch 3) |" in text
    assert "best validation loss 0.1000 at epoch 2 of 3, validation accuracy 0.950 there" in text
    assert "| data rendering (1,689 clips) | 4.2 s |" in text
    assert "| 30.5 s wall |" in text and "- overfitting: val loss rose" in text
    # A timing file of this run (written by --run) gives the whole-demo row; a stale one is ignored.
    timing = {"wall_seconds": 33.3, "date": "2026-01-01", "load_before": [0.1, 0, 0],
              "load_after": [0.2, 0, 0], "cpus": 2, "cpu": "cpu", "summary_wall_seconds": 30.5}
    (run_dir / demo_figures.TIMING).write_text(json.dumps(timing))
    assert "| 33.3 s wall |" in demo_figures.block(demo_figures.figures(run_dir))
    (run_dir / demo_figures.TIMING).write_text(json.dumps({**timing, "summary_wall_seconds": 1}))
    assert "| 30.5 s wall |" in demo_figures.block(demo_figures.figures(run_dir))


def test_demo_figures_script_runs_as_a_program(tmp_path):
    run_dir = _fake_run(tmp_path / "demo")
    out = subprocess.run([sys.executable, str(ROOT / "scripts" / "demo_figures.py"), str(run_dir)],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "**0.994**" in out.stdout


def test_demo_figures_runs_the_commands_of_make_demo():
    makefile = (ROOT / "Makefile").read_text()
    for cmd in demo_figures.demo_commands(Path("runs/demo")):
        assert cmd[:3] == [sys.executable, "-m", "advanced_training_utils"]
        assert "$(BIN)/advtrain " + " ".join(cmd[3:]) in makefile


def test_the_loop_cases_ema_variant_runs_at_tiny_size():
    out = cases.case_loop("ema", "mlp", n=128, epochs=1)
    assert out["steps"] == 2 and out["seconds"] > 0
    assert ("loop_mlp", "ours", "ema") in {c[1:4] for c in run.COMPARISONS}
