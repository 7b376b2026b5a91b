"""``TrainConfig`` checks every option at construction, including those that were only checked
when the scheduler, the metrics or the augmentation were built after the data was loaded."""

import re

import pytest

from advanced_training_utils.engine.config import TrainConfig


@pytest.mark.parametrize("options, exc, message", [
    # scheduler options: the scheduler's own rules, applied at construction
    (dict(factor=5), ValueError, "factor must be in (0, 1), got 5"),
    (dict(factor=1.0), ValueError, "factor must be in (0, 1), got 1.0"),
    (dict(factor="half", scheduler_type="cosine"), TypeError, "factor must be a real number"),
    (dict(scheduler_type="step", gamma=2), ValueError, "gamma must be in (0, 1], got 2"),
    (dict(scheduler_type="exp", gamma=0), ValueError, "gamma must be in (0, 1], got 0"),
    (dict(scheduler_type="step", factor=1.5), ValueError, "gamma must be in (0, 1], got 1.5"),
    (dict(min_lr=-1e-3), ValueError, "min_lr must be >= 0, got -0.001"),
    (dict(scheduler_type="cosine", min_lr="0"), TypeError, "min_lr must be a real number"),
    (dict(scheduler_type="onecycle", pct_start=1.5), ValueError, "pct_start must be in (0, 1)"),
    (dict(scheduler_type="onecycle", max_lr=-1.0), ValueError, "max_lr must be > 0, got -1.0"),
    (dict(max_lr="big"), TypeError, "max_lr must be a real number"),
    # metrics
    (dict(metrics="acc"), ValueError, "metrics: unknown metric 'acc'; built-in metrics: accuracy"),
    (dict(metrics=["accuracy", "f1"]), ValueError, "metrics: unknown metric 'f1'"),
    (dict(metrics=5), TypeError, "metrics must be None, a name, a callable, a torchmetrics"),
    (dict(metrics={"m": 3}), TypeError, "metrics: 'm' must be a built-in name (accuracy, "
     "uar, macro_f1, per_class_recall, ccc, mae), a torchmetrics.Metric or a callable, got int"),
    # augmentation options: checked against the augmentation they go to
    (dict(augment_options=[1]), TypeError, "augment_options must be a dict, got [1]"),
    (dict(augment="audio", augment_options={"noise_level": -1}), ValueError,
     "augment_options={'noise_level': -1} do not fit augment='audio': audio: noise_level must "
     "be >= 0, got -1"),
    (dict(augment="notes", augment_options={"dropout_prob": 1.0}), ValueError,
     "notes: dropout_prob must be in [0, 1), got 1.0"),
    (dict(augment="emotion", augment_options={"clamp": (1, 0)}), ValueError,
     "emotion: clamp must have low < high"),
    (dict(augment="emotion", augment_options={"max_transpose": 2}), ValueError,
     "emotion: unknown option(s) max_transpose; valid: noise_level, clamp, keep_unit_norm"),
    (dict(augment_options={"bogus": 1}), ValueError,
     "augment_options={'bogus': 1} do not fit augment=None: audio: unknown option(s) bogus"),
    (dict(augment=lambda x: x, augment_options={"noise_level": 0.1}), ValueError,
     "apply to the built-in augmentations ('audio', 'emotion', 'notes'), not to a callable"),
    (dict(compile=1), TypeError, "compile must be a bool, got 1"),
    (dict(compile=True, compile_options=[("mode", "default")]), TypeError,
     "compile_options must be a dict, got [('mode', 'default')]"),
    (dict(compile=True, compile_options={"model": 1, "speed": 2}), TypeError,
     "compile_options: unknown key(s) 'model', 'speed'; torch.compile takes fullgraph, "
     "dynamic, backend, mode, options"),
    (dict(compile=True, compile_options={"fullgraph": "yes"}), TypeError,
     "compile_options['fullgraph'] must be a bool, got 'yes'"),
    (dict(compile=True, compile_options={"dynamic": "auto"}), TypeError,
     "compile_options['dynamic'] must be None or a bool, got 'auto'"),
    (dict(compile=True, compile_options={"backend": 3}), TypeError,
     "compile_options['backend'] must be a backend name or a callable, got 3"),
    (dict(compile=True, compile_options={"backend": "nope"}), ValueError,
     "compile_options={'backend': 'nope'} are refused by torch.compile: Invalid backend: 'nope'"),
    (dict(compile=True, compile_options={"mode": "fast"}), ValueError,
     "compile_options={'mode': 'fast'} are refused by torch.compile: Unrecognized mode=fast"),
    (dict(compile=True, compile_options={"mode": "default", "options": {"debug": True}}),
     ValueError, "Either mode or options can be specified"),
])
def test_bad_options_are_refused_at_construction(options, exc, message):
    with pytest.raises(exc, match=re.escape(message)):
        TrainConfig.from_options(**options)


@pytest.mark.parametrize("options", [
    dict(factor=0.1), dict(scheduler_type="step", gamma=1.0),
    dict(scheduler_type="cosine", factor=5),  # factor is the plateau scheduler's option
    dict(scheduler_type="onecycle", max_lr=0.1, pct_start=0.5),
    # the batches per epoch are unknown here: a long onecycle warmup is the run's to check
    dict(scheduler_type="onecycle", warmup_steps=50, epochs=2),
    dict(scheduler_type="cosine", warmup_steps=4, epochs=5),
    dict(metrics=["accuracy", lambda out, y: (out - out).sum()]),
    dict(augment="audio", augment_options={"policy": "LB", "noise_level": 0.0}),
    dict(augment="notes", augment_options={"max_transpose": 12}),
    dict(augment_options={"clamp": [-1, 1]}),  # fits 'emotion' (augment inferred later)
    dict(compile=True),
    dict(compile_options={"mode": "default"}),  # checked, used only with compile=True
    dict(compile=True, compile_options={"backend": "aot_eager", "dynamic": False,
                                        "fullgraph": True}),
    dict(compile=True, compile_options={"mode": "max-autotune-no-cudagraphs"}),
])
def test_good_options_pass(options):
    cfg = TrainConfig.from_options(**options)
    assert {k: getattr(cfg, k) for k in options} == options


def test_checking_draws_no_random_numbers():
    """Validation builds throwaway objects; it must not move the global RNG (runs repeat)."""
    import torch

    torch.manual_seed(123)
    before = torch.get_rng_state()
    for augment in ("audio", "emotion", "notes"):
        TrainConfig.from_options(augment=augment, augment_options={"noise_level": 0.5},
                                 scheduler_type="onecycle", metrics="accuracy")
    assert torch.equal(torch.get_rng_state(), before)
