"""RunFiles: stale temporary files of this run removed at start (only ours), metrics lines kept
across a failed write, TensorBoard output of ``tensorboard=True``."""

import errno
import json
import math
import os
import sys
from pathlib import Path

import pytest
import torch

from _helpers import make_loaders, make_model
from advanced_training_utils import TrainConfig, load_checkpoint, train_model_advanced
from advanced_training_utils.checkpoint import EPOCH_KEY, MODEL_KEY, STEP_KEY
from advanced_training_utils.engine.runfiles import RunFiles
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


def test_only_failed_checkpoint_writes_in_a_row_stop_the_run(tmp_path, monkeypatch):
    """A successful write resets the count: failures at every other save never reach the
    limit of 3 in a row, and each success is on disk."""
    run = RunFiles(TrainConfig.from_options(checkpoint_dir=str(tmp_path), model_name="m"))
    faults = FileFaults(tmp_path)
    for nth in (1, 3, 5, 7):  # the temporary file of saves 1, 3, 5 and 7
        faults.fail("open", ".m_last.pt.*.tmp", errno.ENOSPC, nth=nth)
    faults.install(monkeypatch)
    for epoch in range(1, 9):
        run.save({EPOCH_KEY: epoch}, best=False)
        assert run.failures == epoch % 2
        if epoch % 2 == 0:
            assert load_checkpoint(tmp_path / "m_last.pt")[EPOCH_KEY] == epoch
    assert len(faults.fired) == 4
    run.close()


def test_best_weights_come_from_the_best_epochs_end_not_a_later_step_checkpoint(tmp_path):
    """A step checkpoint taken during epoch 3 records 2 epochs done, like the end of epoch 2,
    but holds later weights: with ``_best.pt`` gone, epoch 2's weights come from the end of
    epoch 2 (``_last.1.pt`` here), not from the newer step checkpoint."""
    run = RunFiles(TrainConfig.from_options(checkpoint_dir=str(tmp_path), model_name="m",
                                            keep_last=3))
    end_of_2 = {MODEL_KEY: {"w": torch.full((2,), 2.0)}, EPOCH_KEY: 2, STEP_KEY: 0}
    during_3 = {MODEL_KEY: {"w": torch.full((2,), 3.0)}, EPOCH_KEY: 2, STEP_KEY: 4}
    run.save(end_of_2, best=False)
    run.save(during_3, best=False)
    resumed = {MODEL_KEY: {"w": torch.full((2,), 3.5)}, EPOCH_KEY: 2, STEP_KEY: 5}
    weights = run.best_weights(2, resumed)
    assert weights is not None and torch.equal(weights["w"], torch.full((2,), 2.0))
    run.close()


EPOCHS = 3
EPOCHS = 3


def _train(tmp_path, **kw):
    train, val = make_loaders(n=64, batch_size=16)
    return train_model_advanced(make_model(), train, val, torch.nn.CrossEntropyLoss(),
                                epochs=EPOCHS, checkpoint_dir=tmp_path / "ckpt", verbose=False,
                                device="cpu", handle_signals=False, tensorboard=True, **kw)


def _scalar_keys(entry):
    return {k for k, v in entry.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool)}


def test_tensorboard_writes_the_history_scalars_under_checkpoint_dir(tmp_path):
    pytest.importorskip("tensorboard")  # the `tensorboard` extra (in `dev`, so CI runs this)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    res = _train(tmp_path)
    files = list((tmp_path / "ckpt" / "tensorboard").glob("events.out.tfevents*"))
    assert len(files) == 1
    acc = EventAccumulator(str(files[0]))
    acc.Reload()
    history = res["history"]
    keys = _scalar_keys(history[0])
    assert {"train_loss", "val_loss", "lr", "grad_norm_mean"} <= keys
    assert set(acc.Tags()["scalars"]) == keys
    for key in keys:
        events = acc.Scalars(key)
        assert [e.step for e in events] == [h["epoch"] for h in history], key
        for e, h in zip(events, history):
            assert math.isclose(e.value, float(h[key]), rel_tol=1e-6, abs_tol=1e-7), key


def test_without_tensorboard_a_clear_warning_and_the_run_goes_on(tmp_path, monkeypatch):
    # None in sys.modules makes `from torch.utils.tensorboard import SummaryWriter` raise
    # ImportError, as when the package is not installed.
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    monkeypatch.setitem(sys.modules, "tensorboard", None)
    with pytest.warns(RuntimeWarning, match="tensorboard=True but tensorboard is not installed"):
        res = _train(tmp_path)
    assert res["epochs_run"] == EPOCHS and len(res["history"]) == EPOCHS
    assert res["last_checkpoint"] is not None and Path(res["last_checkpoint"]).is_file()
    assert not (tmp_path / "ckpt" / "tensorboard").exists()


