"""TensorBoard output of ``train_model_advanced(tensorboard=True)`` (written by runfiles.py)."""

import math
import sys
from pathlib import Path

import pytest
import torch

from _helpers import make_loaders, make_model
from advanced_training_utils import train_model_advanced

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
