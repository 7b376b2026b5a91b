"""engine/options.py: the TypedDict that types train_model_advanced's options, held equal to
TrainConfig; the Literal choices held equal to the run-time checks; a bad option is refused
before anything is touched."""

import dataclasses
import inspect
import random
import re
from typing import get_args, get_type_hints

import numpy as np
import pytest
import torch

from advanced_training_utils import get_preset, train_model_advanced
from advanced_training_utils.engine import config as config_module
from advanced_training_utils.engine.config import (
    AMP_DTYPES,
    AUGMENT_MODALITIES,
    MODES,
    TrainConfig,
)
from advanced_training_utils.engine.options import (
    AmpDtype,
    AugmentModality,
    DeviceName,
    MetricName,
    Mode,
    SchedulerType,
    TrainOptions,
    Unpack,
)
from advanced_training_utils.engine.prepare import check_device
from advanced_training_utils.engine.resume import check_options
from advanced_training_utils.metrics import BUILTIN_METRICS
from advanced_training_utils.scheduler import SCHEDULER_TYPES

FIELDS = [f.name for f in dataclasses.fields(TrainConfig)]


def test_the_typed_dict_has_exactly_the_config_fields_in_order():
    assert list(TrainOptions.__annotations__) == FIELDS
    assert TrainOptions.__total__ is False
    assert TrainOptions.__required_keys__ == frozenset()


def test_each_option_has_the_config_field_type():
    options, fields = get_type_hints(TrainOptions), get_type_hints(TrainConfig)
    differ = {k: (options[k], fields[k]) for k in FIELDS if options[k] != fields[k]}
    assert differ == {}


def test_train_model_advanced_options_are_typed_by_the_typed_dict():
    hints = get_type_hints(train_model_advanced)
    assert hints["options"] == Unpack[TrainOptions]
    kinds = {p.name: p.kind for p in inspect.signature(train_model_advanced).parameters.values()}
    assert kinds["options"] is inspect.Parameter.VAR_KEYWORD


@pytest.mark.parametrize("literal, allowed", [
    (SchedulerType, SCHEDULER_TYPES),
    (AmpDtype, AMP_DTYPES),
    (AugmentModality, AUGMENT_MODALITIES),
    (MetricName, BUILTIN_METRICS),
    (Mode, MODES),
])
def test_literal_choices_are_the_ones_the_checks_allow(literal, allowed):
    assert get_args(literal) == tuple(allowed)


@pytest.mark.parametrize("name", ["scheduler_type", "amp_dtype", "augment", "mode"])
def test_a_value_outside_the_literal_is_refused_naming_the_allowed_ones(name):
    with pytest.raises(ValueError, match=rf"{name}.*'nope'"):
        TrainConfig.from_options(**{name: "nope"})


def test_device_names_in_the_literal_are_checked_names():
    for name in get_args(DeviceName):
        if name in ("mps", "xla"):  # allowed only where available: refused with a reason here
            try:
                assert check_device(name) == name
            except ValueError as e:
                assert name in str(e)
        else:
            assert check_device(name) == name


def test_every_option_is_listed_in_the_docstring():
    doc = train_model_advanced.__doc__
    missing = [f for f in FIELDS if f"``{f}``" not in doc]
    assert missing == []


# ---------------------------------------------------------------- the renamed ``patience``
PATIENCE_MESSAGE = ("option 'patience' is ambiguous in train_model_advanced: pass "
                    "plateau_patience= (epochs without improvement before the plateau scheduler "
                    "lowers the LR) or early_stop_patience= (epochs without improvement before "
                    "training stops)")


def test_plateau_patience_reaches_the_plateau_scheduler():
    cfg = TrainConfig.from_options(plateau_patience=7, early_stop_patience=3)
    assert cfg.scheduler_options(1)["patience"] == 7
    with pytest.raises(ValueError, match="plateau_patience must be >= 0, got -1"):
        TrainConfig.from_options(plateau_patience=-1)