# ---------------------------------------------------------------- found by a new user's code
def _fit(ckpt, epochs=1, train=None, **kw):
    tl, vl = make_loaders(n=64, batch_size=16)
    model = make_model()
    return model, train_model_advanced(model, train or tl, vl, torch.nn.CrossEntropyLoss(),
                                       epochs=epochs, device="cpu", verbose=False,
                                       checkpoint_dir=ckpt, model_name="m", **kw)


def test_a_fresh_run_moves_the_earlier_runs_checkpoints_aside(tmp_path):
    from advanced_training_utils.checkpoint import HISTORY_KEY, load_checkpoint
    _fit(tmp_path, epochs=3)                      # run A: m_last.pt, m_last.1.pt, m_best.pt
    assert {"m_last.pt", "m_last.1.pt", "m_best.pt"} <= {p.name for p in tmp_path.iterdir()}
    _fit(tmp_path, epochs=1)                      # run B, fresh
    names = {p.name for p in tmp_path.iterdir()}
    assert "m_last.1.pt" not in names             # B has written one checkpoint only
    assert len(load_checkpoint(tmp_path / "m_last.pt")[HISTORY_KEY]) == 1
    aside = sorted(n for n in names if n.startswith("m_last.") and n.count(".") == 2)
    assert len(aside) == 1 and len(load_checkpoint(tmp_path / aside[0])[HISTORY_KEY]) == 3
    (tmp_path / "m_last.pt").write_bytes(b"")     # damage B's newest: resume must not find A
    _, r = _fit(tmp_path, epochs=1, resume=True)
    assert len(r["history"]) == 1                 # B's best (epoch 1), never A's epoch 3


class _Chdir(torch.utils.data.Dataset):
    """A user's dataset that changes the working folder while it is read."""

    def __init__(self, ds, to):
        self.ds, self.to = ds, to

    def __len__(self):
        return len(self.ds)

    def __getitem__(self, i):
        if i == 5:
            os.chdir(self.to)
        return self.ds[i]


def test_a_relative_checkpoint_dir_stays_where_the_run_started(tmp_path, monkeypatch):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    monkeypatch.chdir(a)
    tl, _ = make_loaders(n=64, batch_size=16)
    train = torch.utils.data.DataLoader(_Chdir(tl.dataset, b), batch_size=16)
    _, r = _fit("ckpt", train=train)
    assert not (b / "ckpt").exists()
    assert (a / "ckpt" / "m_last.pt").is_file() and (a / "ckpt" / "m_metrics.jsonl").is_file()
    assert Path(r["last_checkpoint"]).is_absolute()


def test_a_checkpoint_dir_that_is_a_file_is_a_checkpoint_error(tmp_path):
    from advanced_training_utils.checkpoint import CheckpointError
    f = tmp_path / "file"
    f.write_text("x")
    for where in (f, f / "sub"):
        with pytest.raises(CheckpointError, match="checkpoint_dir"):
            _fit(where)
    assert f.read_text() == "x"


def test_tensorboard_without_a_checkpoint_dir_writes_no_none_folder(tmp_path, monkeypatch):
    import torch.utils.tensorboard as tb
    seen = []

    class Writer:
        def __init__(self, logdir=None):
            seen.append(logdir)

        def add_scalar(self, *a):
            pass

        def close(self):
            pass

    monkeypatch.setattr(tb, "SummaryWriter", Writer)
    monkeypatch.chdir(tmp_path)
    _fit(None, tensorboard=True)
    assert seen == [None] and not (tmp_path / "None").exists()


class _Broken(torch.utils.data.Dataset):
    def __len__(self):
        return 64

    def __getitem__(self, i):
        if i == 37:
            raise OSError("corrupt clip 37")
        return torch.zeros(8, 6), 0


def test_the_lock_is_released_when_a_worker_process_is_still_alive(tmp_path):
    """A DataLoader worker forked while the lock was held keeps a copy of its descriptor."""
    broken = torch.utils.data.DataLoader(_Broken(), batch_size=16, num_workers=2)
    with pytest.raises(Exception, match="corrupt clip 37"):
        _fit(tmp_path, train=broken)
    _fit(tmp_path)  # same process, workers of the failed run possibly alive: not locked
