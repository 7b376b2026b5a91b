"""Augmentation that sees the labels: mixup, time-segment cutmix and label smoothing.

:class:`BatchMixing` is a batch function ``(inputs, targets) -> (inputs, targets)``:

* **mixup** (Zhang et al., 2018, "mixup: Beyond Empirical Risk Minimization"), ``mixup_alpha``:
  each example is mixed with the example a random permutation of the batch pairs it with,
  ``x = lam * x + (1 - lam) * x[perm]``, one ``lam ~ Beta(alpha, alpha)`` per batch;
* **time-segment cutmix** for spectrograms (CutMix, Yun et al., 2019, cut along time only),
  ``cutmix_alpha``: a contiguous segment of the last axis (time, ``[B, F, T]`` or
  ``[B, C, F, T]``) of length ``round((1 - lam) * T)`` is taken from the paired example, and
  ``lam`` becomes the kept fraction ``1 - length / T``;
* **label smoothing**, ``label_smoothing`` (``eps``): class targets become ``(1 - eps) * onehot +
  eps / C``, as ``torch.nn.CrossEntropyLoss(label_smoothing=eps)`` computes internally.

Targets come out as the same mix: class indices ``[B]`` (integer dtype) become probabilities
``[B, C]``, ``lam * s(y) + (1 - lam) * s(y[perm])`` with ``s`` the (smoothed) one-hot, so the
criterion must accept class probabilities (``torch.nn.CrossEntropyLoss`` does; ``NLLLoss`` does
not). Float targets (regression embeddings, multi-label note probabilities) are mixed linearly,
``lam * y + (1 - lam) * y[perm]``; label smoothing is for class indices only. The number of
classes ``C`` is ``num_classes`` (the training engine sets it from the model's output ``[B, C]``
on the first batch). With both alphas set, each batch uses one of the two, chosen with equal
probability.

Random draws (repeatable, resumable): every draw comes from one host-side
``numpy.random.Generator`` (PCG64) seeded with ``seed`` (None: a seed is drawn once from
torch's global CPU RNG when the object is made, so ``torch.manual_seed`` makes runs
repeatable), and its state is :meth:`state_dict`. Per mixed batch of ``B`` examples, in this order:

1. with both alphas set: ``rng.random() < 0.5`` picks cutmix, else mixup;
2. ``lam = rng.beta(alpha, alpha)``;
3. ``perm = rng.permutation(B)``;
4. cutmix only: ``start = rng.integers(0, T - length + 1)``.

Drawing on the host keeps the step free of device-to-host reads: the permutation is copied to
the device without blocking, ``lam`` and the segment are Python numbers. With only label
smoothing, nothing is drawn.

In ``train_model_advanced`` (options ``mixup_alpha``, ``cutmix_alpha``, ``label_smoothing``;
each one switches the mixing on, with or without ``use_augmentation``):

* the training batches' hook is one batch function ``(inputs, targets) -> (inputs, targets)``:
  the augmentation (``augment=``), then this mixing; with both off it is
  ``engine.parts.identity`` (no copy, no kernel: the step costs what it did). Validation
  batches are never augmented or mixed: the validation loss and every validation metric are
  computed on the true labels.
* the one rule for a callable ``augment``: it gets the inputs alone and returns new inputs (the
  guide's ``augment=lambda x: ...``), unless ``augment_targets=True`` says it takes and returns
  ``(inputs, targets)``. The signature is never inspected, since a guess (a second parameter
  with a default, ``*args``) could silently change what the callable receives.
* ``C`` is the model output's second dimension on the first training batch (the first-batch
  check runs the model once in eval mode); the probabilities take the output's dtype. The same
  check refuses, before any step and naming the options, a ``torch.nn.NLLLoss`` (class indices
  only), an output that is not ``[B, C]``, labels outside ``[0, C)``, and any ``torch.nn.Module``
  criterion that raises on the probability targets (it is called once on the first batch; a
  plain-function criterion is not called ahead, since it may count or log its calls).
* the generator's state is the checkpoint's ``mixing`` entry, so a resumed run (mid-epoch too)
  draws what the uninterrupted run draws. Under DDP every rank draws the same ``lam`` and
  permutation for its own shard.
* with ``class_weights='balanced'``, torch's ``CrossEntropyLoss`` with probability targets
  averages the weighted loss over the batch's examples, not over the sum of the targets' class
  weights as it does for class indices: the two losses are scaled differently.

Example:
    >>> mix = BatchMixing(mixup_alpha=0.4, num_classes=3, seed=0)
    >>> x, y = torch.randn(4, 8), torch.tensor([0, 1, 2, 1])
    >>> xm, t = mix(x, y)
    >>> xm.shape, t.shape, torch.allclose(t.sum(1), torch.ones(4))
    (torch.Size([4, 8]), torch.Size([4, 3]), True)
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from ._validate import check_int, check_real

__all__ = ["BatchMixing"]


def _alpha(name: str, value: float | None) -> float | None:
    if value is None:
        return None
    return check_real(name, value, low=0.0, low_inclusive=False)


class BatchMixing:
    """Mixup, time-segment cutmix and label smoothing of a training batch (see the module).

    Args:
        mixup_alpha: Beta(alpha, alpha) of mixup's ``lam`` (> 0; None: no mixup).
        cutmix_alpha: Beta(alpha, alpha) of the time-segment mix (> 0; None: none).
        label_smoothing: ``eps`` in [0, 1) for class-index targets.
        num_classes: ``C`` for class-index targets (None: set later, by :meth:`set_classes`).
        seed: seeds the draws (None: a seed drawn from torch's global CPU RNG, here).

    Raises:
        ValueError / TypeError: an argument out of range, named.
    """

    def __init__(self, mixup_alpha: float | None = None, cutmix_alpha: float | None = None,
                 label_smoothing: float = 0.0, num_classes: int | None = None,
                 seed: int | None = None) -> None:
        self.mixup_alpha = _alpha("mixup_alpha", mixup_alpha)
        self.cutmix_alpha = _alpha("cutmix_alpha", cutmix_alpha)
        self.label_smoothing = check_real("label_smoothing", label_smoothing, low=0.0, high=1.0,
                                          high_inclusive=False)
        if num_classes is not None:
            check_int("num_classes", num_classes, low=1)
        if seed is not None:
            check_int("seed", seed, low=0)
        self.num_classes = num_classes
        self.dtype = torch.get_default_dtype()  # of the probabilities made from class indices
        if seed is None:  # one draw from torch's global CPU RNG: repeatable under manual_seed
            seed = int(torch.randint(0, 2**62, (1,)).item())
        self._rng = np.random.default_rng(seed)

    @property
    def mixes(self) -> bool:
        """Whether pairs are mixed (an alpha is set); False: label smoothing only."""
        return self.mixup_alpha is not None or self.cutmix_alpha is not None

    def set_classes(self, num_classes: int, dtype: torch.dtype) -> None:
        """``C`` and the floating dtype of the probabilities made from class indices (the
        engine passes the model output's ``[B, C]`` and dtype)."""
        self.num_classes = check_int("num_classes", num_classes, low=1)
        self.dtype = dtype

    # ------------------------------------------------------------------ the batch function
    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mix the batch ``x`` ``[B, ...]`` and its targets ``y`` (``[B]`` class indices or
        float ``[B, ...]``); returns new tensors (the inputs are not written to).

        Returns:
            ``(inputs, targets)``: inputs of ``x``'s shape; targets ``[B, C]`` probabilities for
            class indices, ``y``'s shape for float targets.
        """
        t = self.soft_targets(y)
        if not self.mixes:
            return x, t
        if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.dim() < 2:
            got = (f"{x.dtype} {tuple(x.shape)}" if isinstance(x, torch.Tensor)
                   else type(x).__name__)
            raise TypeError(f"mixup_alpha/cutmix_alpha mix floating-point input tensors [B, ...] "
                            f"(2 or more dims), got {got}")
        rng = self._rng
        cut = self.cutmix_alpha is not None and (self.mixup_alpha is None or rng.random() < 0.5)
        alpha = self.cutmix_alpha if cut else self.mixup_alpha
        lam = float(rng.beta(alpha, alpha))
        b = x.shape[0]
        perm = torch.from_numpy(rng.permutation(b)).to(x.device, non_blocking=True)
        if cut:
            x, lam = self._cut(x, perm, lam, rng)
        else:
            x = x * lam + x[perm] * (1 - lam)
        return x, t * lam + t[perm] * (1 - lam)

    @staticmethod
    def _cut(x: torch.Tensor, perm: torch.Tensor, lam: float, rng: np.random.Generator
             ) -> tuple[torch.Tensor, float]:
        """The time segment ``[start, start + length)`` of the last axis from the paired
        examples; ``lam`` becomes the kept fraction."""
        steps = x.shape[-1]
        length = int(round((1 - lam) * steps))
        start = int(rng.integers(0, steps - length + 1))
        out = x.clone()
        out[..., start:start + length] = x[perm][..., start:start + length]
        return out, 1 - length / steps

    def soft_targets(self, y: torch.Tensor) -> torch.Tensor:
        """Class indices ``[B]`` -> (smoothed) one-hot probabilities ``[B, C]``; float targets
        as they are (label smoothing refused). Draws nothing."""
        if not isinstance(y, torch.Tensor):
            raise TypeError(f"mixing needs tensor targets, got {type(y).__name__}")
        if y.is_floating_point():
            if self.label_smoothing:
                raise ValueError(f"label_smoothing={self.label_smoothing} applies to class-index "
                                 f"targets (an integer tensor [B]); got float targets {y.dtype} "
                                 f"{tuple(y.shape)}: use label_smoothing=0.0")
            return y
        if y.dim() != 1:
            raise ValueError(f"class-index targets for mixing or label smoothing must be [B], got "
                             f"shape {tuple(y.shape)}")
        if self.num_classes is None:
            raise ValueError("num_classes is not known: pass BatchMixing(num_classes=...) or "
                             "call set_classes() before mixing class-index targets")
        t = torch.zeros(y.shape[0], self.num_classes, dtype=self.dtype, device=y.device)
        t.scatter_(1, y.long()[:, None], 1.0)  # no range check (a host read): labels are checked
        eps = self.label_smoothing              # on the first batch by the engine
        return t * (1 - eps) + eps / self.num_classes if eps else t

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """The generator's state (plain ints and strings)."""
        return {"rng": self._rng.bit_generator.state}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`: the next draws are the saved run's."""
        rng = np.random.default_rng(0)
        rng.bit_generator.state = state["rng"]
        self._rng = rng
