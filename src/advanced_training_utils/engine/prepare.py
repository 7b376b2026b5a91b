"""Building and checking what a training run needs: device, optimizer, augmentation, inputs.

Used by :func:`advanced_training_utils.engine.run.train_model_advanced`; each helper raises a
``ValueError``/``TypeError`` naming the problem before any training step runs.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import itertools
import logging
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import torch

from .. import checkpoint as ck
from ..augmentation import DataAugmentation
from ..mixing import BatchMixing
from .config import TrainConfig
from .dataorder import find_generators
from .loop import split_batch, to_device

__all__ = ["check_device", "resolve_device", "infer_modality", "build_optimizer",
           "build_augment", "build_mixing", "check_mixing", "BatchFn", "FirstBatchCheck",
           "rng_untouched", "check_labels", "check_metric_outputs", "check_inputs",
           "loader_length"]

log = logging.getLogger(__name__)


def _mps_available() -> bool:
    mps = getattr(torch.backends, "mps", None)
    return bool(mps is not None and mps.is_available())


def _xla_available() -> bool:
    return importlib.util.find_spec("torch_xla") is not None


def check_device(device: str | torch.device) -> str:
    """Check that this torch build can train on ``device``; return its name.

    Allowed: ``'auto'``, ``'cpu'``, ``'cuda'`` and ``'cuda:N'`` (without CUDA they fall back to
    the CPU with a warning, see :func:`resolve_device`; with CUDA, ``N`` must name a present
    GPU), ``'mps'`` only where ``torch.backends.mps.is_available()``, ``'xla'`` only where
    ``torch_xla`` is installed. ``'meta'`` (no data) and every other string are refused.

    Raises:
        ValueError: naming the device, why it cannot be used and the allowed ones.
    """
    name = str(device)
    if name == "auto":
        return name
    names = ["'auto'", "'cpu'", "'cuda'", "'cuda:N'"] + ["'mps'"] * _mps_available() + [
        "'xla'"] * _xla_available()
    allowed = ", ".join(names[:-1]) + " or " + names[-1]
    try:
        dev = torch.device(name)
    except (RuntimeError, ValueError, TypeError):
        raise ValueError(f"device must be {allowed}; got {name!r}") from None
    if dev.type == "cuda" and dev.index is not None and torch.cuda.is_available():
        count = torch.cuda.device_count()
        if dev.index >= count:
            raise ValueError(f"device {name!r}: this machine has {count} CUDA device(s) "
                             f"(cuda:0..cuda:{count - 1})")
    if dev.type in ("cpu", "cuda") or (dev.type == "mps" and _mps_available()) or (
            dev.type == "xla" and _xla_available()):
        return name
    why = {"meta": "the meta device holds no data, so nothing can be trained on it",
           "mps": "MPS is not available in this torch build or on this machine",
           "xla": "torch_xla is not installed"}.get(dev.type, "not a device this package trains on")
    raise ValueError(f"device must be {allowed}; got {name!r} ({why})")


def resolve_device(device: str | torch.device) -> torch.device:
    """``'auto'`` -> cuda, mps or cpu; ``'cuda'`` without CUDA -> cpu with a warning.

    Every other name is checked by :func:`check_device` first (``ValueError`` if refused).
    """
    name = check_device(device)
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if _mps_available():
            return torch.device("mps")
        return torch.device("cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        msg = f"device={name!r} but CUDA is not available; training on the CPU instead"
        warnings.warn(msg, RuntimeWarning, stacklevel=3)
        log.warning(msg)
        return torch.device("cpu")
    return dev


def infer_modality(x: torch.Tensor) -> str:
    """The augmentation modality an input batch's *shape* suggests: a guess, never applied.

    Rule: 3 or more dims (``[B, F, T]``, ``[B, C, F, T]``) -> ``'audio'``; 2 dims with 128
    columns (``[B, 128]``, MIDI pitches) -> ``'notes'``; other 2-dim inputs -> ``'emotion'``.
    A shape cannot tell a note roll from a 128-dim embedding, or a mel from an image, and every
    augmentation changes values (``'notes'`` clamps to [0, 1] and drops 10% of the entries), so
    training never applies the guess: :func:`build_augment` only names it in its warning.
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"cannot infer an augmentation for inputs of type {type(x).__name__}; "
                        "pass augment='audio'|'emotion'|'notes' or a callable")
    if x.dim() >= 3:
        return "audio"
    if x.dim() == 2:
        return "notes" if x.shape[-1] == 128 else "emotion"
    raise ValueError(f"cannot infer an augmentation for inputs of shape {tuple(x.shape)}; "
                     "pass augment='audio'|'emotion'|'notes' or a callable")


