"""What a run does with an earlier run's files: changed options and optimizers on resume, and the
earlier metrics log on a fresh start."""

import dataclasses
import json
import logging
import shutil

import pytest
import torch

from _helpers import Boom, crashing, make_loaders, make_model
from advanced_training_utils import load_checkpoint, train_model_advanced
from advanced_training_utils.checkpoint import save_checkpoint
from advanced_training_utils.engine.config import (
    APPLIES,
    FIXED,
    NOT_COMPARED,
    RESUME_RULES,
    TrainConfig,
)
from advanced_training_utils.engine.resume import optimizer_spec

CE = torch.nn.CrossEntropyLoss()
BASE = dict(epochs=2, learning_rate=3e-3, device="cpu", verbose=False, seed=0, model_name="m",
            compile_options={"backend": "aot_eager"},  # compile=True below: no C++ to build
            ema_decay=0.99)  # an EMA on, so that eval_ema=True is a valid change

# A new value for every option (valid, and different from BASE or the default). An option added
# to TrainConfig without an entry here and a rule in RESUME_RULES fails the tests below.
CHANGED = {
    "epochs": 3, "learning_rate": 1e-3, "device": "auto", "checkpoint_dir": "SET BY TEST",
    "model_name": "other",
    "optimizer": lambda p: torch.optim.SGD(p, lr=3e-3), "weight_decay": 0.1,
    "accumulation_steps": 2,
    "batch_size_choice": {"micro_batch_size": 8, "accumulation_steps": 1, "target_batch_size": 8},
    "seed": 1, "use_scheduler": False, "scheduler_type": "cosine",
    "plateau_patience": 2, "factor": 0.5, "T_max": 5, "gamma": 0.9, "step_size": 3, "min_lr": 1e-6,
    "max_lr": 1e-2, "pct_start": 0.5, "warmup_steps": 2, "gradient_clip": 0.5,
    "use_mixed_precision": True, "amp_dtype": "bfloat16", "use_augmentation": True,
    "compile": True, "compile_options": {"backend": "eager"},
    "augment": "emotion", "augment_options": {"noise_level": 0.2}, "augment_targets": True,
    "mixup_alpha": 0.2, "cutmix_alpha": 1.0, "label_smoothing": 0.1, "early_stop_patience": 5,
    "class_weights": "balanced", "sampler": "balanced",
    "min_delta": 0.01, "restore_best_weights": False, "check_stability": True,
    "stability_every": 2, "metrics": "accuracy", "monitor": "train_loss", "mode": "max",
    "on_epoch_end": lambda row: None,
    "checkpoint_every_n_steps": 3, "keep_last": 3,
    "handle_signals": False, "recovery": False, "spike_factor": 5.0, "spike_window": 10,
    "rollback_after": 3, "rollback_lr_factor": 0.25, "max_rollbacks": 5,
    "divergence_factor": 5.0, "recovery_check_every": 4, "dist_timeout": 30.0,
    "resume": None, "metrics_file": "SET BY TEST", "tensorboard": True, "verbose": True,
    "ema_decay": 0.9, "ema_warmup": False, "swa_start": 2, "eval_ema": True,
}
FIELDS = [f.name for f in dataclasses.fields(TrainConfig)]


@pytest.fixture(scope="module")
def saved_run(tmp_path_factory):
    """A finished 2-epoch run with the BASE options."""
    out = tmp_path_factory.mktemp("saved")
    tl, vl = make_loaders(n=32, batch_size=16)
    train_model_advanced(make_model(1), tl, vl, CE, checkpoint_dir=out, **BASE)
    return out


def test_every_option_has_a_resume_rule_and_a_test_value():
    assert sorted(RESUME_RULES) == sorted(FIELDS)
    assert sorted(CHANGED) == sorted(FIELDS)
    assert {rule for rule, _ in RESUME_RULES.values()} == {APPLIES, FIXED, NOT_COMPARED}
    assert [n for n, (rule, _) in RESUME_RULES.items() if rule == NOT_COMPARED] == ["resume"]


