"""Health checks of a model's gradients and weights that name what is wrong.

Each check makes two fast passes over every parameter: torch's ``_foreach_norm`` (the L2 norm,
as ``clip_grad_norm_`` does) and ``aminmax`` (its smallest and largest element). A tensor holding
NaN has a NaN norm and NaN extremes, one holding Inf an infinite extreme: that is how offending
parameters are found without elementwise scans. A NaN hides an Inf in the same tensor, so the
tensors found holding NaN (only those) are also scanned for Inf. Everything is read in one host
transfer on a healthy model (plus one for the tensors holding NaN, and one per tensor so large
that its float32 L2 norm overflows).

Counts such as ``nan_grads`` are numbers of *parameters* (tensors) holding at least one NaN, and
``inf_grads`` those holding at least one +-Inf; a tensor holding both counts in both. The names
are in ``nan_grad_params`` / ``inf_grad_params``. Over the finite parameters: ``max_*`` is the
largest absolute element, ``mean_*`` the root-mean-square of all elements, ``min_*`` the smallest
per-parameter root-mean-square (a dead or vanishing layer shows up there).

Sparse tensors (``nn.Embedding(sparse=True)`` gradients) are checked through their stored values
(the implicit zeros count in the root-mean-squares); complex tensors through their real and
imaginary parts; integer tensors as float64. Parameters on the ``meta`` device have no values:
``ValueError``.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import torch

__all__ = ["TrainingStability"]

log = logging.getLogger(__name__)


def _norm_table(tensors: list[torch.Tensor]) -> list[list[float]]:
    """Per tensor ``[l2, min, max]`` (two fast passes: ``_foreach_norm`` and ``aminmax``), read
    in one transfer per device and dtype."""
    groups: dict[tuple[torch.device, torch.dtype], list[int]] = {}
    for i, t in enumerate(tensors):
        groups.setdefault((t.device, t.dtype), []).append(i)
    rows: list[list[float]] = [[] for _ in tensors]
    for idx in groups.values():
        group = [tensors[i] for i in idx]
        l2 = torch.stack(torch._foreach_norm(group, 2.0)).float()
        mm = [torch.aminmax(t) if t.numel() else (t.new_zeros(()), t.new_zeros(())) for t in group]
        lo = torch.stack([m[0] for m in mm]).float()
        hi = torch.stack([m[1] for m in mm]).float()
        for i, row in zip(idx, torch.stack([l2, lo, hi], dim=1).tolist()):
            rows[i] = row
    return rows


def _values(t: torch.Tensor) -> torch.Tensor:
    """The tensor's elements as a dense real float tensor that the two passes accept."""
    if t.layout == torch.sparse_coo:
        t = t.coalesce().values()  # duplicates summed; implicit zeros change no extreme
    elif t.layout != torch.strided:
        t = t.to_dense()
    if t.is_complex():
        t = torch.view_as_real(t.resolve_conj())  # (..., 2): NaN/Inf in either part shows
    elif not t.is_floating_point():
        t = t.double()
    return t


def _has_inf(tensors: list[torch.Tensor]) -> list[bool]:
    """Whether each tensor holds +-Inf, by an elementwise scan (one host transfer)."""
    if not tensors:
        return []
    dev = tensors[0].device
    return torch.stack([torch.isinf(t).any().to(dev) for t in tensors]).tolist()


