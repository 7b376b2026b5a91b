"""Epoch metrics from device-side sufficient statistics: UAR, macro-F1, CCC and friends, exactly.

A metric that is not a mean of per-example values (UAR, macro-F1, CCC) cannot be computed by
averaging per-batch values: the mean of per-batch macro-F1 is not the epoch's macro-F1. Each
built-in here instead keeps statistics that *add up* over batches and over DDP ranks, as one
flat device tensor, and computes the metric once at the end of the epoch:

* :class:`ClassificationStats`: the weighted confusion matrix ``[C, C]`` (rows = true class,
  columns = predicted class) -> ``accuracy``, ``uar`` (unweighted average recall = macro recall),
  ``macro_f1`` and ``per_class_recall`` (reported as flat ``recall_<class>`` keys).
* :class:`RegressionStats`: per target ``n, sum x, sum y, sum x^2, sum y^2, sum xy, sum |x-y|``
  -> ``ccc`` (Lin's concordance correlation coefficient, mean over targets) and ``mae``, with
  ``ccc_<target>`` / ``mae_<target>`` keys when there are several targets (or names are given).

``update`` uses tensor operations only: no ``.item()``, no ``bool(tensor)``, no ``.tolist()``, no
branch on a tensor's value; the shape checks read Python ints. ``compute`` reads every value in
one host transfer, and ``compute_tensors`` returns the 0-d device tensors so a caller can add
them to a host read it already does.

Conventions (each tested against scikit-learn, torchmetrics or a two-pass numpy reference):

* Soft targets ``[B, C]`` (mixup, label smoothing) count as their argmax class (ties go to the
  lowest index, as :func:`torch.argmax`).
* Integer targets outside ``[0, C)`` (e.g. ``ignore_index=-100``) match no class: not counted.
* Shapes the classification built-ins do not define are refused with a ``ValueError``: one value
  per example (``[B]``/``[B, 1]``, a single binary logit: output 2 logits or use a binary
  metric); a tuple or dict output is a ``TypeError``. Multi-label 0/1 targets ``[B, L]`` cannot
  be told from soft targets without reading values, which ``update`` never does:
  :meth:`EpochMetrics.check` (one host read; ``train_model_advanced`` runs it on the first
  training batch) refuses rows that are not a class distribution.
* A class absent from the targets has an undefined recall: ``recall_<k>`` is NaN and ``uar``
  averages over the classes present, as ``balanced_accuracy_score`` and
  ``recall_score(average="macro", labels=range(C), zero_division=np.nan)``. ``macro_f1``
  averages over the classes whose F1 is defined (present in the targets or the predictions), as
  ``f1_score(average="macro")``: a class predicted but never true scores 0.
* ``ccc`` uses population (1/n) moments, as Lin (1989). ``torchmetrics.ConcordanceCorrCoef``
  uses 1/(n-1) variances and covariance but not for the squared mean difference, so it differs
  by O(1/n) unless the two means are equal.
* ``weight`` ``[B]`` of 0/1 excludes items (the padded duplicates a ``DistributedSampler`` adds
  under DDP): a 0 counts the item 0 times. Built-ins accept any non-negative weight, as
  scikit-learn's ``sample_weight``.

Example (two batches of unequal size; under DDP all-reduce the stats before computing):

>>> import torch
>>> from advanced_training_utils.metrics import resolve_metrics
>>> metrics = resolve_metrics(["accuracy", "uar", "macro_f1", "per_class_recall"])
>>> logits = torch.tensor([[2.0, 0.1, 0.0], [0.2, 1.5, 0.1], [0.1, 0.3, 2.2], [1.0, 0.2, 0.1]])
>>> metrics.update(logits[:1], torch.tensor([0]))
>>> metrics.update(logits[1:], torch.tensor([1, 2, 1]))
>>> stats = metrics.stats()  # under DDP: torch.distributed.all_reduce(stats) (SUM)
>>> metrics.load_stats(stats)
>>> result = metrics.compute()  # {key: float}, one host read
>>> result["accuracy"], round(result["uar"], 4), round(result["macro_f1"], 4)
(0.75, 0.8333, 0.7778)
>>> [result[f"recall_{k}"] for k in range(3)]
[1.0, 0.5, 1.0]
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from ._validate import check_int

__all__ = [
    "BUILTIN_METRICS",
    "BatchMeanMetric",
    "ClassificationStats",
    "EpochMetrics",
    "RegressionStats",
    "TorchmetricsAdapter",
    "batch_rows",
    "nest_per_class",
    "resolve_metrics",
]

_CLASSIFICATION = ("accuracy", "uar", "macro_f1", "per_class_recall")
_REGRESSION = ("ccc", "mae")
#: Names :func:`resolve_metrics` understands, in the order their keys are reported.
BUILTIN_METRICS: tuple[str, ...] = _CLASSIFICATION + _REGRESSION


# ---------------------------------------------------------------- shared checks and helpers
def _stat_dtype(device: torch.device) -> torch.dtype:
    """float64 keeps counts exact up to 2**53; MPS has no float64."""
    return torch.float32 if device.type == "mps" else torch.float64


def _check_tensor(name: str, value: Any) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    return value


def _outputs_tensor(value: Any, report: Sequence[str]) -> torch.Tensor:
    """The model's outputs, which the built-ins need as one tensor (named error otherwise)."""
    if isinstance(value, torch.Tensor):
        return value
    hint = ""
    if isinstance(value, (tuple, list, Mapping)):
        hint = (" (a model returning several outputs, such as (logits, embedding)?): make "
                "forward() return the logits tensor, or pass a callable metric that picks "
                "them, e.g. metrics={'accuracy': lambda out, y: (out[0].argmax(1) == y)"
                ".float().mean()}")
    raise TypeError(f"outputs must be a torch.Tensor, got {type(value).__name__}: the "
                    f"built-in metrics {list(report)} need the model's output to be one "
                    f"tensor{hint}")


