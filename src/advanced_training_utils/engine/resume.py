"""Checks a checkpoint against the run that resumes from it, before anything is loaded.

* :func:`check_options`: the saved options against the new ones, by the rules of
  :data:`~advanced_training_utils.engine.config.RESUME_RULES` (a changed option either applies,
  with a warning naming old and new values, or is refused with a ``ValueError``);
* :func:`check_optimizer`: the saved optimizer against the new one, by type, param-group keys and
  hyperparameters (an AdamW state loaded into SGD would fail later with ``KeyError: 'momentum'``;
  an Adam state loaded into AdamW would silently train as Adam).

Example:
    >>> spec = optimizer_spec(torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1))
    >>> spec["class"], spec["groups"][0]["lr"]
    ('SGD', 0.1)
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from .config import APPLIES, FIXED, RENAMED, RESUME_RULES, TrainConfig

__all__ = ["check_options", "check_optimizer", "optimizer_spec"]

log = logging.getLogger(__name__)

# Options whose plain form (a repr) cannot be compared; check_optimizer compares the optimizer.
_COMPARED_ELSEWHERE = frozenset({"optimizer"})
# Param-group entries that say how the step is computed, not what it computes.
_IMPLEMENTATION = frozenset({"params", "foreach", "fused", "capturable", "differentiable"})
# Param-group entries that torch schedulers add to the groups they drive.
_SCHEDULER_ADDED = frozenset({"initial_lr", "max_lr", "min_lr", "base_momentum",
                              "max_momentum"})


def check_options(saved: Mapping[str, Any] | None, cfg: TrainConfig, path: Path | str) -> None:
    """Compare the options saved in checkpoint ``path`` with ``cfg``.

    Options absent from ``saved`` (a checkpoint older than the option) are not compared; an
    option saved under an old name (:data:`~.config.RENAMED`) is compared under its new one.

    Raises:
        ValueError: one or more ``FIXED`` options changed; the message lists each with its
            saved and new value and why it cannot change.
    """
    if not saved:
        return
    saved = {RENAMED.get(k, k): v for k, v in saved.items()}  # older checkpoints' names
    now = cfg.to_plain()
    refused, applied = [], []
    for name, (rule, why) in RESUME_RULES.items():
        if name in _COMPARED_ELSEWHERE or name not in saved or saved[name] == now[name]:
            continue
        if rule == FIXED:
            refused.append(f"{name}: {saved[name]!r} -> {now[name]!r} ({why})")
        elif rule == APPLIES:
            applied.append((name, saved[name], now[name], why))
    if refused:
        raise ValueError(
            f"resume from {path}: option(s) that cannot change on resume were changed: "
            + "; ".join(refused) + ". Pass the saved value(s), or resume=False to start a "
            "fresh run")
    for name, old, new, why in applied:
        log.warning("resume: option %s changed from %r to %r; the new value applies: %s",
                    name, old, new, why)


def _plain(v: Any) -> Any:
    if isinstance(v, torch.Tensor):
        return v.item() if v.numel() == 1 else v.tolist()
    if isinstance(v, (tuple, list)):
        return [_plain(x) for x in v]
    return v


def optimizer_spec(optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The optimizer as built: its class name and each param group's hyperparameters (plain
    types). Take it before a scheduler changes the groups (it is stored in checkpoints)."""
    return {"class": type(optimizer).__name__,
            "groups": [{k: _plain(v) for k, v in g.items() if k not in _IMPLEMENTATION}
                       for g in optimizer.param_groups]}


def check_optimizer(saved_spec: Mapping[str, Any] | None, saved_state: Mapping[str, Any],
                    optimizer: torch.optim.Optimizer, spec: Mapping[str, Any],
                    path: Path | str) -> None:
    """Refuse to load an optimizer state that does not fit ``optimizer``.

    Args:
        saved_spec: the :func:`optimizer_spec` stored in the checkpoint (None in checkpoints
            older than it: then only the param-group keys can be compared).
        saved_state: the checkpoint's ``optimizer.state_dict()``.
        optimizer: this run's optimizer (its groups may already hold scheduler entries).
        spec: this run's :func:`optimizer_spec`, taken before the scheduler was built.

    Raises:
        ValueError: a different optimizer type, a different number of param groups, or changed
            hyperparameters; the message names both and what to do.
    """
    new_cls = type(optimizer).__name__
    fix = "resume with the same optimizer and settings, or resume=False to start a fresh run"
    if saved_spec is not None and saved_spec["class"] != new_cls:
        raise ValueError(f"resume from {path}: the checkpoint was saved with optimizer "
                         f"{saved_spec['class']}, this run uses {new_cls}; their states are "
                         f"not interchangeable: {fix}")
    saved_groups = saved_state["param_groups"]
    if len(saved_groups) != len(optimizer.param_groups):
        raise ValueError(f"resume from {path}: the checkpoint's optimizer has "
                         f"{len(saved_groups)} param group(s), this run's {new_cls} has "
                         f"{len(optimizer.param_groups)}: {fix}")
    ignore = _IMPLEMENTATION | _SCHEDULER_ADDED
    for old, new in zip(saved_groups, optimizer.param_groups):
        old_keys, new_keys = set(old) - ignore, set(new) - ignore
        if old_keys != new_keys:
            raise ValueError(
                f"resume from {path}: the checkpoint's optimizer state has param-group options "
                f"{sorted(old_keys)}, this run's {new_cls} has {sorted(new_keys)}: it was saved "
                f"by a different optimizer type or version: {fix}")
    if saved_spec is None:
        return
    changed = [f"group {i} {k}: {old.get(k)!r} -> {new.get(k)!r}"
               for i, (old, new) in enumerate(zip(saved_spec["groups"], spec["groups"]))
               for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
    if changed:
        raise ValueError(f"resume from {path}: {new_cls} hyperparameter(s) changed: "
                         + "; ".join(changed) + f". They are restored from the checkpoint with "
                         f"the optimizer's state and cannot change on resume: {fix}")