@pytest.mark.parametrize("name", [n for n in FIELDS if RESUME_RULES[n][0] != NOT_COMPARED])
def test_changed_option_on_resume_warns_or_is_refused(name, saved_run, tmp_path, caplog):
    run = tmp_path / "run"
    shutil.copytree(saved_run, run)
    value = CHANGED[name]
    if name == "checkpoint_dir":
        value = tmp_path / "elsewhere"
    elif name == "metrics_file":
        value = tmp_path / "metrics.jsonl"
    opts = {**BASE, "checkpoint_dir": run, name: value}
    old = TrainConfig.from_options(**{**BASE, "checkpoint_dir": saved_run}).to_plain()[name]
    new = TrainConfig.from_options(**opts).to_plain()[name]
    tl, vl = make_loaders(n=32, batch_size=16)
    with caplog.at_level(logging.WARNING, logger="advanced_training_utils.engine.resume"):
        if RESUME_RULES[name][0] == FIXED:
            match = ("this run uses SGD" if name == "optimizer"
                     else f"{name}: {old!r} -> {new!r}".replace("(", r"\(").replace(")", r"\)")
                     .replace("[", r"\[").replace("]", r"\]").replace("+", r"\+"))
            with pytest.raises(ValueError, match=match):
                train_model_advanced(make_model(2), tl, vl, CE, resume=run / "m_last.pt", **opts)
        else:
            res = train_model_advanced(make_model(2), tl, vl, CE, resume=run / "m_last.pt",
                                       **opts)
            assert res["epochs_run"] == opts["epochs"]
            lines = [r.getMessage() for r in caplog.records]
            assert f"resume: option {name} changed from {old!r} to {new!r}; the new value " \
                   "applies" in "\n".join(lines)
            assert all(name in line or "checkpoint_dir" in line for line in lines)


def test_unchanged_options_resume_without_warnings(tmp_path, caplog):
    tl, vl = make_loaders(n=32, batch_size=16)
    train_model_advanced(make_model(1), tl, vl, CE, checkpoint_dir=tmp_path, **BASE)
    with caplog.at_level(logging.WARNING):
        res = train_model_advanced(make_model(2), tl, vl, CE, checkpoint_dir=tmp_path,
                                   resume=True, **BASE)
    assert res["epochs_run"] == 2 and caplog.records == []


def test_a_new_clip_threshold_takes_effect_on_resume(tmp_path):
    tl, vl = make_loaders(n=32, batch_size=16)
    train_model_advanced(make_model(1), tl, vl, CE, checkpoint_dir=tmp_path, **BASE)
    assert load_checkpoint(tmp_path / "m_last.pt")["clipper"]["max_norm"] == 1.0
    train_model_advanced(make_model(1), tl, vl, CE, checkpoint_dir=tmp_path, resume=True,
                         gradient_clip=0.25, **{**BASE, "epochs": 3})
    assert load_checkpoint(tmp_path / "m_last.pt")["clipper"]["max_norm"] == 0.25


def test_a_larger_patience_continues_a_run_that_stopped_early(tmp_path):
    tl, vl = make_loaders()
    opts = {**BASE, "epochs": 30, "learning_rate": 0.3, "use_scheduler": False, "min_delta": 1e-3}
    first = train_model_advanced(make_model(7), tl, vl, CE, checkpoint_dir=tmp_path,
                                 early_stop_patience=1, **opts)
    assert first["stopped_early"]
    again = train_model_advanced(make_model(7), tl, vl, CE, checkpoint_dir=tmp_path,
                                 resume=True, early_stop_patience=1, **opts)
    assert again["epochs_run"] == first["epochs_run"]  # same patience: still stopped
    more = train_model_advanced(make_model(7), tl, vl, CE, checkpoint_dir=tmp_path,
                                resume=True, early_stop_patience=3, **opts)
    assert more["epochs_run"] > first["epochs_run"]


# ------------------------------------------------------------------ optimizers
OPTIMIZERS = {
    "AdamW": lambda p: torch.optim.AdamW(p, lr=3e-3),
    "Adam": lambda p: torch.optim.Adam(p, lr=3e-3),
    "SGD": lambda p: torch.optim.SGD(p, lr=3e-3, momentum=0.9),
    "RMSprop": lambda p: torch.optim.RMSprop(p, lr=3e-3),
    "default": None,  # fused AdamW built by the package
}


def _run_with(optimizer, tmp_path, resume=False, epochs=2):
    tl, vl = make_loaders(n=32, batch_size=16)
    return train_model_advanced(make_model(1), tl, vl, CE, checkpoint_dir=tmp_path,
                                optimizer=optimizer, resume=resume, **{**BASE, "epochs": epochs})


@pytest.mark.parametrize("saved, new", [("AdamW", "SGD"), ("SGD", "AdamW"), ("Adam", "AdamW"),
                                        ("AdamW", "Adam"), ("default", "SGD"),
                                        ("RMSprop", "SGD"), ("SGD", "RMSprop")])
def test_resuming_into_another_optimizer_type_is_refused(saved, new, tmp_path):
    _run_with(OPTIMIZERS[saved], tmp_path)
    saved_name = "AdamW" if saved == "default" else saved
    with pytest.raises(ValueError, match=f"saved with optimizer {saved_name}, this run uses "
                                         f"{new}.*resume=False"):
        _run_with(OPTIMIZERS[new], tmp_path, resume=True, epochs=3)


