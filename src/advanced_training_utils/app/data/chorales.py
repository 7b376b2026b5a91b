"""Load the built-in Bach chorales (``bach_chorales.npz``) with numpy only."""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

__all__ = ["Chorales", "load_chorales", "DATA_FILE"]

DATA_FILE = Path(__file__).with_name("bach_chorales.npz")


@dataclass(frozen=True)
class Chorales:
    """Notes (one row each) and per-piece metadata; see ``data/README.md`` for the fields."""

    note_piece: np.ndarray
    note_voice: np.ndarray
    note_onset: np.ndarray
    note_duration: np.ndarray
    note_pitch: np.ndarray
    piece_name: np.ndarray
    piece_mode: np.ndarray
    piece_tonic: np.ndarray
    piece_meter_num: np.ndarray
    piece_meter_den: np.ndarray
    piece_length: np.ndarray
    piece_melody: np.ndarray

    @property
    def num_pieces(self) -> int:
        return len(self.piece_name)

    def notes_of(self, piece: int) -> np.ndarray:
        """``[N, 4]`` int array of (voice, onset, duration, pitch) for one piece."""
        sel = self.note_piece == piece
        return np.stack([self.note_voice[sel], self.note_onset[sel], self.note_duration[sel],
                         self.note_pitch[sel]], axis=1).astype(np.int64)

    def bar_length(self, piece: int) -> int:
        """One bar in 16ths."""
        return int(self.piece_meter_num[piece]) * 16 // int(self.piece_meter_den[piece])


@lru_cache(maxsize=2)
def load_chorales(path: str | Path = DATA_FILE) -> Chorales:
    """Read the ``.npz`` into a :class:`Chorales` (cached per path)."""
    with np.load(path) as d:
        return Chorales(**{k: d[k] for k in d.files})
