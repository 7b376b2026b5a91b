"""A shuffling sampler that tells its dataset the epoch, so training crops change every epoch.

:class:`~.datasets.AudioDataset` picks each training clip's window from ``(seed, epoch, index)``
and learns the epoch through its ``set_epoch``. ``train_model_advanced`` calls
``set_epoch(epoch)`` on the training loader's sampler at the start of every epoch (as for a
``DistributedSampler``); this sampler passes it on to the dataset::

    train, val, test, summary = load_audio_splits("corpus/labels.csv", target="emotion")
    loader = DataLoader(train, batch_size=32, collate_fn=train.collate,
                        sampler=EpochSampler(train, generator=torch.Generator().manual_seed(0)))

Without it (``shuffle=True``), every epoch sees the windows of epoch 0.
"""

from __future__ import annotations

from collections.abc import Iterator, Sized
from typing import Any

import torch
from torch.utils.data import RandomSampler, Sampler

from ..._validate import check_int

__all__ = ["EpochSampler"]


class EpochSampler(Sampler[int]):
    """A random permutation of ``range(len(dataset))`` per iteration, drawn by
    ``RandomSampler(dataset, generator=generator)`` (the same draws); :meth:`set_epoch` is passed to the
    dataset (when it has one).

    Args:
        dataset: a sized dataset; its ``set_epoch(epoch)``, if any, is called by :meth:`set_epoch`.
        generator: the ``torch.Generator`` the order is drawn from (kept as the ``generator``
            attribute, where ``train_model_advanced`` finds it to record and restore it for an
            exact resume); None draws each permutation's seed from the global torch RNG.
    """

    def __init__(self, dataset: Sized, generator: torch.Generator | None = None) -> None:
        if not hasattr(dataset, "__len__"):
            raise TypeError(f"dataset must be sized (have __len__), got {type(dataset).__name__}")
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator or None, got "
                            f"{type(generator).__name__}")
        self.dataset = dataset
        self.generator = generator
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.dataset)

    def set_epoch(self, epoch: int) -> None:
        """Record ``epoch`` and pass it to ``dataset.set_epoch`` (if the dataset has one)."""
        self.epoch = check_int("epoch", epoch, low=0)
        hook: Any = getattr(self.dataset, "set_epoch", None)
        if callable(hook):
            hook(self.epoch)

    def __iter__(self) -> Iterator[int]:
        # a RandomSampler over the current ``generator`` attribute (which a DDP wrapper may
        # swap for a seeded one while it draws): the same draws, to the last generator call
        return iter(RandomSampler(self.dataset, generator=self.generator))  # type: ignore[arg-type]
