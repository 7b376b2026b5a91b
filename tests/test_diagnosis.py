import math

import pytest

from advanced_training_utils.app.report import diagnose, format_diagnosis, plot_history


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


# Each case's finding: exactly the epochs it flags and the evidence it cites (epochs and values).
EVIDENCE = {
    "diverging": ((5,), "non-finite loss in epoch(s) 5"),
    "overfitting": ((4, 10), "val loss rose from 0.45 (epoch 4) to 0.9 (epoch 10) while train "
                             "loss fell from 0.393 to 0.09035"),
    "plateau": ((6, 7, 8, 9, 10), "best val loss moved from 0.69 to 0.69 (<1%) over epochs 6-10 "
                                  "at a constant lr 0.001"),
    "exploding_gradients": ((3,), "grad norm reached 250 in epoch 3, 250x the median epoch "
                                  "mean 1"),
    "vanishing_gradients": ((2, 3, 4, 5, 6), "mean grad norm 1.00e-06 in epoch 2 (and 4 more "
                                             "epochs)"),
    "skipped_steps": ((2, 5), "4 optimizer step(s) skipped for NaN/Inf in epochs 2, 5"),
    "rollbacks": ((3,), "1 rollback(s): epoch 3: median loss 9 > 3 x 1; restored, lr x0.5"),
}


def test_the_evidence_table_covers_every_case():
    assert set(EVIDENCE) == set(CASES)


@pytest.mark.parametrize("kind", list(CASES))
def test_each_case_gives_its_finding_with_evidence_and_remedy(kind):
    findings = diagnose(CASES[kind])
    kinds = [f.kind for f in findings]
    assert kind in kinds
    f = findings[kinds.index(kind)]
    assert (f.epochs, f.evidence) == EVIDENCE[kind]  # cites exactly these epochs and values
    assert f.remedies


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


def test_format_cites_the_evidence_where_it_was_measured():
    from advanced_training_utils.app.report.diagnosis import MEASURED

    text = format_diagnosis(diagnose(CASES["overfitting"]), CASES["overfitting"])
    assert f"  evidence: {MEASURED['overfitting']}." in text.splitlines()
    assert "benchmarks/results/evidence.md" in MEASURED["overfitting"]
    text = format_diagnosis(diagnose(CASES["vanishing_gradients"]), CASES["vanishing_gradients"])
    assert "evidence:" not in text  # not measured: nothing cited


def test_plot_writes_png(tmp_path):
    p = plot_history(CASES["overfitting"], tmp_path / "r.png", title="t", diagnosis="x")
    assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ---------------------------------------------------------------- remedies follow the config
STABILITY = "check for NaN/Inf with the stability checks"
PLATEAU = "use the plateau scheduler, which lowers the LR when progress stalls"
ONECYCLE = "try the OneCycle scheduler for faster convergence"
CLIP_ON = "gradient clipping is on (max_norm={}): lower max_norm"
CLIP_OFF = "enable gradient clipping (max_norm=1.0)"
LR = "reduce the learning rate"
AUG = "increase data augmentation"
NO_AUG = "enable data augmentation (use_augmentation=True)"
EARLY = "enable early stopping (early_stop_patience) and keep the best weights"
KEEP = "keep the best weights (restore_best_weights=True)"

