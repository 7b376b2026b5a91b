"""app/audio/options.py: AudioOptions defaults and their validation."""

import dataclasses

import pytest
import torch

from advanced_training_utils.app.audio.options import EVAL_CROPS, AudioOptions


def test_defaults_are_valid_and_frozen():
    o = AudioOptions()
    assert (o.task, o.eval_crop, o.normalization, o.on_error) == ("auto", "center", "utterance",
                                                                   "skip")
    assert o.split_fractions == (0.8, 0.1, 0.1) and EVAL_CROPS == ("center", "whole")
    with pytest.raises(dataclasses.FrozenInstanceError):
        o.task = "regression"


@pytest.mark.parametrize("bad, error, message", [
    ({"features": "mel"}, TypeError, "features must be a LogMel, got str"),
    ({"task": "clustering"}, ValueError, "task"),
    ({"crop_seconds": 0.0}, ValueError, "crop_seconds"),
    ({"max_crop_seconds": -1.0}, ValueError, "max_crop_seconds"),
    ({"eval_crop": "left"}, ValueError, "eval_crop"),
    ({"normalization": "global"}, ValueError, "normalization"),
    ({"on_error": "ignore"}, ValueError, "on_error"),
    ({"split_fractions": (0.5, 0.5, 0.5)}, ValueError, r"split_fractions must be \(train, val, "
                                                         r"test\) summing to 1"),
    ({"split_fractions": (0.5, 0.5)}, ValueError, "split_fractions"),
    ({"val_fraction": 1.0}, ValueError, "val_fraction"),
    ({"split_seed": -1}, ValueError, "split_seed"),
    ({"generator": 0}, TypeError, "generator must be a torch.Generator, got int"),
    ({"nope": 1}, TypeError, "nope"),
], ids=lambda v: str(v)[:30] if isinstance(v, dict) else None)
def test_each_bad_field_is_named(bad, error, message):
    with pytest.raises(error, match=message):
        AudioOptions(**bad)


def test_good_values_are_kept():
    g = torch.Generator().manual_seed(3)
    o = AudioOptions(task="regression", crop_seconds=2.5, eval_crop="whole",
                     normalization="dataset", on_error="raise", split_fractions=(0.6, 0.2, 0.2),
                     val_fraction=0.25, split_seed=7, generator=g, use_cache=False)
    assert (o.task, o.crop_seconds, o.eval_crop, o.normalization, o.on_error, o.val_fraction,
            o.split_seed, o.generator, o.use_cache) == ("regression", 2.5, "whole", "dataset",
                                                        "raise", 0.25, 7, g, False)
