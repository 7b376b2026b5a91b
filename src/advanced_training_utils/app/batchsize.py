"""``batch_size: auto`` for ``advtrain train``: the micro-batch chosen by the batch-size finder.

``--set batch_size=auto`` (or ``batch_size: auto`` in a ``--config`` file), for ``--task`` and
``--data`` alike, runs :func:`~advanced_training_utils.engine.batchfind.find_batch_size` on the
task's model, data and loss with the run's options, before training:

* the **effective batch** is the task's default batch size (emotion 32, notes 64, ``--data``
  32) times ``accumulation_steps`` (default 1); the training loader gets the largest micro-batch
  that divides it and fits, and ``accumulation_steps`` becomes effective / micro;
* the **validation loader** gets the largest validation batch that fits (up to the validation
  set's size): validation's loss and metrics are example-weighted, so they do not depend on it;
* **memory**: on CUDA, the device's free memory; on any other device the task option
  ``memory_budget`` is required (``--set memory_budget=2GiB``: bytes, or a number with a unit
  B, KB, MB, GB, TB (powers of 1000) or KiB, MiB, GiB, TiB (powers of 1024)). Without it,
  ``batch_size=auto`` off CUDA is an error naming the option, before any data is built (no
  silent fallback to a fixed size). ``memory_budget`` on CUDA replaces the free memory.
  10 % headroom is kept below the budget;
* the **choice** (micro-batch, accumulation, budget, peaks) is recorded in every checkpoint
  (the option ``batch_size_choice``), and ``--resume`` reuses it without probing again;
* one process only: refused with ``--nproc-per-node`` > 1.

The ``memory_constrained`` preset does not turn it on: a preset holds ``train_model_advanced``
options, while the batch size belongs to the task's loaders, and off CUDA the finder needs a
budget that only the user can give. Use ``--preset memory_constrained --set batch_size=auto``.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

from torch.utils.data import DataLoader

from .._validate import check_int
from ..engine.batchfind import BatchSizeResult, find_batch_size, recorded_choice
from ..engine.prepare import resolve_device

__all__ = ["AUTO", "parse_bytes", "check_batch_options", "build_options", "apply_auto"]

log = logging.getLogger(__name__)

#: The ``batch_size`` value that asks for the finder.
AUTO = "auto"

#: The margin kept below the budget (see ``find_batch_size``'s ``headroom``).
HEADROOM = 0.1

_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_bytes(value: Any, name: str = "memory_budget") -> int:
    """Bytes from an int or a string such as ``'2GiB'``, ``'1.5 GB'``, ``'512MiB'``.

    Example:
        >>> parse_bytes("2GiB"), parse_bytes("1.5 GB"), parse_bytes(4096)
        (2147483648, 1500000000, 4096)

    Raises:
        TypeError, ValueError: naming ``name``, the value and the units allowed.
    """
    if isinstance(value, str):
        m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]*)?(?:[eE][0-9]+)?)\s*([A-Za-z]*)\s*", value)
        unit = m.group(2).lower() if m else ""
        if m is None or unit not in _UNITS:
            raise ValueError(f"{name} must be bytes or a number with a unit (B, KB, MB, GB, TB, "
                             f"KiB, MiB, GiB, TiB), e.g. 2GiB; got {value!r}")
        value = round(float(m.group(1)) * _UNITS[unit])
    return check_int(name, value, low=1)


def check_batch_options(task_opts: dict[str, Any], device: Any, processes: int) -> None:
    """Check ``batch_size`` / ``memory_budget`` of the task options before any work.

    Raises:
        ValueError, TypeError: a bad ``memory_budget``; ``batch_size='auto'`` off CUDA without
            ``memory_budget``, or with several processes.
    """
    if task_opts.get("memory_budget") is not None:
        parse_bytes(task_opts["memory_budget"])
    if task_opts.get("batch_size") != AUTO:
        return
    if processes > 1:
        raise ValueError("batch_size='auto' probes one process's memory: it cannot be used with "
                         f"--nproc-per-node {processes}; give batch_size a number")
    dev = resolve_device(device)
    if dev.type != "cuda" and task_opts.get("memory_budget") is None:
        raise ValueError(f"batch_size='auto' on device {str(dev)!r} needs memory_budget (torch "
                         "keeps no allocator statistic off CUDA): e.g. --set memory_budget=2GiB")


def build_options(task_opts: dict[str, Any], default_batch: int) -> dict[str, Any]:
    """The task options to build the task with: ``batch_size='auto'`` becomes the task's
    default batch size (the loaders are rebatched by :func:`apply_auto`)."""
    if task_opts.get("batch_size") != AUTO:
        return task_opts
    return {**task_opts, "batch_size": default_batch}


def _rebatch(loader: DataLoader, batch_size: int) -> DataLoader:
    """``loader`` with another batch size: the same dataset, sampler (its generator as it is),
    collate function and workers."""
    return DataLoader(loader.dataset, batch_size=batch_size, sampler=loader.sampler,
                      collate_fn=loader.collate_fn, num_workers=loader.num_workers,
                      pin_memory=loader.pin_memory, drop_last=loader.drop_last,
                      timeout=loader.timeout, worker_init_fn=loader.worker_init_fn,
                      generator=loader.generator, persistent_workers=loader.persistent_workers)


def _choose(task: Any, options: dict[str, Any], task_opts: dict[str, Any], target: int,
            checkpoint_dir: Path, model_name: str, resume: bool) -> BatchSizeResult:
    """The recorded choice on ``--resume`` (when the checkpoint has one), else a new probe."""
    if resume:
        found = recorded_choice(checkpoint_dir, model_name, options.get("keep_last", 2))
        if found is not None:
            if found.target_batch_size != target:
                raise ValueError(f"batch_size='auto': the run in {checkpoint_dir} kept an "
                                 f"effective batch of {found.target_batch_size}, this one asks "
                                 f"for {target} (accumulation_steps changed?)")
            log.info("batch_size=auto: the recorded choice (micro-batch %d x %d), no probe",
                     found.micro_batch_size, found.accumulation_steps)
            return found
    budget = task_opts.get("memory_budget")
    train_opts = {k: v for k, v in options.items() if k not in ("device", "accumulation_steps")}
    return find_batch_size(
        task.model, task.train_loader.dataset, task.criterion, target_batch_size=target,
        val_dataset=task.val_loader.dataset, device=options.get("device", "auto"),
        memory_budget=None if budget is None else parse_bytes(budget), headroom=HEADROOM,
        collate_fn=task.train_loader.collate_fn, val_collate_fn=task.val_loader.collate_fn,
        **train_opts)


def apply_auto(task: Any, options: dict[str, Any], task_opts: dict[str, Any],
               default_batch: int, checkpoint_dir: Path, model_name: str, resume: bool
               ) -> dict[str, Any]:
    """With ``batch_size='auto'``: choose (or reuse) the micro-batch, rebatch the task's
    training and validation loaders in place, and return the training options with
    ``accumulation_steps`` and ``batch_size_choice`` set. Otherwise ``options`` unchanged."""
    if task_opts.get("batch_size") != AUTO:
        return options
    target = default_batch * int(options.get("accumulation_steps", 1))
    choice = _choose(task, options, task_opts, target, checkpoint_dir, model_name, resume)
    task.train_loader = _rebatch(task.train_loader, choice.micro_batch_size)
    task.val_loader = _rebatch(task.val_loader, choice.val_batch_size)
    return {**options, "accumulation_steps": choice.accumulation_steps,
            "batch_size_choice": choice.record()}
