"""Gradient-norm clipping that returns the pre-clip norm and keeps its statistics on the device.

``GradientClipper.clip`` computes the total gradient norm exactly as
``torch.nn.utils.clip_grad_norm_`` does (``get_total_norm`` then ``clip_grads_with_norm_``), with
one difference: when the norm is NaN or Inf the gradients are left untouched (torch would multiply
them by NaN) and the step is flagged through :attr:`GradientClipper.last_finite`, so the caller
can skip the optimizer step. Nothing here reads a tensor on the host until :meth:`get_stats`.

Under mixed precision, call the scaler's ``unscale_`` first so the norm is the true one.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

import torch

from ._validate import check_real

__all__ = ["GradientClipper", "grads_of"]

_FOLD = 4096  # pending per-step norms reduced into the running statistics at most this often

_Params = torch.nn.Module | torch.Tensor | Iterable[torch.Tensor]


_ACCEPTS = "a torch.nn.Module, a tensor, or an iterable of tensors (e.g. model.parameters())"


def grads_of(model_or_params: _Params) -> list[torch.Tensor]:
    """The existing ``.grad`` tensors of a module's parameters or of an iterable of tensors.

    Raises:
        TypeError: ``model_or_params`` is none of a module, a tensor or an iterable of tensors
            (a string or a mapping is not taken as an iterable), naming the bad item's type.
    """
    if isinstance(model_or_params, torch.nn.Module):
        return [p.grad for p in model_or_params.parameters() if p.grad is not None]
    if isinstance(model_or_params, torch.Tensor):
        return [model_or_params.grad] if model_or_params.grad is not None else []
    if isinstance(model_or_params, (str, bytes, Mapping)) or not isinstance(
            model_or_params, Iterable):
        hint = "; pass its .values()" if isinstance(model_or_params, Mapping) else ""
        raise TypeError(f"model_or_params must be {_ACCEPTS}, got "
                        f"{_show(model_or_params)} of type {type(model_or_params).__name__}{hint}")
    grads = []
    for i, p in enumerate(model_or_params):
        if not isinstance(p, torch.Tensor):
            hint = ("; pass model.parameters(), not named_parameters()"
                    if isinstance(p, tuple) and len(p) == 2 and isinstance(p[0], str) else "")
            raise TypeError(f"model_or_params must be {_ACCEPTS}, but item {i} is {_show(p)} of "
                            f"type {type(p).__name__}{hint}")
        if p.grad is not None:
            grads.append(p.grad)
    return grads


def _show(value: Any) -> str:
    text = " ".join(repr(value).split())
    return text if len(text) <= 60 else text[:57] + "..."


def _total_norm(grads: list[torch.Tensor], norm_type: float) -> torch.Tensor:
    if hasattr(torch.nn.utils, "get_total_norm"):  # torch >= 2.6
        return torch.nn.utils.get_total_norm(grads, norm_type)
    norms = [torch.linalg.vector_norm(g, norm_type) for g in grads]
    return torch.linalg.vector_norm(torch.stack([n.to(grads[0].device) for n in norms]), norm_type)


def _stored_values(grads: list[torch.Tensor]) -> list[torch.Tensor]:
    """Dense stand-ins with the same p-norm: a sparse tensor's coalesced values (its implicit
    zeros add nothing to a norm); empty ones dropped."""
    out = [g.coalesce().values() if g.layout == torch.sparse_coo
           else g if g.layout == torch.strided else g.to_dense() for g in grads]
    return [v for v in out if v.numel()]


class GradientClipper:
    """Clip the total gradient norm and record norm statistics without host syncs.

    Args:
        max_norm: the largest allowed total norm; > 0. ``float('inf')`` records statistics
            without clipping.
        norm_type: the p of the p-norm; > 0, ``float('inf')`` for the max-norm.

    Example:
        >>> model = torch.nn.Linear(4, 2)
        >>> model(torch.randn(8, 4)).pow(2).sum().backward()
        >>> clipper = GradientClipper(max_norm=1.0)
        >>> norm = clipper.clip(model)          # 0-dim tensor, the norm before clipping
        >>> clipper.get_stats()['num_steps']
        1
    """

    def __init__(self, max_norm: float = 1.0, norm_type: float = 2.0) -> None:
        self.max_norm = check_real("max_norm", max_norm, low=0.0, low_inclusive=False,
                                   allow_inf=True)
        self.norm_type = check_real("norm_type", norm_type, low=0.0, low_inclusive=False,
                                    allow_inf=True)
        self._sparse = False  # set once a sparse gradient was seen (see _norm)
        self.reset()

    def reset(self) -> None:
        """Forget all statistics."""
        self.num_steps = 0
        self._norms: list[torch.Tensor] = []  # this interval's norms, 0-d device tensors
        self._stats: torch.Tensor | None = None  # folded older intervals (see _fold)
        self._last: torch.Tensor | None = None

    def clip(self, model_or_params: _Params) -> torch.Tensor:
        """Clip the gradients in place; return the total norm before clipping.

        Args:
            model_or_params: a module, a tensor, or an iterable of tensors whose ``.grad`` is used
                (dense or sparse, e.g. from ``nn.Embedding(sparse=True)``).

        Returns:
            0-dim float tensor on the gradients' device (0.0 when no gradient exists). A NaN/Inf
            norm leaves the gradients unchanged and sets ``last_finite`` to a False tensor.

        Raises:
            TypeError: ``model_or_params`` is not one of those (e.g. a string, a number, None,
                a dict, or an iterable holding something other than tensors).
        """
        grads = grads_of(model_or_params)
        if not grads:
            norm = torch.zeros(())
        else:
            norm = self._norm(grads)
            finite = torch.isfinite(norm)
            if self.max_norm != math.inf:
                # A NaN/Inf norm becomes 0 here, so the clip coefficient is 1: gradients untouched.
                safe = torch.where(finite, norm, torch.zeros_like(norm))
                coef = torch.clamp(self.max_norm / (safe + 1e-6), max=1.0)
                torch._foreach_mul_(grads, coef.to(grads[0].device))
        self._record(norm)
        return norm

    def _norm(self, grads: list[torch.Tensor]) -> torch.Tensor:
        """The total norm; sparse gradients (torch's norms refuse them) through their values.
        The sparse path is taken from the first sparse gradient on, so a dense model pays
        nothing for it."""
        if not self._sparse:
            try:
                return _total_norm(grads, self.norm_type)
            except NotImplementedError:
                if all(g.layout == torch.strided for g in grads):
                    raise
                self._sparse = True
        values = _stored_values(grads)
        if not values:
            return torch.zeros((), dtype=grads[0].dtype, device=grads[0].device)
        return _total_norm(values, self.norm_type)

    def _record(self, norm: torch.Tensor) -> None:
        # Per step only a reference is kept (no kernel launched); statistics are reduced in one
        # go by get_stats(), or folded every _FOLD steps to bound memory.
        norm = norm.detach()
        self._last = norm
        self._norms.append(norm)
        self.num_steps += 1
        if len(self._norms) >= _FOLD:
            self._fold()

    @property
    def last_finite(self) -> torch.Tensor | None:
        """0-dim bool tensor: whether the last norm was finite (None before the first clip)."""
        last = getattr(self, "_last", None)
        return None if last is None else torch.isfinite(last)

    def _fold(self) -> None:
        """Reduce the pending norms into ``[sum, sumsq, max, min, clipped, nonfinite, last]``."""
        if not self._norms:
            return
        dtype = torch.float32 if self._norms[0].device.type == "mps" else torch.float64
        n = torch.stack([x.to(self._norms[0].device) for x in self._norms]).to(dtype)
        finite = torch.isfinite(n)
        f = torch.where(finite, n, torch.zeros_like(n))
        inf = torch.full_like(n, math.inf)
        part = torch.stack([
            f.sum(), (f * f).sum(),
            torch.where(finite, n, -inf).max(), torch.where(finite, n, inf).min(),
            (finite & (n > self.max_norm)).sum().to(dtype), (~finite).sum().to(dtype), n[-1],
        ])
        if self._stats is None:
            self._stats = part
        else:
            s = self._stats.to(part.device)
            self._stats = torch.stack([s[0] + part[0], s[1] + part[1],
                                       torch.maximum(s[2], part[2]), torch.minimum(s[3], part[3]),
                                       s[4] + part[4], s[5] + part[5], part[6]])
        self._norms = []

    def get_stats(self) -> dict[str, float | int]:
        """Norm statistics since the last ``reset()``, as Python numbers (one host read).

        Returns:
            ``mean_norm``, ``max_norm``, ``min_norm``, ``std_norm`` (population std) over the
            finite norms; ``last_norm``; ``num_steps`` (calls to ``clip``), ``num_clipped`` (finite
            norms above ``max_norm``), ``clip_fraction`` (``num_clipped / num_steps``),
            ``num_nonfinite``. Empty statistics give 0.0 for the norms.
        """
        self._fold()
        if self._stats is None or self.num_steps == 0:
            return {"mean_norm": 0.0, "max_norm": 0.0, "min_norm": 0.0, "std_norm": 0.0,
                    "last_norm": 0.0, "num_steps": 0, "num_clipped": 0, "clip_fraction": 0.0,
                    "num_nonfinite": 0}
        total, sumsq, mx, mn, clipped, nonfinite, last = self._stats.tolist()
        n_finite = self.num_steps - int(nonfinite)
        mean = total / n_finite if n_finite else 0.0
        var = max(sumsq / n_finite - mean * mean, 0.0) if n_finite else 0.0
        return {
            "mean_norm": mean,
            "max_norm": mx if n_finite else 0.0,
            "min_norm": mn if n_finite else 0.0,
            "std_norm": math.sqrt(var),
            "last_norm": last,
            "num_steps": self.num_steps,
            "num_clipped": int(clipped),
            "clip_fraction": clipped / self.num_steps,
            "num_nonfinite": int(nonfinite),
        }

    def state_dict(self) -> dict[str, Any]:
        """Settings and statistics (the statistics as a CPU tensor)."""
        self._fold()
        return {
            "max_norm": self.max_norm,
            "norm_type": self.norm_type,
            "num_steps": self.num_steps,
            "stats": None if self._stats is None else self._stats.detach().cpu(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore from :meth:`state_dict`; statistics move to the device on the next ``clip``.

        Raises:
            TypeError / ValueError: ``state`` is not such a dict, or holds bad settings.
        """
        if not isinstance(state, Mapping):
            raise TypeError(f"state must be a dict from GradientClipper.state_dict(), got "
                            f"{type(state).__name__}")
        missing = [k for k in ("max_norm", "norm_type", "num_steps", "stats") if k not in state]
        if missing:
            raise ValueError(f"state is missing {', '.join(missing)}: pass the dict returned by "
                             "GradientClipper.state_dict()")
        check_real("max_norm", state["max_norm"], low=0.0, low_inclusive=False, allow_inf=True)
        check_real("norm_type", state["norm_type"], low=0.0, low_inclusive=False, allow_inf=True)
        self.max_norm = float(state["max_norm"])
        self.norm_type = float(state["norm_type"])
        self.num_steps = int(state["num_steps"])
        self._stats = None if state["stats"] is None else state["stats"].clone()
        self._norms = []
        self._last = None

    def __repr__(self) -> str:
        return f"GradientClipper(max_norm={self.max_norm}, norm_type={self.norm_type})"
