"""app/evaluation.py: the held-out metrics of summary.json, against scikit-learn and numpy."""

import numpy as np
import pytest
import torch
from sklearn.metrics import (
    accuracy_score,
    balanced_accuracy_score,
    confusion_matrix,
    f1_score,
    recall_score,
)

from advanced_training_utils.app.evaluation import (
    MAX_PREDICTIONS,
    PREDICTIONS_FILE,
    classification_test,
    load_predictions,
    regression_test,
)

CPU = torch.device("cpu")


class _Fixed(torch.nn.Module):
    """Returns the precomputed outputs of the examples it is given (inputs are indices)."""

    def __init__(self, outputs):
        super().__init__()
        self.outputs = outputs

    def forward(self, idx):
        return self.outputs[idx]


def _batches(n, targets, sizes):
    idx, out, start = torch.arange(n), [], 0
    for s in sizes:
        out.append((idx[start:start + s], targets[start:start + s]))
        start += s
    return out


@pytest.mark.filterwarnings("ignore:y_pred contains classes not in y_true")
def test_classification_equals_scikit_learn_over_unequal_imbalanced_batches():
    g = torch.Generator().manual_seed(0)
    y = torch.cat([torch.zeros(40, dtype=torch.long), torch.ones(7, dtype=torch.long),
                   torch.full((3,), 2)])            # imbalanced; class 3 never true
    logits = torch.randn(50, 4, generator=g)
    logits[y == 0, 0] += 1.0
    names = ["happy", "calm", "sad", "tense"]
    t = classification_test(_Fixed(logits), _batches(50, y, [17, 1, 32]), CPU, names)
    pred, true = logits.argmax(1).numpy(), y.numpy()
    assert t["accuracy"] == pytest.approx(accuracy_score(true, pred), abs=1e-12)
    assert t["uar"] == pytest.approx(balanced_accuracy_score(true, pred), abs=1e-12)
    assert t["macro_f1"] == pytest.approx(f1_score(true, pred, average="macro"), abs=1e-12)
    recall = recall_score(true, pred, labels=range(4), average=None, zero_division=np.nan)
    assert list(t["per_class_recall"]) == names
    for name, r in zip(names, recall):
        assert t["per_class_recall"][name] == (None if np.isnan(r) else pytest.approx(r))
    assert t["confusion_matrix"] == confusion_matrix(true, pred, labels=range(4)).tolist()
    assert t["class_names"] == names


def _ccc(x, y):
    mx, my = x.mean(), y.mean()
    return 2 * ((x - mx) * (y - my)).mean() / (x.var() + y.var() + (mx - my) ** 2)


@pytest.mark.parametrize("n", [30, MAX_PREDICTIONS + 501])
def test_regression_equals_numpy_and_writes_a_sample_of_the_predictions(tmp_path, n):
    g = torch.Generator().manual_seed(1)
    y = torch.randn(n, 2, generator=g)
    out = (0.7 * y + 0.4 * torch.randn(n, 2, generator=g)).double()
    t = regression_test(_Fixed(out), _batches(n, y, [n // 3, 1, n - n // 3 - 1]), CPU,
                        ["valence", "arousal"], tmp_path)
    x, yy = out.float().double().numpy(), y.double().numpy()
    for k, name in enumerate(["valence", "arousal"]):
        assert t[f"ccc_{name}"] == pytest.approx(_ccc(x[:, k], yy[:, k]), abs=1e-6)
        assert t[f"mae_{name}"] == pytest.approx(np.abs(x[:, k] - yy[:, k]).mean(), abs=1e-6)
    assert t["ccc"] == pytest.approx((t["ccc_valence"] + t["ccc_arousal"]) / 2, abs=1e-12)
    p = load_predictions(tmp_path)
    assert p["target_names"] == ["valence", "arousal"]
    assert len(p["true"]) == min(n, MAX_PREDICTIONS)
    rows = [int(np.flatnonzero((y.numpy() == row).all(1))[0]) for row in p["true"]]
    assert rows == sorted(rows) and rows[0] == 0 and rows[-1] == n - 1  # evenly over the split
    np.testing.assert_array_equal(p["predicted"], out.float().numpy()[rows])


def test_regression_without_a_run_directory_writes_nothing(tmp_path):
    y = torch.randn(8, 1)
    regression_test(_Fixed(y), [(torch.arange(8), y)], CPU, ["valence"])
    assert load_predictions(tmp_path) is None and not (tmp_path / PREDICTIONS_FILE).exists()