def _summarise(named: list[tuple[str, torch.Tensor]], kind: str) -> dict[str, Any]:
    meta = [n for n, t in named if t.is_meta]
    if meta:
        raise ValueError(f"{kind}s on the meta device have no values to check: "
                         f"{', '.join(meta)}; materialise the model first (e.g. to_empty() "
                         "and initialise it)")
    tensors = [_values(t.detach()) for _, t in named]
    rows = _norm_table(tensors)
    table = []
    for t, (l2, lo, hi) in zip(tensors, rows):
        max_abs = max(abs(lo), abs(hi)) if not (math.isnan(lo) or math.isnan(hi)) else math.nan
        if math.isinf(l2) and math.isfinite(max_abs):
            # A huge finite tensor overflows its float32 L2 norm: recompute it in float64.
            l2 = float(torch.linalg.vector_norm(t.double()))
        table.append((l2, max_abs))
    # NaN anywhere makes the L2 norm and min/max NaN, which hides an Inf beside it: only the
    # tensors holding NaN are scanned for Inf. Without NaN, +-Inf makes max |x| Inf.
    has_nan = [math.isnan(l2) or math.isnan(mx) for l2, mx in table]
    scanned = iter(_has_inf([t for t, nan in zip(tensors, has_nan) if nan]))
    has_inf = [next(scanned) if nan else math.isinf(mx) for nan, (_l2, mx) in zip(has_nan, table)]
    nan_names = [n for (n, _), bad in zip(named, has_nan) if bad]
    inf_names = [n for (n, _), bad in zip(named, has_inf) if bad]
    ok = [(l2, mx, t.numel()) for (_n, t), (l2, mx), nan, inf
          in zip(named, table, has_nan, has_inf) if not (nan or inf)]
    rms = [l2 / math.sqrt(k) for l2, _mx, k in ok if k]
    numel = sum(k for *_, k in ok)
    return {
        f"max_{kind}": max((mx for _l2, mx, _k in ok), default=0.0),
        f"min_{kind}": min(rms, default=0.0),
        f"mean_{kind}": math.sqrt(sum(l2 * l2 for l2, _mx, _k in ok) / numel) if numel else 0.0,
        "total_norm": math.nan if (nan_names or inf_names)
        else math.sqrt(sum(l2 * l2 for l2, _mx, _k in ok)),
        f"nan_{kind}s": len(nan_names),
        f"inf_{kind}s": len(inf_names),
        f"nan_{kind}_params": nan_names,
        f"inf_{kind}_params": inf_names,
        "num_params": len(named),
        "healthy": not nan_names and not inf_names,
    }


class TrainingStability:
    """Static checks of gradients and weights; call them every few epochs, not every batch."""

    @staticmethod
    def check_gradients(model: torch.nn.Module, verbose: bool = False) -> dict[str, Any]:
        """Inspect the gradients of ``model``'s trainable parameters.

        Returns:
            ``max_grad``, ``min_grad``, ``mean_grad`` (absolute element values over parameters
            with finite gradients), ``total_norm`` (L2 over all gradients; NaN when any is
            non-finite), ``nan_grads``/``inf_grads`` (how many parameters hold NaN / +-Inf
            gradients; a gradient holding both counts in both) and their names in
            ``nan_grad_params``/``inf_grad_params``, ``no_grad_params`` (trainable parameters
            whose ``.grad`` is None), ``num_params`` (parameters with a gradient) and
            ``healthy`` (no NaN/Inf gradient).
        """
        if not isinstance(model, torch.nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        named = [(n, p.grad) for n, p in model.named_parameters()
                 if p.requires_grad and p.grad is not None]
        missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
        out = _summarise(named, "grad")
        out["no_grad_params"] = missing
        if verbose:
            _log_summary("gradients", out, "grad")
        return out

    @staticmethod
    def check_weights(model: torch.nn.Module, verbose: bool = False) -> dict[str, Any]:
        """Inspect ``model``'s parameters.

        Returns:
            ``max_weight``, ``min_weight``, ``mean_weight`` (absolute element values over finite
            parameters), ``total_norm``, ``nan_weights``/``inf_weights`` (counts of parameters
            holding NaN / +-Inf; both counts for one holding both),
            ``nan_weight_params``/``inf_weight_params`` (names), ``num_params``, ``healthy``.
        """
        if not isinstance(model, torch.nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        out = _summarise(list(model.named_parameters()), "weight")
        if verbose:
            _log_summary("weights", out, "weight")
        return out


def _log_summary(what: str, s: dict[str, Any], kind: str) -> None:
    state = "healthy" if s["healthy"] else "UNHEALTHY"
    log.info("%s %s: %d params, total_norm=%.4g, max=%.4g, mean=%.4g, min=%.4g",
             what, state, s["num_params"], s["total_norm"], s[f"max_{kind}"],
             s[f"mean_{kind}"], s[f"min_{kind}"])
    if s[f"nan_{kind}_params"]:
        log.warning("%s with NaN: %s", what, ", ".join(s[f"nan_{kind}_params"]))
    if s[f"inf_{kind}_params"]:
        log.warning("%s with Inf: %s", what, ", ".join(s[f"inf_{kind}_params"]))
    if s.get("no_grad_params"):
        log.info("trainable parameters without a gradient: %s", ", ".join(s["no_grad_params"]))
