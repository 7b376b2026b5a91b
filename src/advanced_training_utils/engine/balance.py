"""Class imbalance: ``class_weights='balanced'`` and ``sampler='balanced'``.

Both read the training labels once, before training, without running the model
(:func:`training_labels`): from the dataset's ``targets`` (torchvision's convention, and
:class:`~advanced_training_utils.app.audio.datasets.AudioDataset`'s), the labels tensor of a
``TensorDataset`` (``tensors[1]``), through a ``Subset`` to its dataset, or a ``targets``
attribute of the loader itself; else one pass over the data with every RNG left as it was
(:func:`~.prepare.rng_untouched`): for a DataLoader over a map-style dataset, each item once in
index order (the loader's own sampler is not used, so its draws cannot bias the counts); for
other iterables, one pass over their batches. Labels are one class index per item (an integer
tensor ``[N]``). The counts are of the whole dataset, so under DDP every rank computes the same.

``class_weights='balanced'``: weight ``w_c = n_samples / (n_classes * count_c)`` for class
``c`` (scikit-learn's ``compute_class_weight('balanced')``), set as the ``weight`` of a copy of
the criterion (the caller's object is left unchanged). Only ``torch.nn.CrossEntropyLoss`` and
``torch.nn.NLLLoss`` (and subclasses) take them; another criterion is a ``ValueError``. With
``reduction='mean'`` (the default) torch divides a batch's weighted sum by the sum of the
weights of the batch's targets, not by the batch size: that is torch's convention, kept here
(so a batch of a single class has the same loss with and without weights). The training and
the validation loss are both the weighted loss. Labels equal to the criterion's
``ignore_index`` are not counted. ``n_classes`` is the highest label + 1, or the length of the
dataset's ``classes`` / ``class_names`` when larger; a class with no training example is an
error naming it (as scikit-learn's: its weight would be infinite), not a weight of 0. The
weights are saved in the checkpoint (a resume uses the saved ones) and returned in the result
(``class_weights``).

``sampler='balanced'``: the training DataLoader is rebuilt around :class:`BalancedSampler`, a
``WeightedRandomSampler`` drawing ``len(dataset)`` items with replacement, item ``i`` with
probability proportional to ``1 / count[label_i]`` (so each class present is drawn equally
often on average), from a ``torch.Generator`` seeded with the run's ``seed`` (None: the global
torch RNG). It keeps the loader's ``batch_size``, ``drop_last``, ``collate_fn``,
``num_workers``, ``pin_memory``... and replaces its sampler (``shuffle`` is moot). Its batches go
through the recorded epoch order (:mod:`.dataorder`) like any sampler's, so a mid-epoch resume
is bit-exact; under DDP it is sharded like a user's sampler
(:class:`~.distributed.ShardedSampler`: every rank draws the same sequence, seeded per epoch,
and takes its share). A loader that is not a ``DataLoader`` over a map-style dataset, or that
has its own ``batch_sampler``, is refused.

Example:
    >>> balanced_weights(torch.tensor([0, 0, 0, 1]))
    tensor([0.6667, 2.0000], dtype=torch.float64)
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch.utils.data import (
    BatchSampler,
    DataLoader,
    IterableDataset,
    Subset,
    TensorDataset,
    WeightedRandomSampler,
)

from .config import TrainConfig
from .distributed import _rebuild
from .loop import split_batch
from .prepare import rng_untouched

__all__ = ["SUPPORTED_CRITERIA", "training_labels", "class_counts", "balanced_weights",
           "ClassWeights", "weigh_criterion", "BalancedSampler", "balanced_loader"]

log = logging.getLogger(__name__)

#: The criteria ``class_weights`` applies to (their ``weight`` argument).
SUPPORTED_CRITERIA: tuple[type[torch.nn.Module], ...] = (torch.nn.CrossEntropyLoss,
                                                          torch.nn.NLLLoss)
_PASS_BATCH = 256  # items per batch of the one labels pass over a map-style dataset


# ---------------------------------------------------------------------------- the labels
def training_labels(loader: Iterable[Any], option: str = "class_weights") -> torch.Tensor:
    """The training labels, int64 ``[N]`` (in dataset index order for a DataLoader over a
    map-style dataset); see the module docstring for where they are read from.

    Raises:
        ValueError: labels that are not one integer class index per item (``option`` named).
    """
    ds = loader.dataset if isinstance(loader, DataLoader) else None
    labels = _dataset_labels(ds) if ds is not None else None
    if labels is None and getattr(loader, "targets", None) is not None:
        labels = loader.targets  # type: ignore[attr-defined]
    if labels is None:
        labels = _labels_pass(loader)
    return _as_labels(labels, option)


def _dataset_labels(ds: Any) -> Any:
    """``ds.targets``, a TensorDataset's ``tensors[1]``, through Subsets; None if none."""
    if isinstance(ds, Subset):
        inner = _dataset_labels(ds.dataset)
        return None if inner is None else torch.as_tensor(inner)[torch.as_tensor(ds.indices)]
    if getattr(ds, "targets", None) is not None:
        return ds.targets
    if isinstance(ds, TensorDataset) and len(ds.tensors) >= 2:
        return ds.tensors[1]
    return None