# (finding, the run's options, stopped_early, exactly the remedies given)
REMEDY_TABLE = [
    # diverging: clipping, mixed precision, stability checks
    ("diverging", dict(gradient_clip=None, use_mixed_precision=True, check_stability=False), None,
     (LR, CLIP_OFF, "disable mixed precision", STABILITY)),
    ("diverging", dict(gradient_clip=0.5, use_mixed_precision=False, check_stability=True), None,
     (LR, CLIP_ON.format(0.5))),
    ("diverging", dict(gradient_clip=math.inf), None, (LR, CLIP_OFF, STABILITY)),
    # overfitting: augmentation, plateau scheduler, early stopping (off / never fired / fired)
    ("overfitting", dict(use_augmentation=False, scheduler_type="cosine"), None,
     (NO_AUG, "use the plateau scheduler", EARLY)),
    ("overfitting", dict(use_augmentation=True, scheduler_type="plateau", early_stop_patience=15),
     False, (AUG, "lower early_stop_patience (now 15): it never fired")),
    ("overfitting", dict(use_augmentation=True, early_stop_patience=15,
                         restore_best_weights=False), False,
     (AUG, f"lower early_stop_patience (now 15): it never fired; {KEEP}")),
    ("overfitting", dict(use_augmentation=True, early_stop_patience=3), True, (AUG,)),
    ("overfitting", dict(use_augmentation=True, early_stop_patience=3,
                         restore_best_weights=False), True, (AUG, KEEP)),
    ("overfitting", dict(use_scheduler=False, scheduler_type="plateau", early_stop_patience=3),
     True, (NO_AUG, "use the plateau scheduler")),
    # plateau: which scheduler, its patience or min_lr, early stopping that fired too soon
    ("plateau", dict(scheduler_type="cosine"), None, (PLATEAU, ONECYCLE)),
    ("plateau", dict(use_scheduler=False), None, (PLATEAU, ONECYCLE)),
    ("plateau", dict(scheduler_type="onecycle"), None, (PLATEAU,)),
    ("plateau", dict(scheduler_type="plateau", plateau_patience=8), None,
     ("lower the plateau scheduler's patience (now 8) so it acts sooner", ONECYCLE)),
    ("plateau", dict(scheduler_type="plateau", min_lr=1e-3), None,
     ("the LR is at min_lr (0.001): lower min_lr", ONECYCLE)),
    ("plateau", dict(scheduler_type="plateau", plateau_patience=5, early_stop_patience=5), True,
     ("lower the plateau scheduler's patience (now 5) so it acts sooner",
      "increase early_stop_patience (now 5) above the plateau scheduler's patience (5) so the "
      "LR can drop before the run stops", ONECYCLE)),
    ("plateau", dict(scheduler_type="plateau", plateau_patience=5, early_stop_patience=5), False,
     ("lower the plateau scheduler's patience (now 5) so it acts sooner", ONECYCLE)),
    ("plateau", dict(scheduler_type="plateau", plateau_patience=5, early_stop_patience=8), True,
     ("lower the plateau scheduler's patience (now 5) so it acts sooner", ONECYCLE)),
    # gradients
    ("exploding_gradients", dict(gradient_clip=None), None, (CLIP_OFF, LR)),
    ("exploding_gradients", dict(gradient_clip=2.0), None, (CLIP_ON.format(2.0), LR)),
    ("vanishing_gradients", dict(check_stability=False, warmup_steps=0), None,
     ("check gradients with TrainingStability.check_gradients (it lists parameters without "
      "gradients)", "raise the learning rate or add warmup")),
    ("vanishing_gradients", dict(check_stability=True, warmup_steps=100), None,
     ("raise the learning rate",)),
    # recovery and skipped steps
    ("rollbacks", dict(gradient_clip=None, check_stability=False), None,
     ("reduce the learning rate (recovery had to lower it)", CLIP_OFF, STABILITY)),
    ("rollbacks", dict(gradient_clip=1.0, check_stability=True), None,
     ("reduce the learning rate (recovery had to lower it)", CLIP_ON.format(1.0))),
    ("skipped_steps", dict(use_mixed_precision=True, gradient_clip=None, check_stability=False),
     None, ("disable mixed precision if fp16 overflows persist", CLIP_OFF, LR,
            "check for NaN/Inf in the inputs with the stability checks")),
    ("skipped_steps", dict(use_mixed_precision=False, gradient_clip=1.0, check_stability=True),
     None, (CLIP_ON.format(1.0), LR)),
]


@pytest.mark.parametrize("kind, config, stopped_early, remedies", REMEDY_TABLE)
def test_each_remedy_is_given_only_where_it_applies(kind, config, stopped_early, remedies):
    (f,) = [f for f in diagnose(CASES[kind], config, stopped_early=stopped_early)
            if f.kind == kind]
    assert f.remedies == remedies


def test_without_a_config_the_generic_remedies_are_given():
    from advanced_training_utils.app.report.diagnosis import REMEDIES

    for kind, history in CASES.items():
        (f,) = [f for f in diagnose(history) if f.kind == kind]
        assert f.remedies == tuple(REMEDIES[kind])


def _flagged(history, improved):
    return [dict(h, improved=i) for h, i in zip(history, improved)]


@pytest.mark.parametrize("improved, epochs, fired", [
    ([True, True, True, True, False, False, False, False, False, False], 20, True),
    ([True, True, True, True, False, False, False, False, False, False], 10, False),  # ran out
    ([True, True, True, True, False, False, False, False, False, True], 20, False),
])
def test_whether_early_stopping_fired_is_read_from_the_history(improved, epochs, fired):
    history = _flagged(CASES["overfitting"], improved)
    config = dict(use_augmentation=True, early_stop_patience=3, epochs=epochs)
    (f,) = [f for f in diagnose(history, config) if f.kind == "overfitting"]
    assert f.remedies == ((AUG,) if fired else (AUG, "lower early_stop_patience (now 3): it "
                                                     "never fired"))


def test_a_saved_config_gives_the_same_remedies_as_the_options():
    from advanced_training_utils.engine.config import TrainConfig

    plain = TrainConfig.from_options(gradient_clip=0.5, scheduler_type="plateau",
                                     use_augmentation=True, early_stop_patience=4).to_plain()
    (f,) = [f for f in diagnose(CASES["overfitting"], plain, stopped_early=True)
            if f.kind == "overfitting"]
    assert f.remedies == (AUG,)


def test_a_run_saved_before_the_rename_reads_its_plateau_patience_from_patience():
    """Checkpoints written before ``patience`` became ``plateau_patience`` saved it as
    ``patience``: the report reads it from there (same remedies as the new name)."""
    new = dict(scheduler_type="plateau", plateau_patience=5, early_stop_patience=5)
    old = dict(scheduler_type="plateau", patience=5, early_stop_patience=5)
    (f_new,) = [f for f in diagnose(CASES["plateau"], new, stopped_early=True)
                if f.kind == "plateau"]
    (f_old,) = [f for f in diagnose(CASES["plateau"], old, stopped_early=True)
                if f.kind == "plateau"]
    assert f_old.remedies == f_new.remedies
    assert "patience (now 5)" in f_old.remedies[0] and "(5) so the LR" in f_old.remedies[1]
