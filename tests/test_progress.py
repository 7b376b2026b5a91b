"""The progress output of ``verbose=True``: a bar on a terminal, a line per epoch elsewhere."""

import io
import sys

import pytest
import torch

from _helpers import make_loaders, make_model
from advanced_training_utils import train_model_advanced
from advanced_training_utils.engine.progress import Progress, is_interactive

EPOCHS = 3


class _FakeTTY(io.StringIO):
    def isatty(self) -> bool:
        return True


def _train_verbose(epochs: int = EPOCHS) -> None:
    train, val = make_loaders(n=64, batch_size=4)
    train_model_advanced(make_model(), train, val, torch.nn.CrossEntropyLoss(), epochs=epochs,
                         verbose=True, device="cpu", handle_signals=False)


@pytest.mark.parametrize("epochs", [1, EPOCHS])
def test_not_a_terminal_writes_one_line_per_epoch(capsys, epochs):
    _train_verbose(epochs)
    err = capsys.readouterr().err
    assert not sys.stderr.isatty()
    # splitlines() also splits at the "\r" of a bar's refresh, as a log viewer shows it
    lines = err.splitlines()
    assert "\r" not in err and len(lines) == epochs
    assert [line.split(" ")[:2] for line in lines] == [
        ["epoch", f"{e}/{epochs}"] for e in range(1, epochs + 1)]
    assert all("train_loss=" in line and "val_loss=" in line for line in lines)


def test_a_terminal_gets_the_bar(monkeypatch):
    tty = _FakeTTY()
    monkeypatch.setattr(sys, "stderr", tty)
    _train_verbose()
    out = tty.getvalue()
    assert "\r" in out and "it/s" in out and "%|" in out  # tqdm's bar, redrawn in place
    for e in range(1, EPOCHS + 1):
        assert f"epoch {e}/{EPOCHS}:" in out                     # the bar's description
        assert f"epoch {e}/{EPOCHS} train_loss=" in out          # and the epoch's line


def test_quiet_writes_nothing(capsys):
    train, val = make_loaders(n=32, batch_size=8)
    train_model_advanced(make_model(), train, val, torch.nn.CrossEntropyLoss(), epochs=2,
                         verbose=False, device="cpu", handle_signals=False)
    assert capsys.readouterr().err == ""


class _Closed(io.StringIO):
    def isatty(self) -> bool:
        raise ValueError("I/O operation on closed file")


@pytest.mark.parametrize("stream, expected", [
    (_FakeTTY(), True),
    (io.StringIO(), False),
    (_Closed(), False),
    (object(), False),          # no isatty at all
])
def test_is_interactive(stream, expected):
    assert is_interactive(stream) is expected


def test_a_jupyter_kernel_counts_as_interactive(monkeypatch):
    """Inside a kernel, tqdm.auto is tqdm.notebook's widget bar (stderr is not a TTY there)."""
    import types

    from tqdm.auto import tqdm

    monkeypatch.setitem(sys.modules, "tqdm.notebook", types.SimpleNamespace(tqdm=tqdm))
    assert is_interactive(io.StringIO())


def test_progress_without_a_terminal_never_reads_the_sums():
    class Sums:
        def totals(self):
            raise AssertionError("read the device sums with no bar to show")

    stream = io.StringIO()
    p = Progress(True, total_batches=3, min_interval=0.0, stream=stream)
    p.start(1, 1, lambda: 0.1)
    for i in range(3):
        p.update(Sums(), i)
    p.finish("epoch 1/1 done")
    assert stream.getvalue() == "epoch 1/1 done\n"
