"""Data augmentation for the three kinds of tensor our models see.

* ``augment_audio_features``: SpecAugment frequency and time masking (Park et al., 2019,
  "SpecAugment: A Simple Data Augmentation Method for Automatic Speech Recognition") plus Gaussian
  noise, on log-mel spectrograms shaped ``[F, T]``, ``[B, F, T]`` or ``[B, C, F, T]``.
* ``augment_emotion_embedding``: Gaussian noise on emotion embeddings ``[..., D]``.
* ``augment_note_probabilities``: note dropout, noise and optional transposition on note
  probabilities ``[P]``, ``[B, P]`` or ``[B, T, P]`` (pitch last).

Every method returns a new tensor and never writes to its input. Randomness comes from a
``torch.Generator`` per device seeded from ``seed`` (same seed and input, same output), or from
torch's global RNG when no seed is given, so ``torch.manual_seed`` makes runs repeatable.
Everything is drawn and applied with batched tensor ops: no Python loop over examples.

Speed (``augment_audio_features`` on a ``[256, 128, 256]`` batch is one of our benchmarks):
drawing 8 M fresh Gaussian numbers costs more than ten copies of the batch on a CPU, so the mel
noise is read from a *noise bank*: 4 M Gaussian numbers per device and dtype, redrawn every 64
calls, viewed per call at a random offset with a random stride between examples (a strided view:
no copy). Within an example the noise is i.i.d. Gaussian; across examples of one call it is the
same bank shifted. ``exact_noise=True`` draws fresh noise instead. NaN/Inf inputs are not
scanned for (that would need a host read per call): they propagate to the output, and the
training loop's guard skips any step whose loss becomes non-finite.
"""

from __future__ import annotations

import random
from typing import Any

import torch

from ._validate import check_choice, check_int, check_real

__all__ = ["DataAugmentation", "SPECAUGMENT_POLICIES"]

_BANK_SIZE = 1 << 22     # Gaussian numbers per noise bank
_BANK_REFRESH = 64       # calls between redraws of the bank

#: The paper's hand-crafted policies (Table 1): F, m_F, T, p, m_T.
SPECAUGMENT_POLICIES: dict[str, dict[str, float]] = {
    "LB": {"freq_mask_param": 27, "num_freq_masks": 1, "time_mask_param": 100,
           "max_time_fraction": 1.0, "num_time_masks": 1},
    "LD": {"freq_mask_param": 27, "num_freq_masks": 2, "time_mask_param": 100,
           "max_time_fraction": 1.0, "num_time_masks": 2},
    "SM": {"freq_mask_param": 15, "num_freq_masks": 2, "time_mask_param": 70,
           "max_time_fraction": 0.2, "num_time_masks": 2},
    "SS": {"freq_mask_param": 27, "num_freq_masks": 2, "time_mask_param": 40,
           "max_time_fraction": 0.2, "num_time_masks": 2},
}


def _plain(state: tuple) -> list:
    """``random.Random.getstate()`` as plain lists (safe for ``weights_only`` loading)."""
    return [state[0], list(state[1]), state[2]]


def _check_float_tensor(name: str, x: Any, ranks: tuple[int, ...]) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {x.dtype}")
    if x.dim() not in ranks:
        shapes = " or ".join(f"{r}-d" for r in ranks)
        raise ValueError(f"{name} must be {shapes}, got shape {tuple(x.shape)}")
    if x.numel() == 0:
        raise ValueError(f"{name} must not be empty, got shape {tuple(x.shape)}")
    return x


