"""app/report/plots.py: the report's PNG."""

import math

import matplotlib
import pytest

from advanced_training_utils.app.report.plots import plot_history

matplotlib.use("Agg")


def _history(n=4, val=True, skipped=0):
    return [{"epoch": i + 1, "train_loss": 1.0 / (i + 1), "val_loss": 1.2 / (i + 1) if val
             else None, "val_accuracy": 0.5 + 0.1 * i, "lr": 1e-3, "grad_norm_mean": 1.0,
             "grad_norm_max": 2.0, "clip_fraction": 0.25, "skipped_steps": skipped}
            for i in range(n)]


@pytest.mark.parametrize("history", [_history(), _history(val=False), _history(1, skipped=2),
                                     [dict(h, train_loss=math.nan) for h in _history(3)]],
                         ids=["full", "no-val", "one-epoch-skipped", "nan-loss"])
def test_writes_a_png_of_the_expected_size(tmp_path, history):
    import matplotlib.image

    out = plot_history(history, tmp_path / "r.png", title="t", diagnosis="line one\nline two")
    assert out == tmp_path / "r.png"
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    h, w = matplotlib.image.imread(out).shape[:2]
    assert (w, h) == (11 * 90, int(8.5 * 90))  # figsize (11, 8.5) at 90 dpi


def test_closes_its_figure(tmp_path):
    import matplotlib.pyplot as plt

    before = len(plt.get_fignums())
    plot_history(_history(), tmp_path / "r.png")
    assert len(plt.get_fignums()) == before
