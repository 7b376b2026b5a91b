"""Health checks of a model's gradients and weights that name what is wrong.

Each check computes per-parameter norms with torch's ``_foreach_norm`` kernels (L2, L1, max-abs
and min-abs; a tensor holding NaN has NaN norms and one holding Inf an Inf max-abs norm, which is
how offending parameters are found without elementwise scans) and reads all of them in one host
transfer (plus one per tensor so large that its float32 L2 norm overflows).

Counts such as ``nan_grads`` are numbers of *parameters* (tensors) holding at least one NaN; the
names are in ``nan_grad_params``. ``max_*``, ``min_*`` and ``mean_*`` are over the absolute
values of the elements of the finite parameters.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import torch

__all__ = ["TrainingStability"]

log = logging.getLogger(__name__)


def _norm_table(tensors: list[torch.Tensor]) -> list[list[float]]:
    """Per tensor ``[l2, l1, max_abs, min_abs]``, read in one transfer per device and dtype."""
    groups: dict[tuple[torch.device, torch.dtype], list[int]] = {}
    for i, t in enumerate(tensors):
        groups.setdefault((t.device, t.dtype), []).append(i)
    rows: list[list[float]] = [[] for _ in tensors]
    for idx in groups.values():
        group = [tensors[i] for i in idx]
        cols = [torch.stack(torch._foreach_norm(group, o)).float()
                for o in (2.0, 1.0, math.inf, -math.inf)]
        for i, row in zip(idx, torch.stack(cols, dim=1).tolist()):
            rows[i] = row
    return rows


def _summarise(named: list[tuple[str, torch.Tensor]], kind: str) -> dict[str, Any]:
    rows = _norm_table([t.detach() for _, t in named])
    # NaN anywhere makes the L2 and max-abs norms NaN; +-Inf makes the max-abs norm Inf. A huge
    # finite tensor can overflow its float32 L2 norm alone: recompute that one in float64.
    for (_, t), r in zip(named, rows):
        if math.isinf(r[0]) and math.isfinite(r[2]):
            r[0] = float(torch.linalg.vector_norm(t.detach().double()))
    nan_names = [n for (n, _), r in zip(named, rows) if math.isnan(r[0]) or math.isnan(r[2])]
    inf_names = [n for (n, _), r in zip(named, rows)
                 if math.isinf(r[2]) and not (math.isnan(r[0]) or math.isnan(r[2]))]
    bad = set(nan_names) | set(inf_names)
    ok = [(n, t, r) for (n, t), r in zip(named, rows) if n not in bad]
    numel = sum(t.numel() for _, t, _ in ok)
    return {
        f"max_{kind}": max((r[2] for *_, r in ok), default=0.0),
        f"min_{kind}": min((r[3] for *_, r in ok), default=0.0),
        f"mean_{kind}": (sum(r[1] for *_, r in ok) / numel) if numel else 0.0,
        "total_norm": math.nan if (nan_names or inf_names)
        else math.sqrt(sum(r[0] ** 2 for *_, r in ok)),
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
            non-finite), ``nan_grads``/``inf_grads`` (how many parameters hold NaN/Inf gradients)
            and their names in ``nan_grad_params``/``inf_grad_params``, ``no_grad_params``
            (trainable parameters whose ``.grad`` is None), ``num_params`` (parameters with a
            gradient) and ``healthy`` (no NaN/Inf gradient).
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
            parameters), ``total_norm``, ``nan_weights``/``inf_weights`` (counts of parameters),
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
