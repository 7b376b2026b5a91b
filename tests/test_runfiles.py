"""RunFiles: stale temporary files of this run removed at start (only ours), metrics lines kept
across a failed write."""

import errno
import json

import torch

from _helpers import make_loaders, make_model
from advanced_training_utils import TrainConfig, train_model_advanced
from advanced_training_utils.runfiles import RunFiles
from faults import FileFaults

OURS = [".m_last.pt.0123456789ab.tmp", ".m_last.1.pt.abcdef012345.tmp",
        ".m_best.pt.k2j4h5g6.tmp", ".m_last.1.pt.link.tmp", ".m.write-test.0123456789ab.tmp",
        ".m_metrics.jsonl.0123456789ab.tmp"]
NOT_OURS = [".other_last.pt.0123456789ab.tmp", ".m_x_last.pt.0123456789ab.tmp", "m_notes.tmp",
            ".m_last.pt.tmp", "data.tmp", ".m_lastXpt.0123456789ab.tmp"]


def test_stale_temporary_files_of_this_run_are_removed_at_start(tmp_path, caplog):
    for name in OURS + NOT_OURS:
        (tmp_path / name).write_bytes(b"x" * 10_000)
    tl, vl = make_loaders()
    train_model_advanced(make_model(), tl, vl, torch.nn.CrossEntropyLoss(), epochs=1,
                         device="cpu", verbose=False, checkpoint_dir=tmp_path, model_name="m")
    left = {p.name for p in tmp_path.iterdir()}
    assert not left & set(OURS)
    assert set(NOT_OURS) <= left
    assert "removed 6 temporary file(s) (0.1 MB)" in caplog.text


def test_metrics_lines_survive_a_failed_append(tmp_path, monkeypatch):
    cfg = TrainConfig.from_options(checkpoint_dir=str(tmp_path), model_name="m")
    run = RunFiles(cfg)
    run.write_metrics({"epoch": 1})
    FileFaults(tmp_path).fail("write", "m_metrics.jsonl", errno.ENOSPC).install(monkeypatch)
    run.write_metrics({"epoch": 2})  # fails: logged, kept
    assert run.metric_failures == 1
    run.write_metrics({"epoch": 3})
    run.close()
    lines = (tmp_path / "m_metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["epoch"] for x in lines] == [1, 2, 3]
