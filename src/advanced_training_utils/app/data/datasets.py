"""The two built-in tasks made from the Bach chorales.

* :func:`emotion_dataset`: rendered 4-second clips as log-mel spectrograms ``[1, 64, 251]`` with
  a 4-class emotion label (happy / calm / sad / tense) and valence/arousal values. Two variants
  (:data:`EMOTION_VARIANTS`): ``"varied"`` (task ``emotion``) keeps each piece's own key and draws
  a timbre, reverb and noise per clip (:mod:`.timbres`); ``"easy"`` (task ``emotion-easy``)
  transposes every clip to C and renders it with one timbre. Valence is the mode and arousal the
  tempo in both: the easy variant can be told by absolute pitch bands and one spectrum.
* :func:`notes_dataset`: emotion embeddings ``[3]`` (valence, arousal, density) -> note
  probabilities ``[128]``.

Both split by melody (see ``data/README.md``). Rendering is deterministic per seed and cached on
disk (``$ADVTRAIN_CACHE``, else ``$XDG_CACHE_HOME/advanced-training-utils``, else
``~/.cache/advanced-training-utils``: see :func:`cache_dir`).
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..._validate import check_choice, check_real
from ..audio.logmel import LogMel
from .chorales import Chorales, load_chorales
from .render import render_notes
from .timbres import apply_rooms, draw_rooms, render_timbre, tone_tables

__all__ = ["EMOTION_CLASSES", "EMOTION_VARIANTS", "Window", "chorale_windows", "emotion_clips",
           "emotion_dataset", "notes_dataset", "melody_splits", "training_subset", "cache_dir",
           "SLOW_BPM", "FAST_BPM"]

log = logging.getLogger(__name__)

EMOTION_CLASSES = ("happy", "calm", "sad", "tense")
#: ``"varied"``: original keys, a timbre and room per clip; ``"easy"``: in C, one timbre.
EMOTION_VARIANTS = ("varied", "easy")
SLOW_BPM = (50.0, 70.0)
FAST_BPM = (140.0, 180.0)
SPLIT_SEED = 2024
_VERSION = 1

# Krumhansl-Kessler key profiles (C major / C minor), rotated for other tonics.
_KK_MAJOR = np.array([6.35, 2.23, 3.48, 2.33, 4.38, 4.09, 2.52, 5.19, 2.39, 3.66, 2.29, 2.88])
_KK_MINOR = np.array([6.33, 2.68, 3.52, 5.38, 2.60, 3.53, 2.54, 4.75, 3.98, 2.69, 3.34, 3.17])


@dataclass(frozen=True)
class Window:
    """Two bars of one chorale, transposed so that the piece's tonic is C (unless
    :func:`chorale_windows` was asked to keep the key)."""

    piece: int
    start: int                  # in 16ths, in the original piece
    length: int                 # in 16ths
    notes: np.ndarray           # [N, 3] (onset in window, duration, pitch)
    mode: int                   # 1 major, 0 minor (the piece's)
    local_key_agrees: bool      # the window's own best key is the piece's key
    melody: int


def cache_dir() -> Path:
    """Where rendered datasets are cached, first found of:

    1. ``$ADVTRAIN_CACHE``, as given;
    2. ``$XDG_CACHE_HOME/advanced-training-utils`` (the XDG Base Directory spec: an empty or
       relative ``XDG_CACHE_HOME`` is ignored);
    3. ``~/.cache/advanced-training-utils``.

    An empty ``$ADVTRAIN_CACHE`` counts as unset.
    """
    own = os.environ.get("ADVTRAIN_CACHE")
    if own:
        return Path(own)
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg) if xdg and Path(xdg).is_absolute() else Path.home() / ".cache"
    return base / "advanced-training-utils"


def _local_keys(hists: np.ndarray) -> np.ndarray:
    """``[N, 12]`` duration-weighted pitch-class histograms -> ``[N, 2]`` (tonic, mode) whose
    rotated Krumhansl-Kessler profile correlates best (Pearson) with each histogram."""
    profiles = np.stack([np.roll(p, t) for p in (_KK_MAJOR, _KK_MINOR) for t in range(12)])
    z = lambda a: (a - a.mean(-1, keepdims=True)) / (a.std(-1, keepdims=True) + 1e-12)  # noqa: E731
    best = (z(hists) @ z(profiles).T).argmax(axis=1)       # [N] in 0..23
    return np.stack([best % 12, np.where(best < 12, 1, 0)], axis=1)


def chorale_windows(ch: Chorales | None = None, bars: int = 2, to_c: bool = True
                    ) -> list[Window]:
    """All ``bars``-bar windows, stepping one bar, transposed to C (``to_c=False``: in the
    piece's own key; the windows and their key agreement are the same either way)."""
    ch = ch or load_chorales()
    found = []
    for p in range(ch.num_pieces):
        notes = ch.notes_of(p)                              # voice, onset, dur, pitch
        bar = ch.bar_length(p)
        tonic = int(ch.piece_tonic[p])
        shift = ((6 - tonic) % 12) - 6 if to_c else 0       # smallest move of the tonic to C
        length = bars * bar
        for start in range(0, int(ch.piece_length[p]) - length + 1, bar):
            on, dur = notes[:, 1], notes[:, 2]
            sel = (on < start + length) & (on + dur > start)
            if not sel.any():
                continue
            w_on = np.maximum(on[sel], start) - start
            w_end = np.minimum(on[sel] + dur[sel], start + length) - start
            w = np.stack([w_on, w_end - w_on, notes[sel, 3] + shift], axis=1)
            hist = np.zeros(12)
            np.add.at(hist, notes[sel, 3] % 12, w[:, 1])
            found.append((p, start, length, w, tonic, hist))
    keys = _local_keys(np.stack([f[5] for f in found]))
    out = []
    for (p, start, length, w, tonic, _h), (k_tonic, k_mode) in zip(found, keys):
        mode = int(ch.piece_mode[p])
        out.append(Window(piece=p, start=start, length=length, notes=w, mode=mode,
                          local_key_agrees=(int(k_tonic), int(k_mode)) == (tonic, mode),
                          melody=int(ch.piece_melody[p])))
    return out


def melody_splits(melodies: np.ndarray, fractions: tuple[float, float] = (0.7, 0.15)
                  ) -> np.ndarray:
    """Per item 0 (train), 1 (val) or 2 (test), assigned by melody with a fixed seed."""
    uniq = np.unique(melodies)
    perm = np.random.default_rng(SPLIT_SEED).permutation(uniq)
    n_train = int(round(fractions[0] * len(uniq)))
    n_val = int(round(fractions[1] * len(uniq)))
    split_of = {m: 0 for m in perm[:n_train]}
    split_of.update({m: 1 for m in perm[n_train:n_train + n_val]})
    split_of.update({m: 2 for m in perm[n_train + n_val:]})
    return np.array([split_of[m] for m in melodies], dtype=np.int64)


def _pick(windows: list[Window], per_piece: int | None) -> list[Window]:
    """At most ``per_piece`` evenly spaced windows of each piece."""
    if per_piece is None:
        return windows
    by_piece: dict[int, list[Window]] = {}
    for w in windows:
        by_piece.setdefault(w.piece, []).append(w)
    out = []
    for ws in by_piece.values():
        idx = np.linspace(0, len(ws) - 1, num=min(per_piece, len(ws))).round().astype(int)
        out.extend(ws[i] for i in sorted(set(idx.tolist())))
    return out


def _render(windows: list[Window], bpm: np.ndarray, seed: int, seconds: float, variant: str
            ) -> tuple[np.ndarray, np.ndarray | None]:
    """The clips' waveforms ``[N, n]`` and, for ``"varied"``, each clip's timbre index."""
    if variant == "easy":
        return np.stack([render_notes(w.notes, float(b), seconds=seconds, loop_length=w.length)
                         for w, b in zip(windows, bpm)]), None
    rooms = draw_rooms(np.random.default_rng([seed, 1]), len(windows))  # tempo keeps rng(seed)
    tables = tone_tables(np.concatenate([w.notes[:, 2] for w in windows]), seconds, 16000)
    dry = np.stack([render_timbre(w.notes, float(b), room.timbre, tables, seconds=seconds,
                                  loop_length=w.length)
                    for w, b, room in zip(windows, bpm, rooms)])
    return apply_rooms(dry, rooms, seed), np.array([room.timbre for room in rooms])


def emotion_clips(seed: int = 0, per_piece: int | None = 6, seconds: float = 4.0,
                  variant: str = "varied") -> dict[str, np.ndarray]:
    """The emotion task's clips as waveforms (what :func:`emotion_dataset` turns into mels).

    Args:
        seed: drives each clip's tempo range and tempo (and, ``"varied"``, its timbre, reverb
            and noise); same seed, same clips.
        per_piece: at most this many key-agreeing windows per chorale (None: all).
        seconds: clip length.
        variant: ``"varied"`` (each piece in its own key; a timbre, reverb and noise drawn per
            clip, :mod:`.timbres`) or ``"easy"`` (every clip in C, one timbre). Both have the
            same windows, tempi, labels and splits for a seed.

    Returns:
        dict of arrays: ``wave`` ``[N, round(seconds * 16000)]`` float32 at 16 kHz, ``label``
        ``[N]`` (index into ``EMOTION_CLASSES``), ``valence``, ``arousal``, ``bpm``, ``melody``,
        ``piece``, ``split`` ``[N]`` (0 train, 1 val, 2 test); ``"varied"`` adds ``timbre``
        (index into :data:`.timbres.TIMBRES`).
    """
    check_choice("variant", variant, EMOTION_VARIANTS)
    windows = _pick([w for w in chorale_windows(to_c=variant == "easy") if w.local_key_agrees],
                    per_piece)
    rng = np.random.default_rng(seed)
    fast = rng.random(len(windows)) < 0.5
    lo = np.where(fast, FAST_BPM[0], SLOW_BPM[0])
    hi = np.where(fast, FAST_BPM[1], SLOW_BPM[1])
    bpm = lo + (hi - lo) * rng.random(len(windows))
    waves, timbre = _render(windows, bpm, seed, seconds, variant)
    mode = np.array([w.mode for w in windows])
    melody = np.array([w.melody for w in windows])
    out = {
        "wave": waves,
        "label": np.where(mode == 1, np.where(fast, 0, 1), np.where(fast, 3, 2)),
        "valence": np.where(mode == 1, 1.0, -1.0),
        "arousal": np.clip((bpm - 110.0) / 70.0, -1.0, 1.0),
        "bpm": bpm,
        "melody": melody,
        "piece": np.array([w.piece for w in windows]),
        "split": melody_splits(melody),
    }
    return out if timbre is None else {**out, "timbre": timbre}


def training_subset(melodies: np.ndarray, split: np.ndarray, fraction: float, seed: int
                    ) -> np.ndarray:
    """Which items to train on when only ``fraction`` of the training split is used.

    Whole melodies are kept (a seeded permutation of the training melodies, its first
    ``max(1, round(fraction * n))``), so a smaller fraction's subset lies inside a larger one's
    for the same ``seed``; validation and test items are always kept.

    Returns:
        ``[N]`` bool: False for the training items left out.
    """
    check_real("train_fraction", fraction, low=0.0, high=1.0, low_inclusive=False)
    train = np.unique(melodies[split == 0])
    order = np.random.default_rng([seed, 2]).permutation(train)
    kept = order[:max(1, int(round(fraction * len(train))))]
    return (split != 0) | np.isin(melodies, kept)


def emotion_dataset(seed: int = 0, per_piece: int | None = 6, seconds: float = 4.0,
                    use_cache: bool = True, variant: str = "varied") -> dict[str, torch.Tensor]:
    """The emotion-recognition task: rendered clips (:func:`emotion_clips`) as log-mel
    spectrograms.

    Args:
        seed: drives each clip's tempo range and tempo (and, ``"varied"``, its timbre, reverb
            and noise); same seed, same data.
        per_piece: at most this many key-agreeing windows per chorale (None: all).
        seconds: clip length.
        use_cache: read/write the rendered tensors under :func:`cache_dir` (one file per
            variant, seed, ``per_piece`` and ``seconds``).
        variant: ``"varied"`` or ``"easy"`` (:func:`emotion_clips`).

    Returns:
        dict of tensors: ``mel`` ``[N, 1, 64, T]`` float32, ``label`` ``[N]`` (index into
        ``EMOTION_CLASSES``), ``valence`` and ``arousal`` ``[N]`` in [-1, 1], ``bpm``,
        ``melody``, ``piece``, ``split`` ``[N]`` (0 train, 1 val, 2 test); ``"varied"`` adds
        ``timbre``.
    """
    check_choice("variant", variant, EMOTION_VARIANTS)
    spec = f"emotion-{variant}-v{_VERSION}-{seed}-{per_piece}-{seconds}"
    path = cache_dir() / f"emotion-{variant}-{hashlib.sha256(spec.encode()).hexdigest()[:16]}.pt"
    if use_cache and path.exists():
        try:
            return torch.load(path, weights_only=True)
        except Exception:  # a broken cache file is re-rendered
            log.warning("cache %s unreadable; rendering again", path)
    t0 = time.perf_counter()
    clips = emotion_clips(seed, per_piece, seconds, variant)
    waves = clips["wave"]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small STFTs: one thread is several times faster here
    try:
        to_mel = LogMel.chorale()  # an nn.Module: .to(device) moves its window and filters
        mel = torch.cat([to_mel(torch.from_numpy(waves[i:i + 256]))
                         for i in range(0, len(waves), 256)]).unsqueeze(1)
    finally:
        torch.set_num_threads(threads)
    out = {
        "mel": mel.float(),
        "label": torch.from_numpy(clips["label"]).long(),
        "valence": torch.from_numpy(clips["valence"]).float(),
        "arousal": torch.from_numpy(clips["arousal"]).float(),
        "bpm": torch.from_numpy(clips["bpm"]).float(),
        "melody": torch.from_numpy(clips["melody"]).long(),
        "piece": torch.from_numpy(clips["piece"]).long(),
        "split": torch.from_numpy(clips["split"]),
        **({"timbre": torch.from_numpy(clips["timbre"]).long()} if "timbre" in clips else {}),
    }
    log.info("rendered %d emotion clips in %.1fs", len(waves), time.perf_counter() - t0)
    if use_cache:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        torch.save(out, tmp)
        os.replace(tmp, path)
    return out


def _scale(x: np.ndarray) -> np.ndarray:
    lo, hi = x.min(), x.max()
    return (2.0 * (x - lo) / (hi - lo) - 1.0) if hi > lo else np.zeros_like(x)


def notes_dataset() -> dict[str, torch.Tensor]:
    """The emotion-to-notes task over every two-bar window.

    Returns:
        dict of tensors: ``emotion`` ``[N, 3]`` (valence +-1 by mode; arousal = onset rate and
        density = distinct pitches, each scaled to [-1, 1] over the corpus), ``notes`` ``[N, 128]``
        (fraction of the window each MIDI pitch sounds), ``roll`` ``[N, 32, 128]`` (the piano
        roll on the 16th grid, for 4/4 windows; others are cut or zero-padded to 32 steps),
        ``length`` (window length in 16ths), ``melody``, ``split``.
    """
    windows = chorale_windows()
    n = len(windows)
    roll = np.zeros((n, 32, 128), dtype=np.float32)
    probs = np.zeros((n, 128), dtype=np.float32)
    rate = np.zeros(n)
    distinct = np.zeros(n)
    for i, w in enumerate(windows):
        sounding = np.zeros((w.length, 128), dtype=np.float32)
        for on, dur, pitch in w.notes:
            sounding[on:on + dur, pitch] = 1.0
        probs[i] = sounding.mean(axis=0)
        roll[i, :min(32, w.length)] = sounding[:32]
        rate[i] = len(w.notes) / w.length
        distinct[i] = len(np.unique(w.notes[:, 2]))
    valence = np.array([1.0 if w.mode == 1 else -1.0 for w in windows])
    emotion = np.stack([valence, _scale(rate), _scale(distinct)], axis=1).astype(np.float32)
    melody = np.array([w.melody for w in windows])
    return {
        "emotion": torch.from_numpy(emotion),
        "notes": torch.from_numpy(probs),
        "roll": torch.from_numpy(roll),
        "length": torch.tensor([w.length for w in windows]).long(),
        "melody": torch.from_numpy(melody).long(),
        "split": torch.from_numpy(melody_splits(melody)),
    }