def build_optimizer(cfg: TrainConfig, model: torch.nn.Module) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("model has no trainable parameters (requires_grad=True): nothing to train")
    opt = cfg.optimizer
    if opt is None:
        try:  # fused: fastest, and it can skip a bad step on the device (see health/guard.py)
            opt = torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay,
                                    fused=True)
        except (RuntimeError, TypeError, ValueError):
            opt = torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    elif not isinstance(opt, torch.optim.Optimizer):
        opt = opt(params)
        if not isinstance(opt, torch.optim.Optimizer):
            raise TypeError(f"optimizer factory must return a torch.optim.Optimizer, got "
                            f"{type(opt).__name__}")
    own = {id(p) for p in model.parameters()}
    foreign = [p for g in opt.param_groups for p in g["params"] if id(p) not in own]
    if foreign:
        raise ValueError(f"optimizer holds {len(foreign)} parameter(s) that are not the model's "
                         "(was it built before the model was replaced or copied?)")
    return opt


#: The training batches' hook: ``(inputs, targets) -> (inputs, targets)``.
BatchFn = Callable[[Any, Any], tuple[Any, Any]]


def build_augment(cfg: TrainConfig, seed: int | None
                  ) -> tuple[BatchFn | None, DataAugmentation | None]:
    """The training batches' augmentation: ``(batch function, augmenter with state)`` or Nones.

    Augmentation runs only when ``use_augmentation=True`` *and* ``augment`` names the modality
    (``'audio'``, ``'emotion'``, ``'notes'``) or is a callable. With ``augment=None`` nothing is
    applied, and :class:`FirstBatchCheck` logs a WARNING naming the modality the first batch's
    shape suggests: a guessed modality is never applied, because every augmentation changes
    values and the shape cannot tell what the data are (a ``[B, 128]`` regression input is not a
    note roll to clamp to [0, 1]).

    The batch function takes and returns ``(inputs, targets)``. The one rule for a callable
    ``augment``: it is called with the inputs alone and its result replaces the inputs (the
    guide's ``augment=lambda x: ...``), unless ``augment_targets=True`` declares that it takes
    and returns ``(inputs, targets)``. The signature is never inspected: a callable with an
    optional second parameter would otherwise change meaning silently.
    """
    if not cfg.use_augmentation or cfg.augment is None:
        return None, None
    if callable(cfg.augment):
        return (_pairs(cfg.augment) if cfg.augment_targets else _inputs_only(cfg.augment)), None
    aug = DataAugmentation(seed=seed)
    fn = {"audio": aug.augment_audio_features, "emotion": aug.augment_emotion_embedding,
          "notes": aug.augment_note_probabilities}[cfg.augment]
    opts = dict(cfg.augment_options)
    return (lambda x, y: (fn(x, **opts), y)), aug


def _inputs_only(fn: Callable[[Any], Any]) -> BatchFn:
    """A one-argument augmentation as a batch function: the targets pass through."""
    return lambda x, y: (fn(x), y)


def _pairs(fn: Callable[[Any, Any], Any]) -> BatchFn:
    """An ``augment_targets=True`` callable, its result checked to be ``(inputs, targets)``."""
    def augment(x: Any, y: Any) -> tuple[Any, Any]:
        out = fn(x, y)
        if not isinstance(out, (tuple, list)) or len(out) != 2:
            raise TypeError("augment_targets=True: augment must return (inputs, targets), got "
                            + type(out).__name__
                            + (f" of length {len(out)}" if isinstance(out, (tuple, list)) else ""))
        return out[0], out[1]
    return augment


def build_mixing(cfg: TrainConfig) -> BatchMixing | None:
    """:class:`~..mixing.BatchMixing` from ``mixup_alpha``, ``cutmix_alpha`` and
    ``label_smoothing`` (seeded with ``seed``), or None when all three are off. They apply
    whether or not ``use_augmentation`` is set, after the augmentation."""
    if cfg.mixup_alpha is None and cfg.cutmix_alpha is None and not cfg.label_smoothing:
        return None
    return BatchMixing(cfg.mixup_alpha, cfg.cutmix_alpha, cfg.label_smoothing, seed=cfg.seed)


def _warn_unset_augment(sample: Any) -> None:
    try:
        guess = f"; the input shape suggests augment={infer_modality(sample)!r}"
    except (TypeError, ValueError):
        guess = ""
    shape = tuple(sample.shape) if isinstance(sample, torch.Tensor) else type(sample).__name__
    log.warning("use_augmentation=True but augment is not set: training WITHOUT augmentation "
                "(inputs %s%s). A modality is never guessed, since each one changes values; "
                "pass augment='audio'|'emotion'|'notes' or a callable, or "
                "use_augmentation=False", shape, guess)