def _mask_options(policy: str | None, freq_mask_param: int, num_freq_masks: int,
                  time_mask_param: int, num_time_masks: int, max_time_fraction: float,
                  mask_value: float | str) -> dict[str, Any]:
    """The mask options, checked; a ``policy`` (``SPECAUGMENT_POLICIES``) sets the first five."""
    if policy is not None:
        check_choice("policy", policy, SPECAUGMENT_POLICIES)
        p = SPECAUGMENT_POLICIES[policy]
        freq_mask_param, num_freq_masks = int(p["freq_mask_param"]), int(p["num_freq_masks"])
        time_mask_param, num_time_masks = int(p["time_mask_param"]), int(p["num_time_masks"])
        max_time_fraction = p["max_time_fraction"]
    check_int("freq_mask_param", freq_mask_param, low=0)
    check_int("num_freq_masks", num_freq_masks, low=0)
    check_int("time_mask_param", time_mask_param, low=0)
    check_int("num_time_masks", num_time_masks, low=0)
    check_real("max_time_fraction", max_time_fraction, low=0.0, high=1.0)
    if isinstance(mask_value, str):
        check_choice("mask_value", mask_value, ("mean",))
    else:
        check_real("mask_value", mask_value)
    return {"freq_mask_param": freq_mask_param, "num_freq_masks": num_freq_masks,
            "time_mask_param": time_mask_param, "num_time_masks": num_time_masks,
            "max_time_fraction": max_time_fraction, "mask_value": mask_value}


