"""app/report/samples.py: the report's training inputs, before and after the run's augmentation."""

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from advanced_training_utils import DataAugmentation
from advanced_training_utils.app.report.samples import (
    SAMPLES_FILE,
    augment_samples,
    load_samples,
    save_train_samples,
)


def _mels(n=5):
    return torch.randn(n, 1, 16, 30, generator=torch.Generator().manual_seed(0))


def test_saves_the_first_inputs_as_the_loader_collates_them(tmp_path):
    x = _mels()
    loader = DataLoader(TensorDataset(x, torch.arange(5)), batch_size=2, shuffle=True)
    assert save_train_samples(loader, tmp_path) == tmp_path / SAMPLES_FILE
    np.testing.assert_array_equal(load_samples(tmp_path), x[:3].numpy())


def test_nothing_saved_for_an_empty_dataset_and_nothing_loaded_when_absent(tmp_path):
    loader = DataLoader(TensorDataset(torch.zeros(0, 1, 4, 4), torch.zeros(0)))
    assert save_train_samples(loader, tmp_path) is None and load_samples(tmp_path) is None


@pytest.mark.parametrize("opts", [{}, {"noise_level": 0.0, "policy": "LD"}])
def test_the_runs_augmentation_is_applied_with_its_options_and_seed(opts):
    x = _mels(3).numpy()
    config = {"use_augmentation": True, "augment": "audio", "augment_options": opts, "seed": 7}
    after, how = augment_samples(x, config)
    expected = DataAugmentation(seed=7).augment_audio_features(torch.from_numpy(x), **opts)
    np.testing.assert_array_equal(after, expected.numpy())
    assert how.startswith("SpecAugment + noise (") and not np.array_equal(after, x)


@pytest.mark.parametrize("config, says", [
    ({"use_augmentation": False, "augment": "audio"}, "no augmentation in this run"),
    ({"use_augmentation": True, "augment": None}, "no augmentation in this run"),
    ({"use_augmentation": True, "augment": "emotion"}, "augment='emotion': not shown"),
    ({"use_augmentation": True, "augment": "audio", "augment_options": {"bogus": 1}},
     "augmentation not reproducible"),
    (None, "augmentation unknown (no options saved with the run)"),
])
def test_no_augmented_copy_when_the_run_did_not_augment_audio(config, says):
    assert augment_samples(_mels(2).numpy(), config) == (None, says)