def _weights(weight: Any, batch: int, like: torch.Tensor) -> torch.Tensor | None:
    """``weight`` ``[B]`` (bool or real) as a float tensor on ``like``'s device, or None."""
    if weight is None:
        return None
    _check_tensor("weight", weight)
    if tuple(weight.shape) != (batch,):
        raise ValueError(f"weight must have shape [B] = ({batch},) to match the batch, got "
                         f"shape {tuple(weight.shape)}")
    if weight.is_complex():
        raise TypeError(f"weight must be bool or real, got dtype {weight.dtype}")
    return weight.detach().to(device=like.device, dtype=like.dtype)


def _names(arg: str, names: Sequence[str] | None, size: int | None) -> list[str] | None:
    """Validate a list of unique str labels, and its length against ``size`` when known."""
    if names is None:
        return None
    if isinstance(names, str) or not isinstance(names, Sequence):
        raise TypeError(f"{arg} must be a sequence of str, got {type(names).__name__}")
    names = list(names)
    bad = [n for n in names if not isinstance(n, str) or not n]
    if bad or len(set(names)) != len(names):
        raise ValueError(f"{arg} must be unique non-empty strings, got {names!r}")
    if size is not None and len(names) != size:
        raise ValueError(f"{arg} has {len(names)} names but the size given is {size}")
    return names


def _report(arg: str, report: Any, allowed: tuple[str, ...]) -> tuple[str, ...]:
    if isinstance(report, str):
        report = (report,)
    report = tuple(report)
    bad = [r for r in report if r not in allowed]
    if bad or not report:
        raise ValueError(f"{arg} must be a non-empty subset of {allowed}, got {report!r}")
    return tuple(r for r in allowed if r in report)


