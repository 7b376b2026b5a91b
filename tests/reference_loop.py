"""A plain training loop that states what ``train_model_advanced`` must compute.

Written from the documented behaviour, not from the package (it imports nothing from it), in the
style of nanoGPT's ``train.py``: the learning rate is a pure function of the step, computed here
by closed-form formulas, and every optimizer step is one visible block. The differential test
(``test_differential.py``) compares the package's final weights with this loop's.

The intended semantics, one line each:

* data: epoch ``e`` trains on ``batches(e)``, in order (the caller yields what the user's loader
  yields, or for two processes the global batch: both ranks' micro-batches together);
* accumulation: ``accumulation`` consecutive micro-batches form a window (the epoch's last window
  may be short, and is still stepped); a window's gradient is that of the mean loss over all its
  samples, i.e. of one big batch of the window's samples (sample-weighted);
* clipping: ``clip_grad_norm_`` of the window's gradient (None: no clipping);
* warmup ``W``: the LR of interval ``t < W`` is ``peak * (t + 1) / (W + 1)`` (the package's rule:
  start factor ``1 / (W + 1)``, the schedule's start LR at interval ``W``), and the post-warmup
  schedule fits in the remaining intervals: cosine runs over ``T_max - W`` epochs and reaches
  ``min_lr`` at the end; step/exp count their decays from the end of warmup; plateau ignores the
  monitored loss during warmup. Epoch types count epochs, onecycle counts optimizer steps;
* onecycle (torch's ``OneCycleLR`` shape: cosine anneal, ``div_factor`` 25, ``final_div_factor``
  1e4, momentum or beta1 cycled between 0.95 and 0.85) does not warm up twice: with ``W > 0``
  its own rise phase is the warmup: ``max_lr`` is reached at step ``W`` (as every warmup reaches
  the schedule's start LR at interval ``W``), then the anneal runs to step ``total - 1``;
* plateau: ``ReduceLROnPlateau``'s rule (mode min, relative threshold 1e-4, no cooldown) on the
  validation loss, or on the epoch's training loss without a validation set.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator

import torch

Batch = tuple[torch.Tensor, torch.Tensor]
MOMENTUM_MAX, MOMENTUM_BASE, DIV, FINAL_DIV = 0.95, 0.85, 25.0, 1e4


def epoch_lr(kind: str, epoch: int, lr: float, epochs: int, warmup: int = 0, gamma: float = 0.5,
             step_size: int = 1, min_lr: float = 0.0) -> float:
    """LR of epoch ``epoch`` (0-based) for 'none', 'plateau' (before reductions), 'cosine',
    'step' and 'exp'."""
    if epoch < warmup:
        return lr * (epoch + 1) / (warmup + 1)
    u = epoch - warmup                    # epochs since the end of warmup
    if kind == "cosine":
        return min_lr + (lr - min_lr) * (1 + math.cos(math.pi * u / (epochs - warmup))) / 2
    if kind == "step":
        return lr * gamma ** (u // step_size)
    if kind == "exp":
        return lr * gamma ** u
    return lr


def _cos(start: float, end: float, pct: float) -> float:
    return end + (start - end) / 2 * (math.cos(math.pi * pct) + 1)


def onecycle(t: int, total: int, max_lr: float, pct_start: float = 0.3, warmup: int = 0
             ) -> tuple[float, float]:
    """(LR, momentum) of optimizer step ``t`` (0-based) of ``total``."""
    rise_end = warmup if warmup else pct_start * total - 1      # the step at max_lr
    if t <= rise_end:
        pct = t / rise_end
        return _cos(max_lr / DIV, max_lr, pct), _cos(MOMENTUM_MAX, MOMENTUM_BASE, pct)
    pct = (t - rise_end) / (total - 1 - rise_end)
    return _cos(max_lr, max_lr / DIV / FINAL_DIV, pct), _cos(MOMENTUM_BASE, MOMENTUM_MAX, pct)


class Plateau:
    """``ReduceLROnPlateau``'s rule by hand: after more than ``patience`` epochs without a
    relative improvement of ``threshold``, multiply the LR by ``factor``."""

    def __init__(self, patience: int, factor: float, threshold: float = 1e-4) -> None:
        self.patience, self.factor, self.threshold = patience, factor, threshold
        self.best, self.bad = math.inf, 0

    def step(self, metric: float, lr: float) -> float:
        if metric < self.best * (1 - self.threshold):
            self.best, self.bad = metric, 0
        else:
            self.bad += 1
        if self.bad > self.patience:
            self.bad = 0
            return lr * self.factor if lr - lr * self.factor > 1e-8 else lr
        return lr


def windows(batches: Iterable[Batch], size: int) -> Iterator[list[Batch]]:
    """Consecutive groups of ``size`` batches; the last group may be short."""
    window: list[Batch] = []
    for batch in batches:
        window.append(batch)
        if len(window) == size:
            yield window
            window = []
    if window:
        yield window


def set_lr(optimizer: torch.optim.Optimizer, lr: float, momentum: float | None = None) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
        if momentum is not None and "betas" in group:
            group["betas"] = (momentum, group["betas"][1])
        elif momentum is not None:
            group["momentum"] = momentum


def train_reference(model: torch.nn.Module, batches: Callable[[int], Iterable[Batch]],
                    criterion: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                    optimizer: torch.optim.Optimizer, *, epochs: int, lr: float,
                    accumulation: int = 1, clip: float | None = None, kind: str = "none",
                    warmup: int = 0, steps_per_epoch: int = 0, val: Callable[[], Iterable[Batch]]
                    | None = None, patience: int = 0, factor: float = 0.5, **schedule: float
                    ) -> None:
    """Train ``model`` in place. ``schedule`` holds gamma, step_size, min_lr or pct_start."""
    plateau, plateau_lr, step = Plateau(patience, factor), lr, 0
    for epoch in range(epochs):
        model.train()
        loss_sum, seen = 0.0, 0
        for window in windows(batches(epoch), accumulation):
            x = torch.cat([b[0] for b in window])        # (samples in the window, features)
            y = torch.cat([b[1] for b in window])
            if kind == "onecycle":
                set_lr(optimizer, *onecycle(step, epochs * steps_per_epoch, lr, warmup=warmup,
                                            **schedule))
            elif kind == "plateau" and epoch > warmup:
                set_lr(optimizer, plateau_lr)
            else:
                set_lr(optimizer, epoch_lr(kind, epoch, lr, epochs, warmup, **schedule))
            optimizer.zero_grad(set_to_none=True)
            loss = criterion(model(x), y)
            loss.backward()
            if clip is not None:
                torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
            optimizer.step()
            step += 1
            loss_sum, seen = loss_sum + loss.item() * len(y), seen + len(y)
        monitored = loss_sum / seen
        if val is not None:
            model.eval()
            with torch.no_grad():
                pairs = [(criterion(model(x), y).item(), len(y)) for x, y in val()]
            monitored = sum(v * n for v, n in pairs) / sum(n for _, n in pairs)
        if kind == "plateau" and epoch >= warmup:
            plateau_lr = plateau.step(monitored, plateau_lr)
