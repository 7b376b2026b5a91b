"""``compile=True``: the model's forward through ``torch.compile``; the caller's module stays the
object that is trained, saved, rolled back and returned.

What is compiled: only the model's forward (under DDP, the DDP-wrapped model; for validation,
the unwrapped model). The loss, the backward, the bad-step guard, clipping, the scaler and the
optimizer step run eagerly, as without ``compile``: a guard read can never become a graph
break or a sync inside the compiled graph. ``compile_options`` are ``torch.compile``'s keyword
arguments (``backend``, ``mode``, ``dynamic``, ``fullgraph``, ``options``...), used with
``compile=True`` (unused without, like ``amp_dtype`` without mixed precision) and checked with
the other options (:func:`check_compile_options`: unknown keys are refused, and
``torch.compile`` itself checks the values on a dry call).

The last, shorter batch: a batch whose input shapes differ from the first batch compiled in the
same mode (training, or validation under ``no_grad``) runs through the *eager* module instead of
triggering a recompilation (:class:`CompiledForward`). Why not drop it: dropping changes the
data each epoch trains on and the result against an eager run. Why not pad it: padded rows
enter batch-norm statistics and the loss mean, so the math changes unless every model and
criterion masks them. Eager is the same math, exactly; its cost is one batch per epoch (and one
per validation pass) at eager speed, where a recompilation would cost a second compilation
(15 to 55 s for a small MLP with the inductor backend on a shared 2-core CPU, cold cache) and, with dynamo's automatic
dynamic shapes, a slower shape-generic graph for every later batch. Inputs that vary in more
than the batch dimension (clips of different lengths) would all run eagerly: a WARNING says so
once; pass ``compile_options={'dynamic': True}`` to compile one shape-generic graph, through
which every batch then runs (no gating; dynamo still specializes a batch of exactly 1 example).

A model ``torch.compile`` cannot handle fails on its first compiled call with an error naming
``compile=True`` and the compiler's first line, once the eager model has been checked to run on
the same batch (if the eager model fails too, its own error is raised): not a silent fallback,
since a run asked to be compiled and quietly trained eagerly would cost its user the time they
compiled to save.

Checkpoints hold the original module's keys. A model passed in already compiled
(``torch.compile(model)``, an ``OptimizedModule`` whose keys start with ``_orig_mod.``) is
unwrapped once at the start (:func:`unwrap_compiled`): its original module is trained, saved
and returned (compiled again when ``compile=True``). A checkpoint whose model keys carry
``_orig_mod.`` or ``module.`` prefixes (written from a compiled or DDP model by another tool or
an older version) loads with the prefixes stripped (:func:`plain_keys`, logged).

Example:
    >>> import torch
    >>> net = torch.nn.Linear(4, 2)
    >>> plain_keys({"_orig_mod.weight": net.weight, "_orig_mod.bias": net.bias}).keys()
    dict_keys(['weight', 'bias'])
    >>> unwrap_compiled(net) is net
    True
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import sys
from collections.abc import Mapping
from typing import Any

import torch

from .. import checkpoint as ck

__all__ = ["COMPILE_OPTION_KEYS", "check_compile_options", "unwrap_compiled", "plain_keys",
           "plain_checkpoint", "CompiledForward", "compile_forward"]

log = logging.getLogger(__name__)

#: ``torch.compile``'s keyword arguments: the keys ``compile_options`` may hold.
COMPILE_OPTION_KEYS: tuple[str, ...] = tuple(
    n for n in inspect.signature(torch.compile).parameters if n != "model")
_BOOL_KEYS = ("fullgraph", "disable", "isolate_recompiles")
#: Prefixes that wrappers add to a model's state-dict keys (torch.compile, DDP / DataParallel).
WRAPPER_PREFIXES = ("_orig_mod.", "module.")


def check_compile_options(compile: Any, options: Any) -> None:
    """Check ``compile`` and ``compile_options`` (keys, then a dry ``torch.compile`` call on
    an ``Identity``, which compiles nothing until called but checks ``backend``, ``mode`` and
    ``options``). Raises ``TypeError`` / ``ValueError`` naming the option."""
    if not isinstance(compile, bool):
        raise TypeError(f"compile must be a bool, got {compile!r}")
    if not isinstance(options, dict):
        raise TypeError(f"compile_options must be a dict, got {options!r}")
    if not options:  # like amp_dtype without mixed precision, they are unused without compile
        return
    unknown = sorted(set(map(str, options)) - set(COMPILE_OPTION_KEYS))
    if unknown:
        raise TypeError(f"compile_options: unknown key(s) {', '.join(map(repr, unknown))}; "
                        f"torch.compile takes {', '.join(COMPILE_OPTION_KEYS)}")
    for key in _BOOL_KEYS:
        if key in options and not isinstance(options[key], bool):
            raise TypeError(f"compile_options[{key!r}] must be a bool, got {options[key]!r}")
    if "dynamic" in options and options["dynamic"] not in (None, True, False):
        raise TypeError(f"compile_options['dynamic'] must be None or a bool, "
                        f"got {options['dynamic']!r}")
    backend = options.get("backend")
    if backend is not None and not isinstance(backend, str) and not callable(backend):
        raise TypeError(f"compile_options['backend'] must be a backend name or a callable, "
                        f"got {backend!r}")
    try:
        torch.compile(torch.nn.Identity(), **options)
    except Exception as e:  # torch's own checks: InvalidBackend, bad mode, unknown options
        raise ValueError(f"compile_options={options!r} are refused by torch.compile: "
                         f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from e


def unwrap_compiled(model: torch.nn.Module, compile: bool = False) -> torch.nn.Module:
    """The original module of a ``torch.compile``'d model (an ``OptimizedModule``), else
    ``model`` itself. Logged: with ``compile=False`` a WARNING, since the run then trains the
    original module eagerly."""
    eval_frame = sys.modules.get("torch._dynamo.eval_frame")  # loaded if anything compiled
    if eval_frame is None or not isinstance(model, eval_frame.OptimizedModule):
        return model
    inner = model._orig_mod
    if compile:
        log.info("model is a torch.compile'd module: its original %s is compiled with this "
                 "run's compile_options, and saved with its own keys", type(inner).__name__)
    else:
        log.warning("model is a torch.compile'd module: its original %s is trained eagerly and "
                    "saved with its own keys (no '_orig_mod.' prefix); pass compile=True to "
                    "train it compiled", type(inner).__name__)
    return inner


def plain_keys(weights: Mapping[str, Any], where: object = "checkpoint") -> dict[str, Any]:
    """``weights`` with the wrapper prefixes (``_orig_mod.``, ``module.``) removed when every
    key carries them (repeatedly: ``module._orig_mod.`` too); logged once when any was."""
    out, removed = dict(weights), []
    while out:
        prefix = next((p for p in WRAPPER_PREFIXES if all(k.startswith(p) for k in out)), None)
        if prefix is None:
            break
        out = {k[len(prefix):]: v for k, v in out.items()}
        removed.append(prefix)
    if removed:
        log.info("%s: model keys saved from a wrapped model; prefix %r removed", where,
                 "".join(removed))
    return out


def plain_checkpoint(state: Mapping[str, Any], where: object) -> dict[str, Any]:
    """A checkpoint whose model weights (and recovery snapshot's) have :func:`plain_keys`."""
    out = dict(state)
    if isinstance(out.get(ck.MODEL_KEY), Mapping):
        out[ck.MODEL_KEY] = plain_keys(out[ck.MODEL_KEY], where)
    rec = out.get(ck.RECOVERY_KEY)
    snap = rec.get("snapshot") if isinstance(rec, Mapping) else None
    if isinstance(snap, Mapping) and isinstance(snap.get(ck.MODEL_KEY), Mapping):
        snap = {**snap, ck.MODEL_KEY: plain_keys(snap[ck.MODEL_KEY], where)}
        out[ck.RECOVERY_KEY] = {**rec, "snapshot": snap}
    return out


def _signature(x: Any) -> tuple[Any, ...]:
    """The shapes and dtypes of the tensors in ``x`` (alone, or in tuples, lists, dicts):
    what a compiled graph is specialized on (host metadata: no device read)."""
    if isinstance(x, torch.Tensor):
        return ((tuple(x.shape), x.dtype),)
    if isinstance(x, (tuple, list)):
        return tuple(s for v in x for s in _signature(v))
    if isinstance(x, Mapping):
        return tuple(s for k in sorted(x, key=str) for s in _signature(x[k]))
    return (type(x).__name__,)


def _beyond_batch(a: tuple[Any, ...], b: tuple[Any, ...]) -> bool:
    """Whether two signatures differ in more than the first (batch) dimension."""
    def strip(sig: tuple[Any, ...]) -> tuple[Any, ...]:
        return tuple((s[0][1:], s[1]) if isinstance(s, tuple) else s for s in sig)
    return strip(a) != strip(b)


class CompiledForward:
    """The model's forward, compiled once per mode, other input shapes eager.

    A mode is ``(training, grad enabled)``: training, and validation under ``no_grad``. The
    first call in a mode compiles (through ``compiled``) for its input shapes; a later call in
    that mode with other shapes (the short last batch) runs ``net`` eagerly, so nothing is
    recompiled. With ``gate=False`` (``dynamic=True``) every call goes to ``compiled``.

    It stands in for the model in :class:`~.loop.Parts` (``train()``, ``eval()``, ``no_sync()``
    go to ``net``). ``compilations`` counts the modes compiled and ``eager_calls`` the calls
    sent to ``net``.
    """

    def __init__(self, net: torch.nn.Module, compiled: Any, gate: bool = True) -> None:
        self.net, self.compiled, self.gate = net, compiled, gate
        self.shapes: dict[tuple[bool, bool], tuple[Any, ...]] = {}
        self.eager_calls = 0
        self._warned = False

    @property
    def compilations(self) -> int:
        """Modes compiled so far (a mode's first call compiles)."""
        return len(self.shapes)

    def __call__(self, x: Any) -> Any:
        mode = (self.net.training, torch.is_grad_enabled())
        sig = _signature(x)
        first = self.shapes.get(mode)
        if first is None:
            out = self._first_call(x)
            self.shapes[mode] = sig
            return out
        if self.gate and sig != first:
            self._eager_note(sig, first)
            return self.net(x)
        return self.compiled(x)

    def _eager_note(self, sig: tuple[Any, ...], first: tuple[Any, ...]) -> None:
        self.eager_calls += 1
        if not self._warned and _beyond_batch(sig, first):
            self._warned = True
            log.warning("compile=True: inputs %s differ from the compiled %s beyond the batch "
                        "dimension; such batches run eagerly: pass compile_options={'dynamic': "
                        "True} to compile for varying shapes", sig, first)
        elif self.eager_calls == 1:
            log.info("compile=True: a batch shaped %s (compiled: %s) runs eagerly, without "
                     "recompiling", sig, first)

    def _first_call(self, x: Any) -> Any:
        """The compiling call; a failure names ``compile=True`` when the eager model runs."""
        try:
            return self.compiled(x)
        except torch.OutOfMemoryError:
            raise
        except Exception as e:
            module = getattr(self.net, "module", self.net)  # DDP: no collective here
            with torch.no_grad():
                module(x)  # the model's own error, if it fails eagerly too
            raise RuntimeError(
                f"compile=True: torch.compile could not compile or run this model, which runs "
                f"eagerly ({_root_cause(e)}); pass compile=False, or other "
                "compile_options (backend='aot_eager' generates no code; fullgraph=False "
                "allows graph breaks)") from e

    def train(self, mode: bool = True) -> CompiledForward:
        self.net.train(mode)
        return self

    def eval(self) -> CompiledForward:
        return self.train(False)

    def no_sync(self) -> Any:
        """DDP's ``no_sync()`` of ``net`` (a no-op context without DDP)."""
        return self.net.no_sync() if hasattr(self.net, "no_sync") else contextlib.nullcontext()


def _root_cause(e: BaseException) -> str:
    """``Type: first line`` of the innermost cause of ``e`` (dynamo wraps the compiler's)."""
    while (inner := e.__cause__ or getattr(e, "inner_exception", None)) is not None:
        e = inner
    lines = [ln for ln in str(e).splitlines() if ln.strip()]
    return f"{type(e).__name__}: {lines[0][:300] if lines else ''}"


def compile_forward(net: torch.nn.Module, options: Mapping[str, Any]) -> CompiledForward:
    """``torch.compile(net, **options)`` behind the shape gate (none with ``dynamic=True``)."""
    return CompiledForward(net, torch.compile(net, **options),
                           gate=options.get("dynamic") is not True)