# ---------------------------------------------------------------- flat sum-reducible state
class _SumStats:
    """Base of the built-ins: one flat 1-D tensor of statistics that add up over batches/ranks.

    Subclasses set ``self._size`` (the per-row count: classes or targets; None until the first
    update infers it) and implement ``_numel``, ``_batch_stats`` and ``_compute``.
    """

    _size_name = "size"

    def __init__(self, size: int | None, device: Any) -> None:
        self._size = size
        self._device = torch.device(device if device is not None else "cpu")
        self._state: torch.Tensor | None = None
        self.reset()

    def _numel(self, size: int) -> int:
        raise NotImplementedError

    def _setup(self, size: int | None, names: Sequence[str] | None, report: Sequence[str],
               device: Any) -> None:
        """A subclass constructor's work: check the size, the names and the report, start."""
        size, names = _size_and_names(self._size_name, size, self._names_arg, names, self._low)
        setattr(self, self._names_arg, names)
        self.report = _report("report", report, self._allowed)
        _SumStats.__init__(self, size, device)

    def reset(self) -> None:
        """Zero the statistics (start of an epoch); the inferred size is kept."""
        if self._size is None:
            self._state = None
        else:
            self._state = torch.zeros(self._numel(self._size), device=self._device,
                                      dtype=_stat_dtype(self._device))

    def _add(self, batch_stats: torch.Tensor) -> None:
        if self._state is None or self._state.device != batch_stats.device:
            base = self._state if self._state is not None else torch.zeros_like(batch_stats)
            self._state = base.to(device=batch_stats.device, dtype=batch_stats.dtype)
            self._device = batch_stats.device
        self._state += batch_stats

    def _adopt_size(self, size: int, arg: str, low: int) -> None:
        """Take the size from the first batch, or check it against the known one."""
        if self._size is None:
            if size < low:
                raise ValueError(f"{arg} must have at least {low} columns, got {size}")
            self._size = size
            self._check_names()
            self.reset()
        elif size != self._size:
            raise ValueError(f"{arg} has {size} columns but this metric has "
                             f"{self._size_name}={self._size}")

    def _check_names(self) -> None:
        """Subclasses check their label names once the size is known."""

    def stats(self) -> torch.Tensor:
        """The statistics as a flat 1-D tensor (empty before the size is known); SUM-reducible."""
        if self._state is None:
            return torch.zeros(0, device=self._device, dtype=_stat_dtype(self._device))
        return self._state

    def load_stats(self, flat: torch.Tensor) -> None:
        """Replace the statistics with ``flat`` (e.g. the SUM all-reduce of :meth:`stats`)."""
        _check_tensor("flat", flat)
        want = tuple(self.stats().shape)
        if tuple(flat.shape) != want:
            raise ValueError(f"flat must have the shape of stats(), {want}, got "
                             f"{tuple(flat.shape)}")
        if self._state is not None:
            self._state = flat.detach().to(self._state.dtype).clone()
            self._device = self._state.device

    def merge(self, other: _SumStats) -> None:
        """Add ``other``'s statistics to ours (what a SUM all-reduce does across ranks)."""
        if type(other) is not type(self):
            raise TypeError(f"other must be a {type(self).__name__}, got {type(other).__name__}")
        if other._size is None:
            return
        self._adopt_size(other._size, f"other ({self._size_name}={other._size})", 1)
        self._add(other.stats().to(self.stats().device))

    def state_dict(self) -> dict[str, Any]:
        """The size and a copy of the statistics (plain types and tensors)."""
        state = None if self._state is None else self._state.detach().clone()
        return {self._size_name: self._size, "stats": state}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict` into this object (a fresh one may not know its size yet)."""
        size, stats = state[self._size_name], state["stats"]
        if size is not None:
            self._adopt_size(int(size), f"state_dict ({self._size_name}={size})", 1)
        if stats is not None:
            self.load_stats(stats)

    def compute_tensors(self) -> dict[str, torch.Tensor]:
        """Each reported value as a 0-d tensor on the statistics' device (no host read)."""
        raise NotImplementedError

    def compute(self) -> dict[str, float]:
        """:meth:`compute_tensors` read in one host transfer."""
        return _read(self.compute_tensors())


def _read(values: Mapping[str, torch.Tensor]) -> dict[str, float]:
    """Stack 0-d tensors and read them with one ``tolist`` (one device-to-host transfer)."""
    if not values:
        return {}
    tensors = list(values.values())
    device = tensors[0].device
    host = torch.stack([t.detach().to(device=device, dtype=torch.float64) for t in tensors])
    return dict(zip(values, host.tolist()))


def _size_and_names(size_arg: str, size: int | None, names_arg: str,
                    names: Sequence[str] | None, low: int) -> tuple[int | None, Any]:
    """``(size, names)`` checked together: the size is given, or taken from the names."""
    if size is not None:
        size = check_int(size_arg, size, low=low)
    names = _names(names_arg, names, size)
    if size is None and names is not None:
        size = check_int(f"len({names_arg})", len(names), low=low)
    return size, names


# ---------------------------------------------------------------- classification
class ClassificationStats(_SumStats):
    """Confusion-matrix accumulator -> ``accuracy``, ``uar``, ``macro_f1``, ``recall_<class>``.

    Args:
        num_classes: C (>= 2); None takes it from the logits' last dim at the first update.
            Under DDP give it, so a rank with no batch still has stats of the right length.
        class_names: optional names for the ``recall_<name>`` keys (default ``recall_0``...).
        report: which of ``"accuracy", "uar", "macro_f1", "per_class_recall"`` to report.
        device: where the zero statistics start (they follow the inputs' device on update).

    Statistics: ``stats()`` is the ``[C, C]`` weighted confusion matrix flattened row-major
    (row = true class, column = predicted class).
    """

    _size_name, _names_arg, _low, _allowed = "num_classes", "class_names", 2, _CLASSIFICATION

    def __init__(self, num_classes: int | None = None, *, class_names: Sequence[str] | None = None,
                 report: Sequence[str] = _CLASSIFICATION, device: Any = None) -> None:
        self._setup(num_classes, class_names, report, device)

    num_classes = property(lambda self: self._size, doc="C (None until the first update).")

    def _numel(self, size: int) -> int:
        return size * size

    def _check_names(self) -> None:
        _names("class_names", self.class_names, self._size)

    def _prepare(self, outputs: Any, targets: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """Check a batch's types and shapes (Python ints only) and adopt C: ``(outputs [B, C],
        true class [B])``."""
        out = _outputs_tensor(outputs, self.report).detach()
        tgt = _check_tensor("targets", targets).detach()
        shape = tuple(out.shape)
        if out.dim() == 1 or (out.dim() == 2 and shape[1] == 1):
            raise ValueError(
                f"outputs of shape {shape} hold one value per example (a binary model with a "
                f"single logit?), but the built-in classification metrics {list(self.report)} "
                "need logits of shape [B, C], one column per class, C >= 2 (what "
                "CrossEntropyLoss takes): output 2 logits, or pass a binary metric instead "
                "(torchmetrics.classification.BinaryAccuracy, or a callable)")
        if out.dim() != 2:
            raise ValueError(f"outputs must be logits of shape [B, C], got shape {shape}")
        self._adopt_size(shape[1], f"outputs of shape {shape}", 2)
        return out, _true_class(tgt, out.shape)

    def check(self, outputs: Any, targets: Any) -> None:
        """Check one batch as :meth:`update` does, without adding it, and check the values of
        soft targets ``[B, C]``: each row non-negative and summing to 1 (one-hot, label
        smoothing, mixup). Multi-label 0/1 targets are refused: :meth:`update` reads no value,
        so it would take their argmax as the class. Reads the targets on the host once (for a
        first batch, not per step).

        Raises:
            TypeError / ValueError: as :meth:`update`; ValueError for rows that are not a
                class distribution.
        """
        out, _ = self._prepare(outputs, targets)
        tgt = targets.detach()
        if tuple(tgt.shape) != tuple(out.shape):
            return
        sums = tgt.double().sum(dim=1)
        bad = (tgt < 0).any(dim=1) | ((sums - 1).abs() > 1e-3)
        if bool(bad.any()):
            row = int(bad.nonzero()[0, 0])
            raise ValueError(
                f"targets of shape [B, C] {tuple(tgt.shape)} must be class probabilities "
                f"(non-negative rows summing to 1: one-hot, label smoothing, mixup); row {row} "
                f"sums to {float(sums[row]):g}. Multi-label targets are not defined for the "
                f"built-in classification metrics {list(self.report)}: pass multi-label "
                "metrics (e.g. torchmetrics.classification.MultilabelF1Score) instead")

    def update(self, outputs: torch.Tensor, targets: torch.Tensor,
               weight: torch.Tensor | None = None) -> None:
        """Add one batch. No host read.

        Args:
            outputs: logits (or probabilities) ``[B, C]``; the prediction is their argmax.
            targets: class indices ``[B]`` (integer), or soft targets ``[B, C]`` (float; their
                argmax is the true class).
            weight: optional ``[B]`` 0/1 mask (or non-negative weights); 0 excludes an item.

        Raises:
            TypeError: a non-tensor, or float targets of shape ``[B]``.
            ValueError: shapes that do not fit ``[B, C]`` / ``[B]``, or a C that differs from
                ``num_classes``.
        """
        out, true = self._prepare(outputs, targets)
        dtype = _stat_dtype(out.device)
        classes = torch.arange(self._size, device=out.device)
        # [B, C] one-hot; a target outside [0, C) gives a zero row (not counted)
        truth = (true.to(out.device)[:, None] == classes).to(dtype)
        w = _weights(weight, out.shape[0], truth)
        if w is not None:
            truth = truth * w[:, None]
        pred = (out.argmax(dim=1)[:, None] == classes).to(dtype)  # [B, C]
        self._add((truth.T @ pred).reshape(-1))  # [C, C] -> [C*C]

    def confusion_matrix(self) -> torch.Tensor | None:
        """The ``[C, C]`` weighted confusion matrix (rows true, columns predicted), or None."""
        return None if self._state is None else self._state.view(self._size, self._size)

    def per_class_recall(self) -> torch.Tensor | None:
        """Recall per class ``[C]`` (NaN for a class absent from the targets), or None."""
        cm = self.confusion_matrix()
        if cm is None:
            return None
        support = cm.sum(dim=1)
        return torch.where(support > 0, cm.diagonal() / support, math.nan)

    def keys(self) -> list[str]:
        """The keys :meth:`compute` returns (recall keys only once C is known)."""
        keys = [r for r in self.report if r != "per_class_recall"]
        if "per_class_recall" in self.report and self._size is not None:
            keys += [f"recall_{n}" for n in self.class_names or range(self._size)]
        return keys

    def compute_tensors(self) -> dict[str, torch.Tensor]:
        """0-d device tensors; NaN where undefined (no data, or no class defined)."""
        cm = self.confusion_matrix()
        if cm is None:
            nan = torch.full((), math.nan, dtype=_stat_dtype(self._device), device=self._device)
            return {k: nan for k in self.keys()}
        tp = cm.diagonal()
        recall = self.per_class_recall()
        f1_den = cm.sum(dim=1) + cm.sum(dim=0)  # 2tp + fp + fn
        f1 = torch.where(f1_den > 0, 2 * tp / f1_den, math.nan)
        values = {"accuracy": tp.sum() / cm.sum(), "uar": recall.nanmean(),
                  "macro_f1": f1.nanmean()}
        out = {k: values[k] for k in self.report if k in values}
        if "per_class_recall" in self.report:
            out.update(zip(self.keys()[len(out):], recall.unbind()))
        return out


def _true_class(targets: torch.Tensor, out_shape: torch.Size) -> torch.Tensor:
    """``[B]`` true class indices from integer ``[B]`` or soft ``[B, C]`` targets."""
    shape = tuple(targets.shape)
    if shape == tuple(out_shape):
        if not targets.is_floating_point():
            raise TypeError(f"targets of shape [B, C] {shape} must be float class "
                            f"probabilities (soft targets), got dtype {targets.dtype}; "
                            "multi-label targets are not defined for the built-in "
                            "classification metrics")
        return targets.argmax(dim=1)
    if shape != (out_shape[0],):
        raise ValueError(f"targets must have shape [B] = ({out_shape[0]},) or [B, C] = "
                         f"{tuple(out_shape)} to match outputs {tuple(out_shape)}, got {shape}")
    if targets.is_floating_point() or targets.is_complex() or targets.dtype == torch.bool:
        raise TypeError(f"targets of shape [B] must be integer class indices, got dtype "
                        f"{targets.dtype}")
    return targets


# ---------------------------------------------------------------- regression
class RegressionStats(_SumStats):
    """Moment accumulator -> ``ccc`` (Lin 1989, mean over targets) and ``mae``.

    Args:
        num_targets: K; None takes it from the first update (1 for ``[B]`` inputs).
        target_names: optional names for per-target keys ``ccc_<name>``/``mae_<name>``. Those
            keys are reported when K > 1 or names are given; ``ccc``/``mae`` are the means over
            targets.
        report: which of ``"ccc", "mae"`` to report.
        device: where the zero statistics start (they follow the inputs' device on update).

    Statistics: ``stats()`` is ``[n, sum x (K), sum y (K), sum x^2 (K), sum y^2 (K),
    sum xy (K), sum |x - y| (K)]`` (x = prediction, y = target, each term weighted), 1 + 6K
    values. Raw moments in float64: exact enough unless the values' spread is ~1e-8 of their
    magnitude.
    """

    _size_name, _names_arg, _low, _allowed = "num_targets", "target_names", 1, _REGRESSION

    def __init__(self, num_targets: int | None = None, *,
                 target_names: Sequence[str] | None = None,
                 report: Sequence[str] = _REGRESSION, device: Any = None) -> None:
        self._setup(num_targets, target_names, report, device)

    num_targets = property(lambda self: self._size, doc="K (None until the first update).")

    def _numel(self, size: int) -> int:
        return 1 + 6 * size

    def _check_names(self) -> None:
        _names("target_names", self.target_names, self._size)

    def _prepare(self, outputs: Any, targets: Any) -> tuple[torch.Tensor, torch.Tensor, int]:
        """Check a batch's types and shapes and adopt K: ``(outputs, targets, K)``."""
        out = _outputs_tensor(outputs, self.report).detach()
        tgt = _check_tensor("targets", targets).detach()
        if tuple(out.shape) != tuple(tgt.shape) or out.dim() not in (1, 2):
            raise ValueError(f"outputs and targets must have the same shape, [B] or [B, K], got "
                             f"outputs {tuple(out.shape)} and targets {tuple(tgt.shape)}")
        k = 1 if out.dim() == 1 else out.shape[1]
        self._adopt_size(k, f"outputs of shape {tuple(out.shape)}", 1)
        return out, tgt, k

    def check(self, outputs: Any, targets: Any) -> None:
        """Check one batch's types and shapes as :meth:`update` does, without adding it."""
        self._prepare(outputs, targets)

    def update(self, outputs: torch.Tensor, targets: torch.Tensor,
               weight: torch.Tensor | None = None) -> None:
        """Add one batch. No host read.

        Args:
            outputs: predictions ``[B]`` or ``[B, K]``.
            targets: the same shape as ``outputs``.
            weight: optional ``[B]`` 0/1 mask (or non-negative weights); 0 excludes an item.

        Raises:
            TypeError: a non-tensor.
            ValueError: different shapes, not 1-D/2-D, or a K that differs from ``num_targets``.
        """
        out, tgt, k = self._prepare(outputs, targets)
        dtype = _stat_dtype(out.device)
        x = out.to(dtype).reshape(out.shape[0], k)  # [B, K]
        y = tgt.to(device=out.device, dtype=dtype).reshape(out.shape[0], k)
        w = _weights(weight, out.shape[0], x)
        w = torch.ones_like(x[:, :1]) if w is None else w[:, None]  # [B, 1]
        terms = torch.cat([x, y, x * x, y * y, x * y, (x - y).abs()], dim=1)  # [B, 6K]
        self._add(torch.cat([w.sum().reshape(1), (w * terms).sum(dim=0)]))

    def _moments(self) -> tuple[torch.Tensor, ...]:
        """``n`` and the six ``[K]`` sums from the flat statistics."""
        n, rest = self._state[0], self._state[1:].view(6, self._size)
        return (n, *rest.unbind(0))

    def keys(self) -> list[str]:
        """The keys :meth:`compute` returns (per-target keys only once K is known)."""
        keys = list(self.report)
        if self._size is not None and (self._size > 1 or self.target_names is not None):
            names = self.target_names or [str(i) for i in range(self._size)]
            keys += [f"{r}_{n}" for r in self.report for n in names]
        return keys

    def compute_tensors(self) -> dict[str, torch.Tensor]:
        """0-d device tensors; NaN with no data or (CCC) zero variance and equal means."""
        if self._state is None:
            nan = torch.full((), math.nan, dtype=_stat_dtype(self._device), device=self._device)
            return {k: nan for k in self.keys()}
        n, sx, sy, sxx, syy, sxy, sabs = self._moments()
        mx, my = sx / n, sy / n
        var_x, var_y = sxx / n - mx * mx, syy / n - my * my  # population (1/n) moments
        cov = sxy / n - mx * my
        per = {"ccc": 2 * cov / (var_x + var_y + (mx - my) ** 2), "mae": sabs / n}  # each [K]
        out = {r: per[r].mean() for r in self.report}
        for key, value in zip(self.keys()[len(out):],
                              [v for r in self.report for v in per[r].unbind()]):
            out[key] = value
        return out


# ---------------------------------------------------------------- user metrics
def batch_rows(x: Any) -> int:
    """Batch size of a tensor (or the first tensor in a tuple/list/dict), as the loop counts."""
    if isinstance(x, torch.Tensor):
        return int(x.shape[0]) if x.dim() else 1
    if isinstance(x, (tuple, list)) and x:
        return batch_rows(x[0])
    if isinstance(x, Mapping) and x:
        return batch_rows(next(iter(x.values())))
    return 1


def _select(outputs: Any, targets: Any, weight: Any) -> tuple[Any, Any, torch.Tensor]:
    """Drop rows whose weight is 0 (boolean indexing: ONE host sync for the new size)."""
    if not isinstance(outputs, torch.Tensor) or not isinstance(targets, torch.Tensor):
        raise TypeError("weight needs tensor outputs and targets, got "
                        f"{type(outputs).__name__} and {type(targets).__name__}")
    like = torch.empty(0, device=outputs.device, dtype=_stat_dtype(outputs.device))
    keep = _weights(weight, batch_rows(outputs), like) > 0
    return outputs[keep], targets[keep.to(targets.device)], keep.sum().to(like.dtype)


def _float(x: Any) -> Any:
    """Detach, and lift half-precision outputs to float32 (as the loop did for metrics)."""
    if isinstance(x, torch.Tensor):
        x = x.detach()
        return x.float() if x.is_floating_point() else x
    return x


class BatchMeanMetric(_SumStats):
    """A plain ``fn(outputs, targets) -> 0-d batch mean`` averaged over examples (legacy).

    The epoch value is ``sum_b fn(batch_b) * n_b / sum_b n_b``: exact for a per-example mean
    (accuracy, MSE), only **approximate** for metrics that are not (F1, UAR, CCC: use the
    built-ins, or a torchmetrics object). With ``weight``, the rows weighted 0 are dropped before
    ``fn`` is called: boolean indexing costs one host sync per such batch, so pass
    ``weight=None`` for batches without padding. ``stats()`` is ``[sum fn * n, sum n]``.
    """

    _size_name = "size"

    def __init__(self, fn: Callable[[Any, Any], torch.Tensor], name: str | None = None,
                 device: Any = None) -> None:
        if not callable(fn):
            raise TypeError(f"fn must be callable, got {type(fn).__name__}")
        self.fn = fn
        self.name = name if name is not None else getattr(fn, "__name__", "metric")
        super().__init__(1, device)

    def _numel(self, size: int) -> int:
        return 2

    def update(self, outputs: Any, targets: Any, weight: torch.Tensor | None = None) -> None:
        """Add ``fn(outputs, targets) * n`` and ``n`` (n = batch size, or rows kept)."""
        out, tgt = _float(outputs), _float(targets)
        device = out.device if isinstance(out, torch.Tensor) else self._device
        if weight is None:
            n = torch.full((), float(batch_rows(tgt)), device=device, dtype=_stat_dtype(device))
        else:
            out, tgt, n = _select(out, tgt, weight)
        value = self.fn(out, tgt)
        if not isinstance(value, torch.Tensor) or value.dim() != 0:
            shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
            raise ValueError(f"metric {self.name!r} must return a 0-d tensor (the batch mean), "
                             f"got {shape}")
        value = value.detach().to(device=n.device, dtype=n.dtype)
        self._add(torch.stack([torch.where(n > 0, value * n, 0.0), n]))  # 0 rows: no NaN

    def keys(self) -> list[str]:
        return [self.name]

    def compute_tensors(self) -> dict[str, torch.Tensor]:
        return {self.name: self._state[0] / self._state[1]}


def _is_torchmetric(obj: Any) -> bool:
    """Duck typing: an object with ``update``, ``compute`` and ``reset`` methods."""
    return all(callable(getattr(obj, m, None)) for m in ("update", "compute", "reset"))


class TorchmetricsAdapter:
    """A ``torchmetrics.Metric`` (or any object with update/compute/reset) run over the epoch.

    :meth:`reset` resets it (call once per epoch), :meth:`update` calls its ``update`` (never
    ``forward``, which would compute a batch value), and :meth:`compute_tensors` its ``compute``
    once. A tensor result of shape ``[m]`` gives keys ``<name>_0``..., a dict ``<name>_<key>``.

    Its state is not in :meth:`stats` (empty): under DDP torchmetrics all-gathers its own state
    inside ``compute``, so ``compute`` must then run on every rank. With ``weight``, rows weighted
    0 are dropped first (one host sync per such batch); torchmetrics' own input checks may sync.
    """

    def __init__(self, metric: Any, name: str | None = None) -> None:
        if not _is_torchmetric(metric):
            raise TypeError(f"metric must have update, compute and reset methods (a "
                            f"torchmetrics.Metric), got {type(metric).__name__}")
        self.metric = metric
        self.name = name if name is not None else type(metric).__name__
        self._batches = 0

    def reset(self) -> None:
        self.metric.reset()
        self._batches = 0

    def update(self, outputs: Any, targets: Any, weight: torch.Tensor | None = None) -> None:
        """Pass the batch (rows with weight 0 removed) to the metric's ``update``."""
        out, tgt = _float(outputs), _float(targets)
        dev = getattr(self.metric, "device", None)
        if isinstance(out, torch.Tensor) and isinstance(dev, torch.device) and dev != out.device:
            self.metric.to(out.device)
        if weight is not None:
            out, tgt, _ = _select(out, tgt, weight)
        self.metric.update(out, tgt)
        self._batches += 1

    def stats(self) -> torch.Tensor:
        return torch.zeros(0, dtype=torch.float64)

    def load_stats(self, flat: torch.Tensor) -> None:
        if _check_tensor("flat", flat).numel() != 0:
            raise ValueError(f"flat must be empty for {self.name!r}, got shape {tuple(flat.shape)}")

    def merge(self, other: TorchmetricsAdapter) -> None:
        """Merge ``other``'s state in (``torchmetrics.Metric.merge_state``)."""
        if not isinstance(other, TorchmetricsAdapter):
            raise TypeError(f"other must be a TorchmetricsAdapter, got {type(other).__name__}")
        self.metric.merge_state(other.metric)
        self._batches += other._batches

    def keys(self) -> list[str]:
        return [self.name]

    def compute_tensors(self) -> dict[str, torch.Tensor]:
        """The metric's ``compute()`` as flat 0-d tensors (NaN before any update)."""
        if self._batches == 0:
            return {self.name: torch.tensor(math.nan, dtype=torch.float64)}
        with warnings.catch_warnings():  # after load_state_dict its own update count is 0
            warnings.filterwarnings("ignore", message=r".*called before the ``update``")
            return _flatten(self.name, self.metric.compute())

    def compute(self) -> dict[str, float]:
        return _read(self.compute_tensors())

    def state_dict(self) -> dict[str, Any]:
        """Batch count and a copy of ``metric_state`` (torchmetrics) or ``state_dict()``."""
        if hasattr(self.metric, "metric_state"):
            state = {k: _clone(v) for k, v in self.metric.metric_state.items()}
        elif callable(getattr(self.metric, "state_dict", None)):
            state = self.metric.state_dict()
        else:
            state = None  # no way to save it: a restore starts this metric empty
        return {"batches": self._batches, "state": state}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.reset()
        if state["state"] is not None:
            if hasattr(self.metric, "metric_state"):
                for k, v in state["state"].items():
                    setattr(self.metric, k, _clone(v))
            else:
                self.metric.load_state_dict(state["state"])
            self._batches = int(state["batches"])


def _clone(v: Any) -> Any:
    if isinstance(v, torch.Tensor):
        return v.detach().clone()
    if isinstance(v, list):
        return [_clone(x) for x in v]
    return v


def _flatten(name: str, value: Any) -> dict[str, torch.Tensor]:
    """A 0-d / 1-d tensor, number or dict of them -> ``{name[_i|_key]: 0-d tensor}``."""
    if isinstance(value, Mapping):
        return {k: v for key, sub in value.items()
                for k, v in _flatten(f"{name}_{key}", sub).items()}
    if not isinstance(value, torch.Tensor):
        value = torch.tensor(float(value))
    if value.dim() == 0:
        return {name: value}
    if value.dim() == 1:
        return {f"{name}_{i}": v for i, v in enumerate(value.unbind())}
    raise ValueError(f"metric {name!r} returned shape {tuple(value.shape)}; a scalar, a [m] "
                     "tensor or a dict of them is allowed")


# ---------------------------------------------------------------- the set the loop drives
Member = ClassificationStats | RegressionStats | BatchMeanMetric | TorchmetricsAdapter


class EpochMetrics:
    """The metrics of one evaluation pass, driven as one object (empty = a no-op).

    Per epoch: :meth:`reset`; :meth:`update` per batch; under DDP ``v = stats()``, SUM
    all-reduce ``v``, :meth:`load_stats` ``(v)``; then :meth:`compute` (one host read) or
    :meth:`compute_tensors` (to add to a read the caller already does).
    """

    def __init__(self, members: Sequence[Member] = ()) -> None:
        self.members = list(members)

    def __len__(self) -> int:
        return len(self.members)

    def reset(self) -> None:
        """Start a new epoch: every member's statistics and torchmetrics state are cleared."""
        for m in self.members:
            m.reset()

    def update(self, outputs: Any, targets: Any, weight: torch.Tensor | None = None) -> None:
        """Add one batch to every member (``weight`` ``[B]``: 0 excludes an item)."""
        for m in self.members:
            m.update(outputs, targets, weight)

    def check(self, outputs: Any, targets: Any) -> None:
        """Check one batch against the built-ins (types, shapes, soft targets' values) without
        adding it; the sizes (C, K) are taken from it. One host read: for a first batch (the
        engine checks the first training batch), not per step. Callables and torchmetrics
        objects are not checked (they may take any output)."""
        for m in self.members:
            if isinstance(m, (ClassificationStats, RegressionStats)):
                m.check(outputs, targets)

    def keys(self) -> list[str]:
        """The keys :meth:`compute` will report, as far as they are known before any batch."""
        return [k for m in self.members for k in m.keys()]

    def may_report(self, key: str) -> bool:
        """Whether :meth:`compute` reports ``key`` or may once sizes are known: per-class
        ``recall_<class>`` before C is known, ``<name>_<i>``/``<name>_<key>`` for a torchmetrics
        object (whose result may be a vector or a dict)."""
        if key in self.keys():
            return True
        for m in self.members:
            if isinstance(m, ClassificationStats) and "per_class_recall" in m.report and (
                    m.num_classes is None and key.startswith("recall_")):
                return True
            if isinstance(m, TorchmetricsAdapter) and key.startswith(f"{m.name}_"):
                return True
        return False

    def stats(self) -> torch.Tensor:
        """All members' statistics concatenated into one flat tensor (float64; SUM-reducible).

        Its length is fixed once the sizes are known (give ``num_classes`` under DDP).
        """
        parts = [s for s in (m.stats() for m in self.members) if s.numel()]
        return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.float64)

    def load_stats(self, flat: torch.Tensor) -> None:
        """Split ``flat`` (the all-reduced :meth:`stats`) back into the members."""
        sizes = [m.stats().numel() for m in self.members]
        if tuple(_check_tensor("flat", flat).shape) != (sum(sizes),):
            raise ValueError(f"flat must have the shape of stats(), ({sum(sizes)},), got "
                             f"{tuple(flat.shape)}")
        for m, part in zip(self.members, flat.split(sizes)):
            m.load_stats(part)

    def merge(self, other: EpochMetrics) -> None:
        """Add ``other``'s statistics (another rank's, say) member by member."""
        if not isinstance(other, EpochMetrics) or len(other) != len(self):
            raise ValueError(f"other must be an EpochMetrics with {len(self)} members, got "
                             f"{other!r}")
        for m, o in zip(self.members, other.members):
            m.merge(o)

    def compute_tensors(self) -> dict[str, torch.Tensor]:
        """``{key: 0-d device tensor}`` over all members; no host read for the built-ins."""
        out: dict[str, torch.Tensor] = {}
        for m in self.members:
            for k, v in m.compute_tensors().items():
                if k in out:
                    raise ValueError(f"metrics: two metrics report the key {k!r}; rename one")
                out[k] = v
        return out

    def compute(self) -> dict[str, float]:
        """``{key: float}`` read in one host transfer (NaN where undefined)."""
        return _read(self.compute_tensors())

    def state_dict(self) -> dict[str, Any]:
        """``{"members": [{"kind", "state"}...]}``: plain types and tensors."""
        return {"members": [{"kind": type(m).__name__, "state": m.state_dict()}
                            for m in self.members]}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore into an object built from the same metrics spec (e.g. a fresh one)."""
        kinds = [s["kind"] for s in state["members"]]
        mine = [type(m).__name__ for m in self.members]
        if kinds != mine:
            raise ValueError(f"state_dict holds metrics {kinds}, this object has {mine}")
        for m, s in zip(self.members, state["members"]):
            m.load_state_dict(s["state"])


def _member(name: str | None, obj: Any, device: Any) -> Member:
    """A pre-built accumulator, a torchmetrics-like object or a callable -> a member."""
    if isinstance(obj, (ClassificationStats, RegressionStats, BatchMeanMetric,
                        TorchmetricsAdapter)):
        return obj
    if _is_torchmetric(obj):
        return TorchmetricsAdapter(obj, name)
    if callable(obj):
        return BatchMeanMetric(obj, name, device=device)
    raise TypeError(f"metrics: {name or obj!r} must be a built-in name "
                    f"({', '.join(BUILTIN_METRICS)}), a torchmetrics.Metric or a callable, got "
                    f"{type(obj).__name__}")


def _items(metrics: Any) -> list[tuple[str | None, Any]]:
    """Normalise the accepted spellings to ``[(name or None, spec)]``."""
    if isinstance(metrics, (str, _SumStats, TorchmetricsAdapter)) or callable(metrics) \
            or _is_torchmetric(metrics):
        return [(None, metrics)]
    if isinstance(metrics, Mapping):
        for k, v in metrics.items():
            if isinstance(v, str):
                raise TypeError(f"metrics[{k!r}] is the str {v!r}: give built-ins by name in a "
                                "list (e.g. ['uar']); a dict maps names to callables or "
                                "torchmetrics objects")
        return [(str(k), v) for k, v in metrics.items()]
    if isinstance(metrics, (list, tuple)):
        for m in metrics:
            if not isinstance(m, str) and not callable(m) and not _is_torchmetric(m):
                raise TypeError(f"metrics: each item must be a built-in name "
                                f"({', '.join(BUILTIN_METRICS)}), a torchmetrics.Metric or a "
                                f"callable, got {m!r} of type {type(m).__name__}")
        return [(None, m) for m in metrics]
    raise TypeError(f"metrics must be None, a name, a callable, a torchmetrics.Metric, a list of "
                    f"them or a {{name: metric}} dict, got {type(metrics).__name__}")


def resolve_metrics(metrics: Any, *, num_classes: int | None = None,
                    class_names: Sequence[str] | None = None,
                    num_targets: int | None = None,
                    target_names: Sequence[str] | None = None,
                    device: Any = None) -> EpochMetrics:
    """Build the :class:`EpochMetrics` for a metrics spec.

    Args:
        metrics: None (no metrics: a no-op object); a built-in name (:data:`BUILTIN_METRICS`);
            a ``torchmetrics.Metric`` (anything with update/compute/reset); a callable
            ``(outputs, targets) -> 0-d batch mean`` (legacy, see :class:`BatchMeanMetric`); a
            pre-built :class:`ClassificationStats`/:class:`RegressionStats`; a list of these;
            or a ``{name: metric or callable}`` dict. An :class:`EpochMetrics` is returned as is.
        num_classes, class_names: for the classification built-ins (one shared confusion
            matrix); ignored when none is named. Under DDP give ``num_classes`` (or
            ``num_targets``) so every rank's ``stats()`` has the same length even before its
            first batch.
        num_targets, target_names: for the regression built-ins (one shared moment
            accumulator); ignored when none is named.
        device: where zero statistics start before the first update.

    Raises:
        ValueError: an unknown or repeated name, or classification and regression built-ins
            together (one model output cannot be both).
        TypeError: an object of another kind.
    """
    if isinstance(metrics, EpochMetrics):
        return metrics
    if metrics is None:
        return EpochMetrics()
    builtins: list[str] = []
    members: list[Member] = []
    for name, obj in _items(metrics):
        if isinstance(obj, str):
            if obj not in BUILTIN_METRICS:
                raise ValueError(f"metrics: unknown metric {obj!r}; built-in metrics: "
                                 + ", ".join(BUILTIN_METRICS))
            if obj in builtins:
                raise ValueError(f"metrics: {obj!r} is given twice")
            builtins.append(obj)
        else:
            members.append(_member(name, obj, device))
    cls = [b for b in builtins if b in _CLASSIFICATION]
    reg = [b for b in builtins if b in _REGRESSION]
    if cls and reg:
        raise ValueError(f"metrics: classification metrics {cls} and regression metrics {reg} "
                         "cannot be computed on the same outputs; choose one kind")
    if cls:
        members.insert(0, ClassificationStats(num_classes, class_names=class_names, report=cls,
                                              device=device))
    if reg:
        members.insert(0, RegressionStats(num_targets, target_names=target_names, report=reg,
                                          device=device))
    _check_unique_names(members)
    return EpochMetrics(members)


def _check_unique_names(members: Sequence[Member]) -> None:
    seen: set[str] = set()
    for m in members:
        for k in m.keys():
            if k in seen:
                raise ValueError(f"metrics: two metrics report the key {k!r}; give them "
                                 "distinct names with a {name: metric} dict")
            seen.add(k)


def nest_per_class(result: Mapping[str, float], prefix: str = "recall_",
                   key: str = "per_class_recall") -> dict[str, Any]:
    """Group the flat ``recall_<class>`` keys under ``per_class_recall`` (for summary.json).

    >>> nest_per_class({"uar": 0.75, "recall_0": 1.0, "recall_1": 0.5})
    {'uar': 0.75, 'per_class_recall': {'0': 1.0, '1': 0.5}}
    """
    out: dict[str, Any] = {}
    for k, v in result.items():
        if k.startswith(prefix):
            out.setdefault(key, {})[k[len(prefix):]] = v
        else:
            out[k] = v
    return out