class DataAugmentation:
    """Seeded, batched augmentation for mel-spectrograms, emotion embeddings and note rolls.

    Args:
        seed: an int for repeatable draws, or None to use torch's global RNG.
        generator: alternatively, a ``torch.Generator`` to draw from (its device must match the
            inputs').

    Example:
        >>> aug = DataAugmentation(seed=0)
        >>> mel = torch.randn(8, 64, 128)              # [B, F, T]
        >>> out = aug.augment_audio_features(mel, noise_level=0.01)
        >>> out.shape == mel.shape and not out.equal(mel)
        True
    """

    def __init__(self, seed: int | None = None, generator: torch.Generator | None = None) -> None:
        if seed is not None and generator is not None:
            raise ValueError("pass seed or generator, not both")
        if seed is not None:
            check_int("seed", seed, low=0)
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
        self.seed = seed
        self._generators: dict[str, torch.Generator] = {}
        if generator is not None:
            self._generators[str(generator.device)] = generator
        self._banks: dict[str, tuple[int, torch.Tensor]] = {}
        self._bank_calls = 0
        self._bank_seed: int | None = None
        self._offsets: random.Random | None = None  # host-side ints for the bank view

    # ------------------------------------------------------------------ randomness
    def _gen(self, device: torch.device) -> torch.Generator | None:
        key = str(device)
        if key not in self._generators:
            if self.seed is None:
                return None
            self._generators[key] = torch.Generator(device).manual_seed(self.seed)
        return self._generators[key]

    def _rand(self, shape: tuple[int, ...], device: torch.device) -> torch.Tensor:
        return torch.rand(shape, generator=self._gen(device), device=device)

    def _randn_like(self, x: torch.Tensor) -> torch.Tensor:
        return torch.randn(x.shape, generator=self._gen(x.device), device=x.device, dtype=x.dtype)

    def _bank_noise(self, like: torch.Tensor) -> torch.Tensor:
        """A ``like``-shaped strided view of the noise bank (see the module docstring).

        Bank number ``k`` (one per ``_BANK_REFRESH`` calls) is drawn from its own generator
        seeded ``bank_seed + k``, so a restored augmenter rebuilds exactly the bank in use.
        """
        b, n = like.shape[0], like[0].numel()
        size = max(_BANK_SIZE, 2 * n)
        if self._bank_seed is None:
            # Drawn once from the seeded or global torch RNG, so runs repeat under a seed.
            g = self._gen(torch.device("cpu")) if self.seed is not None else None
            self._bank_seed = int(torch.randint(2**62, (1,), generator=g))
            self._offsets = random.Random(self._bank_seed)
        k = self._bank_calls // _BANK_REFRESH
        key = f"{like.device}/{like.dtype}"
        cached = self._banks.get(key)
        if cached is None or cached[0] != k or cached[1].numel() < size:
            gen = torch.Generator(like.device).manual_seed(self._bank_seed + k)
            cached = (k, torch.randn(size, generator=gen, device=like.device, dtype=like.dtype))
            self._banks[key] = cached
        self._bank_calls += 1
        bank = cached[1]
        room = bank.numel() - n
        stride = self._offsets.randint(1, max(1, room // max(b - 1, 1)))
        start = self._offsets.randint(0, room - stride * (b - 1))
        return bank.as_strided(like.shape, (stride, *like[0].stride()), start)

    # ------------------------------------------------------------------ audio
    def _band_masks(self, batch: int, n: int, param: int, count: int, cap: int,
                    device: torch.device) -> torch.Tensor:
        """``count`` masks per example along an axis of length ``n``: ``[batch, n]`` bool.

        Width ``w = floor(u * min(param, cap + 1))`` is uniform over ``0 .. min(param, cap+1)-1``;
        the start is uniform over ``0 .. n - w``.
        """
        if count == 0 or param == 0 or cap == 0:
            return torch.zeros(batch, n, dtype=torch.bool, device=device)
        eff = min(param, cap + 1)
        u = self._rand((2, batch, count), device)
        width = (u[0] * eff).floor().long()                         # [B, m]
        start = (u[1] * (n - width + 1)).floor().long()             # [B, m]
        pos = torch.arange(n, device=device).view(1, 1, n)          # [1, 1, n]
        inside = (pos >= start.unsqueeze(-1)) & (pos < (start + width).unsqueeze(-1))
        return inside.any(dim=1)                                    # [B, n]

    def augment_audio_features(
        self,
        mel: torch.Tensor,
        noise_level: float = 0.01,
        time_mask: bool = True,
        freq_mask: bool = True,
        *,
        policy: str | None = None,
        freq_mask_param: int = 15,
        num_freq_masks: int = 1,
        time_mask_param: int = 40,
        num_time_masks: int = 1,
        max_time_fraction: float = 0.2,
        mask_value: float | str = "mean",
        exact_noise: bool = False,
    ) -> torch.Tensor:
        """SpecAugment masks plus Gaussian noise on a (log-)mel spectrogram.

        Args:
            mel: ``[F, T]``, ``[B, F, T]`` or ``[B, C, F, T]`` (frequency bins F, frames T). Each
                example of the batch gets its own masks; the channels of one example share them.
            noise_level: noise standard deviation relative to each example's own standard
                deviation (so it means the same for dB, natural-log or normalised mels). 0: none.
            time_mask, freq_mask: switch the two kinds of mask.
            policy: one of the paper's ``'LB'``, ``'LD'``, ``'SM'``, ``'SS'``; it sets the five
                mask options below (explicit values are then ignored).
            freq_mask_param: F, the exclusive upper bound of a frequency mask's width.
            num_freq_masks: m_F.
            time_mask_param: T, the exclusive upper bound of a time mask's width.
            num_time_masks: m_T.
            max_time_fraction: p, a time mask is at most ``floor(p * frames)`` frames wide.
            mask_value: ``'mean'`` (each example's mean) or a number.
            exact_noise: draw fresh noise instead of reading the noise bank (slower).

        Widths are also capped so that masks of one kind can never cover the whole axis: each
        mask is at most ``(n - 1) // count`` wide, so at least one bin and one frame survive.

        Returns:
            A new tensor of ``mel``'s shape and dtype.
        """
        x = _check_float_tensor("mel", mel, (2, 3, 4))
        check_real("noise_level", noise_level, low=0.0)
        masks = _mask_options(policy, freq_mask_param, num_freq_masks, time_mask_param,
                              num_time_masks, max_time_fraction, mask_value)
        x4 = x.reshape(1, 1, *x.shape) if x.dim() == 2 else (x.unsqueeze(1) if x.dim() == 3 else x)
        x4 = x4.contiguous()                                        # [B, C, F, T]
        masking = time_mask or freq_mask
        mean = None
        if noise_level > 0 or (masking and mask_value == "mean"):
            # Two fast reductions (mean and L2) instead of a slow two-pass std.
            acc = torch.promote_types(x.dtype, torch.float32)  # float32, or float64 for float64
            mean = torch.mean(x4, dim=(1, 2, 3), keepdim=True, dtype=acc)
        out = self._noisy(x4, mean, noise_level, exact_noise) if noise_level > 0 else x4.clone()
        if masking:
            self._mask(out, mean, time_mask, freq_mask, **masks)
        return out.reshape(x.shape)

    def _noisy(self, x4: torch.Tensor, mean: torch.Tensor, noise_level: float,
               exact_noise: bool) -> torch.Tensor:
        """``x4 + noise * noise_level * std`` per example (``x4``: ``[B, C, F, T]``; ``mean``:
        its per-example mean, ``[B, 1, 1, 1]``)."""
        acc = mean.dtype
        n = x4[0].numel()
        sumsq = torch.linalg.vector_norm(x4, dim=(1, 2, 3), keepdim=True, dtype=acc)
        var = (sumsq.square() / n - mean.square()).clamp_min(0.0)
        scale = (var.sqrt() * noise_level).to(x4.dtype)             # [B, 1, 1, 1]
        noise = self._randn_like(x4) if exact_noise else self._bank_noise(x4)
        return torch.addcmul(x4, noise, scale)

    def _mask(self, out: torch.Tensor, mean: torch.Tensor | None, time_mask: bool,
              freq_mask: bool, freq_mask_param: int, num_freq_masks: int, time_mask_param: int,
              num_time_masks: int, max_time_fraction: float, mask_value: float | str) -> None:
        """SpecAugment's frequency and time masks on ``out`` (``[B, C, F, T]``), in place."""
        b, _, n_freq, n_time = out.shape
        dtype, device = out.dtype, out.device
        f_cap = (n_freq - 1) // max(num_freq_masks, 1)
        t_cap = min(int(max_time_fraction * n_time), (n_time - 1) // max(num_time_masks, 1))
        fm = self._band_masks(b, n_freq, freq_mask_param if freq_mask else 0,
                              num_freq_masks, f_cap, device)        # [B, F]
        tm = self._band_masks(b, n_time, time_mask_param if time_mask else 0,
                              num_time_masks, t_cap, device)        # [B, T]
        keep_f = (~fm).to(dtype)[:, None, :, None]                  # [B, 1, F, 1]
        keep_t = (~tm).to(dtype)[:, None, None, :]                  # [B, 1, 1, T]
        if mask_value == "mean":
            fill = mean.to(dtype)
        else:
            fill = torch.full((), float(mask_value), dtype=dtype, device=device)
        # Separable masks: (out - fill) * keep_f * keep_t + fill, all in place.
        out.sub_(fill).mul_(keep_f).mul_(keep_t).add_(fill)

    # ------------------------------------------------------------------ emotion
    def augment_emotion_embedding(
        self,
        emotion: torch.Tensor,
        noise_level: float = 0.05,
        *,
        clamp: tuple[float, float] | None = None,
        keep_unit_norm: bool = False,
    ) -> torch.Tensor:
        """Add Gaussian noise of standard deviation ``noise_level`` (absolute units).

        Args:
            emotion: ``[D]`` or ``[..., D]`` embedding(s).
            noise_level: noise standard deviation; >= 0.
            clamp: optional ``(low, high)`` range for the result (e.g. ``(-1, 1)`` for valence
                and arousal).
            keep_unit_norm: rescale each embedding to unit L2 norm after the noise.

        Returns:
            A new tensor of ``emotion``'s shape and dtype.
        """
        x = _check_float_tensor("emotion", emotion, (1, 2, 3))
        check_real("noise_level", noise_level, low=0.0)
        if clamp is not None:
            if not (isinstance(clamp, (tuple, list)) and len(clamp) == 2):
                raise TypeError(f"clamp must be a (low, high) pair, got {clamp!r}")
            lo = check_real("clamp[0]", clamp[0])
            hi = check_real("clamp[1]", clamp[1])
            if lo >= hi:
                raise ValueError(f"clamp must have low < high, got {clamp!r}")
        out = x + self._randn_like(x) * noise_level if noise_level > 0 else x.clone()
        if keep_unit_norm:
            out = torch.nn.functional.normalize(out, dim=-1)
        if clamp is not None:
            out = out.clamp(clamp[0], clamp[1])
        return out

    # ------------------------------------------------------------------ notes
    def augment_note_probabilities(
        self,
        notes: torch.Tensor,
        dropout_prob: float = 0.1,
        noise_level: float = 0.05,
        *,
        max_transpose: int = 0,
    ) -> torch.Tensor:
        """Drop notes, add noise and optionally transpose note probabilities; result in [0, 1].

        Args:
            notes: ``[P]``, ``[B, P]`` or ``[B, T, P]`` with the pitch axis last (P = 128 MIDI
                pitches for our models).
            dropout_prob: chance that each (example, time, pitch) entry is set to 0; in [0, 1).
            noise_level: standard deviation of added Gaussian noise (absolute, probability units).
            max_transpose: shift each example by a whole number of semitones drawn uniformly from
                ``[-max_transpose, max_transpose]``; pitches shifted past either end are dropped
                and vacated pitches are 0 (no wrap-around). One shift per example, all frames.

        Returns:
            A new tensor of ``notes``' shape and dtype, clamped to [0, 1].
        """
        x = _check_float_tensor("notes", notes, (1, 2, 3))
        check_real("dropout_prob", dropout_prob, low=0.0, high=1.0, high_inclusive=False)
        check_real("noise_level", noise_level, low=0.0)
        n_pitch = x.shape[-1]
        check_int("max_transpose", max_transpose, low=0, high=n_pitch - 1)
        x3 = x.reshape(1, 1, -1) if x.dim() == 1 else (x.unsqueeze(1) if x.dim() == 2 else x)
        b = x3.shape[0]                                             # [B, T, P]
        out = x3
        if max_transpose > 0:
            u = self._rand((b,), x.device)
            shift = (u * (2 * max_transpose + 1)).floor().long() - max_transpose   # [B]
            src = torch.arange(n_pitch, device=x.device).view(1, n_pitch) - shift.view(b, 1)
            valid = (src >= 0) & (src < n_pitch)                    # [B, P]
            idx = src.clamp(0, n_pitch - 1).unsqueeze(1).expand_as(x3)
            out = torch.gather(x3, 2, idx) * valid.unsqueeze(1).to(x.dtype)
        if dropout_prob > 0:
            keep = self._rand(tuple(x3.shape), x.device) >= dropout_prob
            out = out * keep.to(x.dtype)
        if noise_level > 0:
            out = out + self._randn_like(x3) * noise_level
        out = out.clamp(0.0, 1.0)
        return out.reshape(x.shape)

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """The seed and each device generator's state (CPU byte tensors)."""
        return {"seed": self.seed,
                "generators": {k: g.get_state() for k, g in self._generators.items()},
                "bank_calls": self._bank_calls, "bank_seed": self._bank_seed,
                "offsets": None if self._offsets is None else _plain(self._offsets.getstate())}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore from :meth:`state_dict`; later draws continue the saved streams."""
        self.seed = state["seed"]
        for key, st in state["generators"].items():
            gen = self._generators.get(key) or torch.Generator(torch.device(key))
            gen.set_state(st)
            self._generators[key] = gen
        self._bank_calls = int(state.get("bank_calls", 0))
        self._bank_seed = state.get("bank_seed")
        self._banks = {}  # rebuilt from (bank_seed, bank number) at the next call
        offsets = state.get("offsets")
        self._offsets = None
        if offsets is not None:
            self._offsets = random.Random()
            self._offsets.setstate((offsets[0], tuple(offsets[1]), offsets[2]))

    def __repr__(self) -> str:
        return f"DataAugmentation(seed={self.seed})"
