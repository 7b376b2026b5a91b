"""The report's training spectrograms: a few training inputs, before and after augmentation.

``advtrain train`` saves the first :data:`N_SAMPLES` training inputs of an audio task (as the
training loader gives them, before augmentation) to :data:`SAMPLES_FILE` in the run directory;
the report applies the run's augmentation to them again, from the run's options
(``use_augmentation``, ``augment='audio'``, ``augment_options`` and ``seed``, as
:func:`~advanced_training_utils.engine.prepare.build_augment` does), so the panel shows what the
model was trained on.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader

from ...augmentation import DataAugmentation

__all__ = ["N_SAMPLES", "SAMPLES_FILE", "augment_samples", "load_samples", "save_train_samples"]

log = logging.getLogger(__name__)

#: The file (in the run directory) holding the training inputs: array ``inputs`` ``[N, ...]``.
SAMPLES_FILE = "train_samples.npz"

#: How many training inputs the report shows.
N_SAMPLES = 3


def save_train_samples(loader: DataLoader, out_dir: Path, n: int = N_SAMPLES) -> Path | None:
    """Save the first ``n`` inputs of ``loader``'s dataset, collated by the loader's
    ``collate_fn``, to ``out_dir/``:data:`SAMPLES_FILE`; None (nothing written) when the
    dataset is empty or its items are not tensors."""
    dataset: Any = loader.dataset
    items = [dataset[i] for i in range(min(n, len(dataset)))]
    if not items:
        return None
    x = loader.collate_fn(items)[0] if loader.collate_fn is not None else None
    if not isinstance(x, torch.Tensor):
        return None
    path = Path(out_dir) / SAMPLES_FILE
    np.savez(path, inputs=x.detach().float().cpu().numpy())
    return path


def load_samples(run_dir: Path) -> np.ndarray | None:
    """The inputs saved by :func:`save_train_samples`, or None when absent or unreadable."""
    path = Path(run_dir) / SAMPLES_FILE
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as z:
            return np.asarray(z["inputs"])
    except (OSError, ValueError, KeyError):
        return None


def augment_samples(inputs: np.ndarray, config: Mapping[str, Any] | None
                    ) -> tuple[np.ndarray | None, str]:
    """The run's audio augmentation applied to ``inputs``: ``(augmented or None, description)``.

    None with a description saying why when the run did not augment (``use_augmentation``
    off, or ``augment`` not ``'audio'``), when the options are unknown (no config), or when
    the augmentation cannot be reproduced (a custom callable, options it refuses).
    """
    if config is None:
        return None, "augmentation unknown (no options saved with the run)"
    if not config.get("use_augmentation") or config.get("augment") is None:
        return None, "no augmentation in this run"
    if config.get("augment") != "audio":
        return None, f"augment={config.get('augment')!r}: not shown"
    opts = dict(config.get("augment_options") or {})
    seed = config.get("seed")
    try:
        aug = DataAugmentation(seed=seed if isinstance(seed, int) else None)
        after = aug.augment_audio_features(torch.from_numpy(inputs), **opts)
    except (TypeError, ValueError) as e:
        log.warning("report: cannot reproduce the augmentation (%s)", e)
        return None, "augmentation not reproducible"
    shown = ", ".join(f"{k}={v}" for k, v in opts.items()) or "default options"
    return after.numpy(), f"SpecAugment + noise ({shown})"
