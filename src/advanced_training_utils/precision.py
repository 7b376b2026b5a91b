"""Mixed precision: autocast plus, for float16, dynamic loss scaling with ``torch.amp.GradScaler``.

``MixedPrecisionTrainer`` has the same methods whatever it does. Disabled, or with bfloat16 (which
needs no loss scaling), the scaling methods are no-ops; so a training loop calls them always and
carries no ``if use_amp`` branches.

``device='cuda'`` on a machine without CUDA: the trainer logs one warning and runs disabled (the
user's guide shows ``device='cuda'``; a laptop run of the same script should still work). Pass
``device='cpu'`` to use CPU autocast (float16 or bfloat16) on purpose.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from typing import Any

import torch
from torch.optim import Optimizer

from ._validate import check_choice, check_int, check_real

__all__ = ["MixedPrecisionTrainer", "resolve_amp_dtype"]

log = logging.getLogger(__name__)

_NULL = contextlib.nullcontext()  # reusable: nullcontext keeps no state

_DTYPES = {"float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
           "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


def resolve_amp_dtype(dtype: str | torch.dtype, device_type: str) -> torch.dtype:
    """Map ``'float16'``/``'bfloat16'``/``'auto'`` (or a torch dtype) to a torch dtype.

    ``'auto'`` is bfloat16 on CPUs and on GPUs that support it, float16 elsewhere.
    """
    if isinstance(dtype, torch.dtype):
        if dtype not in (torch.float16, torch.bfloat16):
            raise ValueError(f"dtype must be float16 or bfloat16, got {dtype}")
        return dtype
    if not isinstance(dtype, str):
        raise TypeError(f"dtype must be a str or torch.dtype, got {dtype!r}")
    check_choice("dtype", dtype, [*list(_DTYPES), "auto"])
    if dtype != "auto":
        return _DTYPES[dtype]
    if device_type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16


class MixedPrecisionTrainer:
    """Autocast and loss scaling behind one small API.

    Args:
        enabled: False gives a no-op object with the same methods.
        device: where the model runs (``'cuda'``, ``'cpu'``, ``'cuda:1'``, a ``torch.device``).
        dtype: ``'float16'`` (scaled), ``'bfloat16'`` (unscaled) or ``'auto'``.
        init_scale: first loss scale for float16.
        growth_interval: float16 steps without overflow before the scale doubles.

    Example:
        >>> mp = MixedPrecisionTrainer(enabled=True, device='cpu', dtype='bfloat16')
        >>> with mp.autocast():
        ...     y = torch.nn.Linear(4, 4)(torch.randn(2, 4))
        >>> y.dtype
        torch.bfloat16
    """

    def __init__(
        self,
        enabled: bool = True,
        device: str | torch.device = "cuda",
        dtype: str | torch.dtype = "float16",
        *,
        init_scale: float = 2.0**16,
        growth_interval: int = 2000,
    ) -> None:
        if not isinstance(enabled, bool):
            raise TypeError(f"enabled must be a bool, got {enabled!r}")
        try:
            dev = torch.device(device)
        except (RuntimeError, TypeError) as e:
            raise ValueError(f"device must name a torch device, got {device!r}") from e
        check_real("init_scale", init_scale, low=0.0, low_inclusive=False)
        check_int("growth_interval", growth_interval, low=1)
        self.device_type = dev.type
        self.dtype = resolve_amp_dtype(dtype, dev.type)
        if enabled and dev.type == "cuda" and not torch.cuda.is_available():
            msg = ("MixedPrecisionTrainer: device='cuda' but CUDA is not available; mixed "
                   "precision is disabled (pass device='cpu' for CPU autocast)")
            warnings.warn(msg, RuntimeWarning, stacklevel=2)
            log.warning(msg)
            enabled = False
        self.enabled = enabled
        self._scaler: torch.amp.GradScaler | None = None
        if enabled and self.dtype == torch.float16:
            self._scaler = torch.amp.GradScaler(
                dev.type, init_scale=init_scale, growth_interval=growth_interval
            )
        self._unscaled: set[int] = set()

    @property
    def scaler(self) -> torch.amp.GradScaler | None:
        """The ``GradScaler`` for float16, else None."""
        return self._scaler

    @property
    def scale(self) -> float:
        """The current loss scale (1.0 when not scaling). Reads the device."""
        return float(self._scaler.get_scale()) if self._scaler is not None else 1.0

    def autocast(self) -> contextlib.AbstractContextManager[Any]:
        """Context for the forward pass and loss: autocast when enabled, nothing otherwise."""
        if not self.enabled:
            return _NULL
        return torch.autocast(device_type=self.device_type, dtype=self.dtype)

    def scale_loss(self, loss: torch.Tensor) -> torch.Tensor:
        """``loss`` times the current scale (float16), else ``loss`` itself."""
        return self._scaler.scale(loss) if self._scaler is not None else loss

    def unscale_(self, optimizer: Optimizer) -> None:
        """Divide the optimizer's gradients by the scale, once per step; clip after this.

        Also records whether any gradient overflowed (used by :meth:`update`). Calling it twice
        in one step is harmless.
        """
        if self._scaler is None or id(optimizer) in self._unscaled:
            return
        self._scaler.unscale_(optimizer)
        self._unscaled.add(id(optimizer))

    def update(self) -> None:
        """End the step: adjust the scale (down after an overflow, up after a clean stretch).

        Use this when the optimizer step was taken by other means (the training loop's guard);
        :meth:`step_optimizer` calls it itself.
        """
        if self._scaler is not None:
            self._scaler.update()
        self._unscaled.clear()

    def step_optimizer(self, optimizer: Optimizer) -> bool:
        """Unscale if needed, step the optimizer unless a gradient overflowed, update the scale.

        Returns:
            False when float16 loss scaling found Inf/NaN gradients and skipped the step, else
            True. Reads the scale on the host once (float16 only).
        """
        if self._scaler is None:
            optimizer.step()
            self._unscaled.clear()
            return True
        before = self._scaler.get_scale()
        self._scaler.step(optimizer)
        self.update()
        return not self._scaler.get_scale() < before

    def state_dict(self) -> dict[str, Any]:
        """Settings and the scaler's state (plain Python numbers)."""
        return {
            "enabled": self.enabled,
            "dtype": str(self.dtype).replace("torch.", ""),
            "scaler": self._scaler.state_dict() if self._scaler is not None else {},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the scaler's state saved by :meth:`state_dict` (ignored when not scaling)."""
        if self._scaler is not None and state.get("scaler"):
            self._scaler.load_state_dict(state["scaler"])

    def __repr__(self) -> str:
        return (f"MixedPrecisionTrainer(enabled={self.enabled}, device={self.device_type!r}, "
                f"dtype={self.dtype})")
