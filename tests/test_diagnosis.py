import math

import pytest

from advanced_training_utils.report import diagnose, format_diagnosis, plot_history


def _h(train, val, lr=None, gmean=None, gmax=None, skipped=None, clip=None):
    n = len(train)
    lr = lr or [1e-3] * n
    gmean = gmean or [1.0] * n
    gmax = gmax or [2.0] * n
    skipped = skipped or [0] * n
    clip = clip or [0.1] * n
    return [{"epoch": i + 1, "train_loss": train[i], "val_loss": val[i], "lr": lr[i],
             "grad_norm_mean": gmean[i], "grad_norm_max": gmax[i], "clip_fraction": clip[i],
             "skipped_steps": skipped[i]} for i in range(n)]


def _decay(n, a=1.0, r=0.7, floor=0.05):
    return [floor + a * r**i for i in range(n)]


HEALTHY = _h(_decay(10), [v + 0.02 for v in _decay(10)],
             lr=[1e-3] * 5 + [5e-4] * 5)

CASES = {
    "diverging": _h([1.0, 0.8, 0.7, 1.5, math.nan], [1.0, 0.8, 0.7, 1.6, math.nan]),
    "overfitting": _h(_decay(10), [1.0, 0.7, 0.5, 0.45, 0.5, 0.55, 0.6, 0.7, 0.8, 0.9],
                      lr=[1e-3] * 4 + [5e-4] * 6),
    "plateau": _h([1.0, 0.8, 0.7, 0.69, 0.69, 0.69, 0.69, 0.69, 0.69, 0.69],
                  [1.0, 0.8, 0.7, 0.69, 0.69, 0.69, 0.69, 0.69, 0.69, 0.69]),
    "exploding_gradients": _h(_decay(6), _decay(6), gmean=[1, 1.2, 1, 1.1, 1, 1],
                              gmax=[2, 2, 250, 2, 2, 2]),
    "vanishing_gradients": _h(_decay(6), _decay(6), gmean=[1e-3, 1e-6, 1e-7, 1e-7, 1e-7, 1e-7],
                              gmax=[1e-2, 1e-5, 1e-6, 1e-6, 1e-6, 1e-6]),
    "skipped_steps": _h(_decay(6), _decay(6), skipped=[0, 3, 0, 0, 1, 0]),
    "rollbacks": [dict(h, recovery_event="median loss 9 > 3 x 1; restored, lr x0.5")
                  if h["epoch"] == 3 else h for h in _h(_decay(6), _decay(6))],
}


def test_healthy_history_has_no_finding():
    assert diagnose(HEALTHY) == []
    assert format_diagnosis([], HEALTHY).startswith("Healthy run: 10 epochs")


@pytest.mark.parametrize("kind", list(CASES))
def test_each_case_gives_its_finding_with_evidence_and_remedy(kind):
    findings = diagnose(CASES[kind])
    kinds = [f.kind for f in findings]
    assert kind in kinds
    f = findings[kinds.index(kind)]
    assert f.epochs and f.remedies
    assert any(str(e) in f.evidence for e in f.epochs)  # cites the epochs


def test_specific_numbers_cited():
    (f,) = [f for f in diagnose(CASES["skipped_steps"]) if f.kind == "skipped_steps"]
    assert "4 optimizer step(s) skipped" in f.evidence and "2, 5" in f.evidence
    (f,) = [f for f in diagnose(CASES["overfitting"]) if f.kind == "overfitting"]
    assert "0.45 (epoch 4)" in f.evidence and "0.9 (epoch 10)" in f.evidence
    assert "increase data augmentation" in f.remedies


def test_remedies_follow_the_runs_config():
    (f,) = [f for f in diagnose(CASES["exploding_gradients"], {"gradient_clip": 1.0})
            if f.kind == "exploding_gradients"]
    assert f.remedies[0] == "gradient clipping is on (max_norm=1.0): lower max_norm"
    (d,) = [f for f in diagnose(CASES["diverging"], {"use_mixed_precision": False})
            if f.kind == "diverging"]
    assert "disable mixed precision" not in d.remedies
    (d,) = [f for f in diagnose(CASES["diverging"], {"use_mixed_precision": True})
            if f.kind == "diverging"]
    assert "disable mixed precision" in d.remedies


def test_format_lists_each_finding():
    text = format_diagnosis(diagnose(CASES["skipped_steps"]), CASES["skipped_steps"])
    assert "skipped steps:" in text and "remedies:" in text


def test_plot_writes_png(tmp_path):
    p = plot_history(CASES["overfitting"], tmp_path / "r.png", title="t", diagnosis="x")
    assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