class FirstBatchCheck:
    """Checks made on the first training batch the run sees, as training reads it.

    The checks (class labels in range for the model's outputs; the outputs and targets the
    built-in metrics need; mixing's number of classes and a criterion that takes class
    probabilities; the augmentation warning) run on
    the batch the first epoch yields anyway, not on a separate peek: a peek would draw from the
    user's RNGs (a DataLoader's ``generator`` draws each iterator's base seed, an iterable may
    reshuffle), which shifts the data order of a run against the user's own loop.
    """

    def __init__(self, cfg: TrainConfig, criterion: Any, model: torch.nn.Module,
                 device: torch.device, metrics: Any = None,
                 mixing: BatchMixing | None = None) -> None:
        self._args = (criterion, model, device)
        self._metrics = metrics
        self._mixing = mixing
        self._warn_augment = bool(cfg.use_augmentation and cfg.augment is None)
        self._done = False

    def wrap(self, batches: Iterator[Any]) -> Iterator[Any]:
        """``batches`` itself, the first time with its first batch already read and checked
        (here, before the epoch's loop starts: the checks read labels on the host)."""
        if self._done:
            return batches
        self._done = True
        for batch in batches:
            x, y = split_batch(batch)
            criterion, model, device = self._args
            check_labels(criterion, model, x, y, device)
            output = functools.cache(functools.partial(_first_output, model, x, device))
            check_metric_outputs(self._metrics, output, y, device)
            check_mixing(self._mixing, criterion, output, y, device)
            if self._warn_augment:
                _warn_unset_augment(x)
            return itertools.chain([batch], batches)
        return batches


@contextlib.contextmanager
def rng_untouched(*loaders: Any) -> Iterator[None]:
    """On exit, every RNG is as it was on entry: the global ones (python, numpy, torch) and the
    ``torch.Generator`` objects ``loaders`` draw their order from (``DataLoader(generator=g)``,
    ``RandomSampler(generator=g)``...). Creating a DataLoader iterator draws its base seed from
    such a generator, so even ``iter(loader)`` would otherwise shift the user's seeded order."""
    gens = find_generators(*loaders)
    saved_global, saved = ck.capture_rng(), [g.get_state() for g in gens]
    try:
        yield
    finally:
        ck.restore_rng(saved_global)
        for g, state in zip(gens, saved):
            g.set_state(state)


def check_labels(criterion: Any, model: torch.nn.Module, x: Any, y: Any,
                  device: torch.device) -> None:
    """For class-index losses, check the first batch's labels against the model's outputs."""
    if not isinstance(criterion, (torch.nn.CrossEntropyLoss, torch.nn.NLLLoss)):
        return
    if not isinstance(y, torch.Tensor) or y.is_floating_point():
        return
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model(x[:1].to(device) if isinstance(x, torch.Tensor) else x)
    except Exception:
        return  # the training loop reports forward failures with their batch position
    finally:
        model.train(was_training)
    classes = out.shape[1] if out.dim() > 1 else out.shape[0]
    weight = getattr(criterion, "weight", None)
    if weight is not None and weight.numel() != classes:
        raise ValueError(f"the criterion's class weight has {weight.numel()} entries for a model "
                         f"with {classes} outputs (class_weights='balanced' counts the classes "
                         "0..the highest training label, or the dataset's classes)")
    ignore = getattr(criterion, "ignore_index", -100)
    valid = y[y != ignore]
    if valid.numel() and (int(valid.min()) < 0 or int(valid.max()) >= classes):
        raise ValueError(f"class labels must be in [0, {classes - 1}] for a model with "
                         f"{classes} outputs; the first batch holds labels "
                         f"{int(valid.min())}..{int(valid.max())}")


def check_metric_outputs(metrics: Any, output: Callable[[], Any], y: Any,
                         device: torch.device) -> None:
    """Check the model's outputs on the first batch (``output()``: :func:`_first_output`)
    against the built-in metrics (a tuple or dict output, a single logit, multi-label targets),
    so that a metric that cannot be computed fails before the first epoch, not after it; the
    metrics take their sizes from it."""
    if not metrics:
        return
    out = output()
    if out is not _FAILED:
        metrics.check(out, to_device(y, device))


_FAILED = object()  # the model's forward failed on the first batch