@pytest.mark.parametrize("call", [
    lambda: TrainConfig.from_options(patience=3),
    lambda: get_preset("stable", patience=3),
    lambda: train_model_advanced(torch.nn.Linear(2, 2), [(torch.zeros(1, 2), torch.zeros(1))],
                                 None, torch.nn.MSELoss(), patience=3),
], ids=["config", "preset", "train_model_advanced"])
def test_a_bare_patience_is_refused_naming_both_patiences(call):
    with pytest.raises(TypeError) as e:
        call()
    assert str(e.value) == PATIENCE_MESSAGE


def test_a_checkpoint_that_saved_patience_is_compared_as_plateau_patience(tmp_path):
    saved = {**TrainConfig.from_options(plateau_patience=5).to_plain()}
    saved["patience"] = saved.pop("plateau_patience")  # as written before the rename
    check_options(saved, TrainConfig.from_options(plateau_patience=5), tmp_path)  # same: fine
    with pytest.raises(ValueError, match=re.escape("plateau_patience: 5 -> 2")):
        check_options(saved, TrainConfig.from_options(plateau_patience=2), tmp_path)


def test_renamed_and_ambiguous_names_are_not_options():
    assert set(config_module.RENAMED).isdisjoint(FIELDS)
    assert set(config_module.RENAMED.values()) <= set(FIELDS)
    assert set(config_module.AMBIGUOUS).isdisjoint(FIELDS)


# ------------------------------------------------------- validated before any side effect
BAD_OPTIONS = [
    ({"patience": 2}, TypeError, "plateau_patience"),
    ({"epochs": 0}, ValueError, "epochs"),
    ({"learning_rate": -1.0}, ValueError, "learning_rate"),
    ({"device": "meta"}, ValueError, "meta"),
    ({"scheduler_type": "cosin"}, ValueError, "scheduler_type"),
    ({"factor": 2.0}, ValueError, "factor"),
    ({"amp_dtype": "fp16"}, ValueError, "amp_dtype"),
    ({"augment": "emotion", "augment_options": {"noise": 1}}, ValueError, "augment_options"),
    ({"metrics": "f2"}, ValueError, "metrics"),
    ({"keep_last": 0}, ValueError, "keep_last"),
    ({"rollback_lr_factor": 1.0}, ValueError, "rollback_lr_factor"),
    ({"resume": 3}, TypeError, "resume"),
    ({"seed": -1}, ValueError, "seed"),
]


@pytest.mark.parametrize("bad, error, name", BAD_OPTIONS, ids=[str(b[0])[:40] for b in BAD_OPTIONS])
def test_a_bad_option_touches_neither_the_model_nor_the_rngs_nor_the_folder(tmp_path, bad, error,
                                                                           name):
    model = torch.nn.Linear(3, 2)
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    folder = tmp_path / "ckpt"
    folder.mkdir()
    (folder / "keep.txt").write_text("x")
    loader = [(torch.randn(4, 3), torch.randint(0, 2, (4,)))]
    rng = (torch.get_rng_state(), random.getstate(), np.random.get_state()[1].copy())
    with pytest.raises(error, match=name):
        options = {"epochs": 1, "seed": 0, "device": "cpu", "checkpoint_dir": folder,
                   "verbose": False, **bad}
        train_model_advanced(model, loader, loader, torch.nn.CrossEntropyLoss(), **options)
    assert torch.equal(torch.get_rng_state(), rng[0])  # seed=0 was not applied
    assert random.getstate() == rng[1]
    assert np.array_equal(np.random.get_state()[1], rng[2])
    assert all(torch.equal(v, weights[k]) for k, v in model.state_dict().items())
    assert [p.name for p in folder.iterdir()] == ["keep.txt"]  # no lock, log or checkpoint
    assert next(model.parameters()).grad is None
