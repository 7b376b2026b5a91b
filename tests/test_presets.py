import pytest
import torch

from _helpers import make_loaders, make_model
from advanced_training_utils import PRESETS, get_preset, train_model_advanced


def test_presets_hold_the_guides_values():
    assert PRESETS["fast"] == {"use_scheduler": True, "scheduler_type": "onecycle",
                               "gradient_clip": None, "use_mixed_precision": True,
                               "use_augmentation": False, "early_stop_patience": 5}
    assert PRESETS["stable"]["early_stop_patience"] == 15 and PRESETS["stable"]["check_stability"]
    assert PRESETS["memory_constrained"]["gradient_clip"] == 0.5


def test_get_preset_returns_a_copy_with_overrides_and_alias():
    p = get_preset("memory", early_stop_patience=3)
    assert p["scheduler_type"] == "cosine" and p["early_stop_patience"] == 3
    p["scheduler_type"] = "step"
    assert PRESETS["memory_constrained"]["scheduler_type"] == "cosine"


def test_unknown_preset_and_override():
    with pytest.raises(ValueError, match="preset must be one of 'fast', 'stable', 'memory_constrained', 'memory'; got 'turbo'"):
        get_preset("turbo")
    with pytest.raises(TypeError, match="unknown option\\(s\\) 'lr'"):
        get_preset("fast", lr=0.1)


@pytest.mark.parametrize("name", ["fast", "stable", "memory_constrained"])
def test_each_preset_trains(name, tmp_path):
    tl, vl = make_loaders(n=48)
    res = train_model_advanced(make_model(1), tl, vl, torch.nn.CrossEntropyLoss(), epochs=2,
                               device="cpu", checkpoint_dir=tmp_path, verbose=False,
                               **get_preset(name))
    assert res["epochs_run"] == 2