def _labels_pass(loader: Iterable[Any]) -> list[torch.Tensor]:
    """One pass over the data, every RNG restored after it (module docstring)."""
    source: Iterable[Any] = loader
    if isinstance(loader, DataLoader) and not isinstance(loader.dataset, IterableDataset):
        collate = loader.collate_fn if loader.batch_size is not None else None
        source = DataLoader(loader.dataset, batch_size=_PASS_BATCH, collate_fn=collate)
    with rng_untouched(loader):
        ys = [torch.as_tensor(split_batch(b)[1]) for b in source]
    return [y.reshape(-1) if y.dim() == 0 else y for y in ys]  # unbatched items: one label


def _as_labels(labels: Any, option: str) -> torch.Tensor:
    if isinstance(labels, list) and labels and isinstance(labels[0], torch.Tensor):
        dims = {t.dim() for t in labels}
        if dims != {1}:
            raise ValueError(f"{option}='balanced' needs one class label per item; the "
                             f"training batches hold labels of {max(dims)} dim(s)")
        labels = torch.cat(labels)
    y = torch.as_tensor(labels)
    if y.is_floating_point() or y.is_complex() or y.dtype == torch.bool:
        raise ValueError(f"{option}='balanced' needs integer class labels; the training labels "
                         f"are {y.dtype} (a regression target?)")
    if y.dim() != 1:
        raise ValueError(f"{option}='balanced' needs one class label per item (a [N] tensor); "
                         f"the training labels have shape {tuple(y.shape)}")
    if y.numel() == 0:
        raise ValueError(f"{option}='balanced': the training data hold no labels")
    return y.to(torch.int64)


def _class_names(loader: Any) -> list[str] | None:
    ds = getattr(loader, "dataset", None)
    while isinstance(ds, Subset):
        ds = ds.dataset
    for name in ("classes", "class_names"):
        names = getattr(ds, name, None)
        if isinstance(names, Sequence) and not isinstance(names, str):
            return [str(n) for n in names]
    return None


# ---------------------------------------------------------------------------- the weights
def class_counts(labels: torch.Tensor, n_classes: int | None = None) -> torch.Tensor:
    """Items per class, int64 ``[n_classes]`` (default: highest label + 1).

    Raises:
        ValueError: a negative label, or one >= ``n_classes``.
    """
    if labels.numel() and int(labels.min()) < 0:
        raise ValueError(f"class labels must be >= 0; the training labels hold "
                         f"{int(labels.min())}")
    top = int(labels.max()) + 1 if labels.numel() else 0
    n = top if n_classes is None else n_classes
    if top > n:
        raise ValueError(f"the training labels go up to {top - 1}, but there are {n} classes")
    return torch.bincount(labels, minlength=n)