def _first_output(model: torch.nn.Module, x: Any, device: torch.device) -> Any:
    """The model's output on the first batch in eval mode without gradients (its train/eval
    mode restored), or ``_FAILED``: the training loop reports forward failures with their batch
    position."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            return model(to_device(x, device))
    except Exception:
        return _FAILED
    finally:
        model.train(was_training)


def _mixing_options(mixing: BatchMixing) -> str:
    """The options that turned mixing on, as the user wrote them."""
    opts = [f"mixup_alpha={mixing.mixup_alpha}" * (mixing.mixup_alpha is not None),
            f"cutmix_alpha={mixing.cutmix_alpha}" * (mixing.cutmix_alpha is not None),
            f"label_smoothing={mixing.label_smoothing}" * bool(mixing.label_smoothing)]
    return ", ".join(o for o in opts if o)


#: torch losses that take class indices only (never class probabilities).
_INDEX_ONLY = (torch.nn.NLLLoss, torch.nn.MultiMarginLoss, torch.nn.MultiLabelMarginLoss)


def check_mixing(mixing: BatchMixing | None, criterion: Any, output: Callable[[], Any], y: Any,
                 device: torch.device) -> None:
    """On the first batch (``output()``: the model's output on it, :func:`_first_output`): give
    ``mixing`` the number of classes (the model output's ``[B, C]``)
    and check that the criterion takes the probability targets ``[B, C]`` it will get.

    A ``torch.nn.Module`` criterion is called once on the first batch's outputs and probability
    targets; a plain function is not called ahead (it may count or log its calls).

    Raises:
        ValueError: naming the mixing options, for an output that is not ``[B, C]``, labels out
            of range, a criterion that refuses class probabilities, or ``label_smoothing``
            with a ``CrossEntropyLoss`` that smooths too.
    """
    if mixing is None or not isinstance(y, torch.Tensor):
        return
    opts = _mixing_options(mixing)
    own = getattr(criterion, "label_smoothing", 0.0)
    if mixing.label_smoothing and isinstance(criterion, torch.nn.CrossEntropyLoss) and own:
        raise ValueError(f"label_smoothing={mixing.label_smoothing} and CrossEntropyLoss("
                         f"label_smoothing={own}) would smooth the targets twice: set one of "
                         "the two")
    if y.is_floating_point():
        mixing.soft_targets(y)  # label smoothing of float targets is refused here
        return
    if isinstance(criterion, _INDEX_ONLY):
        raise ValueError(f"with {opts} the criterion gets class probabilities [B, C] as "
                         f"targets, but {type(criterion).__name__} takes class indices only: "
                         "use torch.nn.CrossEntropyLoss (on logits) or another criterion that "
                         "takes probabilities")
    out = output()
    if out is _FAILED:
        return
    if not isinstance(out, torch.Tensor) or out.dim() != 2:
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ValueError(f"with {opts} and class-index targets the model output must be "
                         f"[B, C] (C classes), got {got}")
    classes = out.shape[1]
    if y.numel() and (int(y.min()) < 0 or int(y.max()) >= classes):
        raise ValueError(f"with {opts} class labels must be in [0, {classes - 1}] for a model with "
                         f"{classes} outputs; the first batch holds {int(y.min())}..{int(y.max())}")
    mixing.set_classes(classes, out.dtype if out.is_floating_point() else mixing.dtype)
    if isinstance(criterion, torch.nn.Module):
        try:
            criterion(out, mixing.soft_targets(to_device(y, device)))
        except (RuntimeError, ValueError, TypeError, IndexError) as e:
            raise ValueError(f"with {opts} the criterion gets class probabilities [B, C] as "
                             f"targets, but {type(criterion).__name__} refused them: "
                             f"{str(e).splitlines()[0]} (use torch.nn.CrossEntropyLoss or "
                             "another criterion that takes probabilities)") from e


def loader_length(loader: Any) -> int | None:
    """``len(loader)``, or None when it has no length: a DataLoader over an ``IterableDataset``
    without ``__len__`` (whose ``len()`` raises ``TypeError``) or an iterable without one.
    Such loaders train: no progress-bar total, accumulation reads one batch ahead, and
    ``scheduler_type='onecycle'`` (which needs the steps per epoch) is refused."""
    try:
        return len(loader)
    except TypeError:
        return None


def check_inputs(model: Any, train_loader: Any, val_loader: Any, criterion: Any) -> None:
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if criterion is None or not callable(criterion):
        raise TypeError(f"criterion must be callable (outputs, targets) -> loss, got {criterion!r}")
    for name, loader in (("train_loader", train_loader), ("val_loader", val_loader)):
        if loader is None and name == "val_loader":
            continue
        if not hasattr(loader, "__iter__"):
            raise TypeError(f"{name} must be an iterable of batches, got {type(loader).__name__}")
    for name, loader in (("train_loader", train_loader), ("val_loader", val_loader)):
        if loader is None:
            continue
        with rng_untouched(loader):
            one_shot = iter(loader) is loader
        if one_shot:  # it would be empty from the second epoch on
            raise TypeError(f"{name} must be re-iterable once per epoch (a DataLoader, a list of "
                            "batches...), got a one-shot iterator/generator")
    if loader_length(train_loader) == 0:
        raise ValueError("train_loader is empty (len 0): nothing to train on")
    if val_loader is not None and loader_length(val_loader) == 0:
        raise ValueError("val_loader is empty (len 0); pass val_loader=None to follow the "
                         "training loss instead")