@pytest.mark.parametrize("kind", list(OPTIMIZERS))
def test_resuming_into_the_same_optimizer_works(kind, tmp_path):
    _run_with(OPTIMIZERS[kind], tmp_path)
    assert _run_with(OPTIMIZERS[kind], tmp_path, resume=True, epochs=3)["epochs_run"] == 3


def test_changed_optimizer_hyperparameters_are_refused(tmp_path):
    _run_with(OPTIMIZERS["SGD"], tmp_path)
    with pytest.raises(ValueError, match=r"SGD hyperparameter\(s\) changed: group 0 momentum: "
                                         r"0.9 -> 0.5"):
        _run_with(lambda p: torch.optim.SGD(p, lr=3e-3, momentum=0.5), tmp_path, resume=True)


@pytest.mark.parametrize("saved, new", [("AdamW", "SGD"), ("SGD", "AdamW"), ("RMSprop", "SGD")])
def test_older_checkpoint_without_optimizer_type_is_checked_by_param_group_keys(saved, new,
                                                                                tmp_path):
    _run_with(OPTIMIZERS[saved], tmp_path)
    state = load_checkpoint(tmp_path / "m_last.pt")
    del state["optimizer_spec"]  # as written before the type was recorded
    save_checkpoint(tmp_path / "m_last.pt", {k: v for k, v in state.items()
                                             if k not in ("checksum", "format_version")})
    with pytest.raises(ValueError, match=f"this run's {new} has .*saved by a different optimizer"):
        _run_with(OPTIMIZERS[new], tmp_path, resume=True, epochs=3)


def test_optimizer_spec_is_plain():
    p = [torch.zeros(2, requires_grad=True)]
    spec = optimizer_spec(torch.optim.AdamW(p, lr=torch.tensor(0.01), betas=(0.8, 0.9)))
    assert spec["class"] == "AdamW"
    g = spec["groups"][0]
    assert g["lr"] == pytest.approx(0.01) and g["betas"] == [0.8, 0.9] and "params" not in g


# ------------------------------------------------------------------ the earlier metrics log




def test_fresh_run_keeps_the_earlier_metrics_log_until_it_writes(tmp_path):
    tl, vl = make_loaders(n=32, batch_size=16)
    train_model_advanced(make_model(1), tl, vl, CE, checkpoint_dir=tmp_path, **BASE)
    log_file = tmp_path / "m_metrics.jsonl"
    earlier = log_file.read_text()
    assert [json.loads(x)["epoch"] for x in earlier.splitlines()] == [1, 2]

    # A fresh run dies before its first checkpoint or metrics line: the log is untouched.
    with pytest.raises(Boom):
        train_model_advanced(make_model(1), tl, vl, crashing(1), checkpoint_dir=tmp_path,
                             **BASE)
    assert log_file.read_text() == earlier
    assert sorted(p.name for p in tmp_path.glob("m_metrics*")) == ["m_metrics.jsonl"]

    # A fresh run that writes: the earlier log is moved aside, whole; the new one is its own.
    train_model_advanced(make_model(1), tl, vl, CE, checkpoint_dir=tmp_path,
                         **{**BASE, "epochs": 1})
    moved = [p for p in tmp_path.glob("m_metrics.*.jsonl")]
    assert len(moved) == 1 and moved[0].read_text() == earlier
    assert [json.loads(x)["epoch"] for x in log_file.read_text().splitlines()] == [1]


def test_first_step_checkpoint_moves_the_earlier_log_before_a_resume_rewrites(tmp_path):
    tl, vl = make_loaders(n=32, batch_size=16)
    train_model_advanced(make_model(1), tl, vl, CE, checkpoint_dir=tmp_path, **BASE)
    earlier = (tmp_path / "m_metrics.jsonl").read_text()
    with pytest.raises(Boom):  # dies after a step checkpoint, before any metrics line
        train_model_advanced(make_model(1), tl, vl, crashing(2), checkpoint_dir=tmp_path,
                             checkpoint_every_n_steps=1, **BASE)
    moved = list(tmp_path.glob("m_metrics.*.jsonl"))
    assert len(moved) == 1 and moved[0].read_text() == earlier
    res = train_model_advanced(make_model(1), tl, vl, CE, checkpoint_dir=tmp_path, resume=True,
                               checkpoint_every_n_steps=1, **BASE)
    lines = (tmp_path / "m_metrics.jsonl").read_text().splitlines()
    assert res["epochs_run"] == 2 and [json.loads(x)["epoch"] for x in lines] == [1, 2]
    assert moved[0].read_text() == earlier