def balanced_weights(labels: torch.Tensor, n_classes: int | None = None,
                     names: Sequence[str] | None = None) -> torch.Tensor:
    """``n_samples / (n_classes * count_c)`` per class, float64 ``[n_classes]`` (scikit-learn's
    ``compute_class_weight('balanced', classes=range(n_classes), y=labels)``).

    Raises:
        ValueError: a class with no label (named, with its name from ``names``).
    """
    counts = class_counts(labels, n_classes)
    absent = [c for c in range(len(counts)) if counts[c] == 0]
    if absent:
        shown = [f"{c} ({names[c]!r})" if names and c < len(names) else str(c) for c in absent]
        raise ValueError(f"class_weights='balanced': class(es) {', '.join(shown)} have no "
                         f"training example, so their weight n/(n_classes*0) is infinite; "
                         f"remove the class(es) from the model and labels, or pass your own "
                         f"criterion weights")
    n = counts.sum().to(torch.float64)
    return n / (len(counts) * counts.to(torch.float64))


class ClassWeights:
    """The class weights the run applies to its criterion: a part of the checkpoint's table.

    Off (``weights`` None) its state is None. On resume the saved weights are the ones used
    (copied into the criterion's ``weight``); if they differ from this run's, a warning says so.
    """

    def __init__(self, weights: torch.Tensor | None = None,
                 criterion: torch.nn.Module | None = None) -> None:
        self.weights, self.criterion = weights, criterion

    def as_list(self) -> list[float] | None:
        """The weights as floats (the result's ``class_weights``), None when off."""
        return None if self.weights is None else [float(w) for w in self.weights]

    def state_dict(self) -> dict[str, torch.Tensor] | None:
        return None if self.weights is None else {"weights": self.weights.clone()}

    def load_state_dict(self, state: dict[str, torch.Tensor] | None) -> None:
        if state is None or self.weights is None or self.criterion is None:
            return
        saved = state["weights"].to(self.weights.dtype)
        if not torch.equal(saved, self.weights):
            log.warning("class_weights: the checkpoint's weights %s differ from the ones this "
                        "run's labels give %s; resuming with the checkpoint's",
                        [round(float(w), 6) for w in saved],
                        [round(float(w), 6) for w in self.weights])
        self.weights = saved
        weight = self.criterion.weight
        weight.copy_(saved.to(weight.dtype))


def weigh_criterion(criterion: Any, loader: Iterable[Any], cfg: TrainConfig,
                    device: torch.device, dtype: torch.dtype | None = None
                    ) -> tuple[Any, ClassWeights]:
    """With ``cfg.class_weights='balanced'``: a copy of ``criterion`` with the balanced weights
    (on ``device``, in ``dtype``: the model's float type, default torch's default dtype) and the
    part recording them; else
    ``(criterion, ClassWeights())``.

    Raises:
        ValueError: an unsupported criterion (its type and the supported ones named), one that
            already has weights, labels that are not class indices, or an absent class.
    """
    if cfg.class_weights is None:
        return criterion, ClassWeights()
    if not isinstance(criterion, SUPPORTED_CRITERIA):
        raise ValueError(f"class_weights='balanced' applies to torch.nn.CrossEntropyLoss or "
                         f"torch.nn.NLLLoss (their weight=); got criterion of type "
                         f"{type(criterion).__name__}. Weight your own loss instead, or use "
                         f"sampler='balanced', which works with any criterion")
    if criterion.weight is not None:
        raise ValueError(f"class_weights='balanced' would replace the weight your "
                         f"{type(criterion).__name__} already has; pass one or the other")
    labels = training_labels(loader)
    labels = labels[labels != criterion.ignore_index]
    if labels.numel() == 0:
        raise ValueError(f"class_weights='balanced': every training label is the criterion's "
                         f"ignore_index ({criterion.ignore_index})")
    names = _class_names(loader)
    weights = balanced_weights(labels, max(len(names or ()), int(labels.max()) + 1), names)
    weighted = copy.deepcopy(criterion)
    weighted.weight = weights.to(device=device, dtype=dtype or torch.get_default_dtype())
    log.info("class_weights='balanced': %s", [round(float(w), 4) for w in weights])
    return weighted, ClassWeights(weights, weighted)


# ---------------------------------------------------------------------------- the sampler
class BalancedSampler(WeightedRandomSampler):
    """``WeightedRandomSampler(1 / count[labels], len(labels), replacement=True, generator)``
    that passes :meth:`set_epoch` on to the dataset (when it has one, as
    :class:`~advanced_training_utils.app.audio.sampler.EpochSampler` does).

    Args:
        labels: int64 ``[N]``, item ``i``'s class.
        dataset: the loader's dataset (for ``set_epoch``), or None.
        generator: the ``torch.Generator`` to draw from (None: the global torch RNG).
    """

    def __init__(self, labels: torch.Tensor, dataset: Any = None,
                 generator: torch.Generator | None = None) -> None:
        counts = class_counts(labels)
        per_item = 1.0 / counts.to(torch.float64)[labels]
        super().__init__(per_item, num_samples=len(labels), replacement=True,
                         generator=generator)
        self.dataset = dataset
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Record ``epoch``; pass it to ``dataset.set_epoch`` (if any)."""
        self.epoch = epoch
        hook = getattr(self.dataset, "set_epoch", None)
        if callable(hook):
            hook(epoch)


def balanced_loader(loader: Iterable[Any], cfg: TrainConfig) -> Iterable[Any]:
    """With ``cfg.sampler='balanced'``: ``loader`` rebuilt around a :class:`BalancedSampler`
    (seeded with ``cfg.seed``); else ``loader`` itself.

    Raises:
        ValueError: ``loader`` is not a DataLoader over a map-style dataset with its own batch
            size (an iterable, an IterableDataset, ``batch_size=None``, a custom
            ``batch_sampler``), or its labels are not class indices.
    """
    if cfg.sampler is None:
        return loader
    if not isinstance(loader, DataLoader) or isinstance(loader.dataset, IterableDataset):
        raise ValueError(f"sampler='balanced' needs a torch DataLoader over a map-style dataset "
                         f"(it replaces the loader's sampler); got {_describe(loader)}")
    bs = loader.batch_sampler
    if type(bs) is not BatchSampler:
        raise ValueError(f"sampler='balanced' needs a DataLoader with batch_size= (it replaces "
                         f"the sampler inside the batching); train_loader has "
                         f"{'batch_size=None' if bs is None else type(bs).__name__ + ' batches'}")
    if cfg.class_weights is not None:
        log.warning("class_weights='balanced' with sampler='balanced' corrects the class "
                    "imbalance twice (the rare classes then weigh more than the common ones)")
    labels = training_labels(loader, option="sampler")
    if len(labels) != len(loader.dataset):  # type: ignore[arg-type]
        raise ValueError(f"sampler='balanced': the dataset has {len(loader.dataset)} items "  # type: ignore[arg-type]
                         f"but {len(labels)} labels")
    gen = torch.Generator().manual_seed(cfg.seed) if cfg.seed is not None else None
    sampler = BalancedSampler(labels, loader.dataset, gen)
    if type(loader.sampler).__name__ not in ("SequentialSampler", "RandomSampler"):
        log.info("sampler='balanced' replaces train_loader's %s", type(loader.sampler).__name__)
    return _rebuild(loader, sampler=sampler, batch_size=bs.batch_size, drop_last=bs.drop_last)


def _describe(loader: Any) -> str:
    if isinstance(loader, DataLoader):
        return f"a DataLoader over an IterableDataset ({type(loader.dataset).__name__})"
    return f"{type(loader).__name__}"
