"""Datasets over a user's audio corpus: a ``labels.csv`` or a folder of class subfolders.

One call reads the layout, splits it, decodes and featurises every clip once (through the disk
cache), and returns the train / val / test datasets with a summary for ``summary.json``::

    train, val, test, summary = CsvAudioDataset.from_csv(
        "corpus/labels.csv", target="emotion", group_column="speaker")
    train, val, test, summary = AudioFolderDataset.from_folder("corpus/")
    loader = DataLoader(train, batch_size=32, shuffle=True)   # x [32, 1, 64, F], y [32]

Items are ``(x, y)``: ``x`` float32 ``[1, n_mels, frames]``; ``y`` an int64 class index
(classification) or float32 ``[K]`` (regression, one value per target column).

**Splits.** A split column (or ``root/<split>/<class>`` folders) is used as given; when it has
no val rows, val is carved from train, whole groups at a time, ``val_fraction`` (10 %) of the
training items, with a fixed seed. Without one, a grouped 80/10/10 split of the items is drawn
(groups: ``group_column``, else each file alone). See :mod:`.splits`.

**Lengths.** Training crops or pads every clip to ``crop_seconds`` (default: the 90th percentile
of training durations rounded up to 0.1 s, capped at ``max_crop_seconds``; see :mod:`.framing`)
with a random window per epoch; evaluation uses the centre window of the same length
(``eval_crop="center"``, default) or the whole clip (``eval_crop="whole"``: variable length, use
``batch_size=1`` or ``collate_fn=dataset.collate``).

**Normalisation** per utterance (default), with training-set statistics, or none: see
:mod:`.normalize`. **Bad files** (see :class:`AudioError`) are skipped and listed in the summary
with their problem (``on_error="skip"``, default) or stop the build (``on_error="raise"``).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from torch.utils.data import Dataset

from ..._validate import check_int
from .cache import FeatureCache
from .corpus import Corpus, read_csv_corpus, read_folder_corpus
from .features import Extracted, FeatureExtractor
from .framing import center_offset, choose_crop_seconds, crop_or_pad, random_offset
from .logmel import LogMel
from .normalize import dataset_stats, normalize
from .options import AudioOptions
from .splits import SPLITS, carve_val, grouped_split, leaking_groups
from .targets import encode_targets

__all__ = ["AudioDataset", "AudioFolderDataset", "AudioSplits", "CsvAudioDataset",
           "load_audio_splits"]


class AudioDataset(Dataset):
    """One split: features ``[n_mels, F_i]`` per clip, cropped/padded on access.

    Args:
        features: per clip, float32 ``[n_mels, F_i]`` (already normalised).
        targets: int64 ``[N]`` or float32 ``[N, K]``.
        paths: per clip, its file (for reports).
        crop_frames: frames per item; None: the whole clip.
        train: random window (per ``(seed, epoch, index)``) instead of the centre one.
        seed: the crop seed; :meth:`set_epoch` selects the epoch's windows.
        pad_value: fill for clips shorter than ``crop_frames``.
        task, class_names, target_names: what the targets mean.
        norm_stats: the training-set ``(mean, std)`` ``[n_mels, 1]`` when features were
            normalised with them (store them with a model to featurise new audio alike).
    """

    def __init__(self, features: Sequence[torch.Tensor], targets: torch.Tensor, *,
                 paths: Sequence[str] = (), crop_frames: int | None = None, train: bool = False,
                 seed: int = 0, pad_value: float = 0.0, task: str = "classification",
                 class_names: Sequence[str] | None = None,
                 target_names: Sequence[str] = (),
                 norm_stats: tuple[torch.Tensor, torch.Tensor] | None = None) -> None:
        if len(features) != len(targets):
            raise ValueError(f"features and targets differ in length: {len(features)} vs "
                             f"{len(targets)}")
        self.features = list(features)
        self.targets = targets
        self.paths = [str(p) for p in paths]
        self.crop_frames = None if crop_frames is None else check_int("crop_frames", crop_frames,
                                                                      low=1)
        self.train = bool(train)
        self.seed = check_int("seed", seed, low=0)
        self.epoch = 0
        self.pad_value = float(pad_value)
        self.task = task
        self.class_names = None if class_names is None else list(class_names)
        self.target_names = list(target_names)
        self.norm_stats = norm_stats

    def __len__(self) -> int:
        return len(self.features)

    def set_epoch(self, epoch: int) -> None:
        """Choose the training windows of ``epoch`` (call once per epoch, like a sampler's)."""
        self.epoch = check_int("epoch", epoch, low=0)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.features[index]                                 # [n_mels, F]
        if self.crop_frames is not None:
            n = x.shape[-1]
            off = (random_offset(n, self.crop_frames, self.seed, self.epoch, index) if self.train
                   else center_offset(n, self.crop_frames))
            x = crop_or_pad(x, self.crop_frames, off, self.pad_value)
        return x.unsqueeze(0), self.targets[index]               # [1, n_mels, frames]

    def collate(self, batch: Sequence[tuple[torch.Tensor, torch.Tensor]]
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """Stack items of different lengths, right-padding with ``pad_value`` to the longest."""
        longest = max(x.shape[-1] for x, _ in batch)
        xs = [crop_or_pad(x, longest, 0, self.pad_value) for x, _ in batch]
        return torch.stack(xs), torch.stack([y for _, y in batch])


@dataclass
class _Prepared:
    corpus: Corpus
    options: AudioOptions
    logmel: LogMel
    targets: np.ndarray
    task: str
    class_names: list[str] | None
    split: np.ndarray
    split_rule: str
    got: Extracted
    cache: FeatureCache
    warnings: list[str] = field(default_factory=list)


class AudioSplits(NamedTuple):
    """``train, val, test, summary``; ``test`` is None when the layout assigns no test clips."""

    train: AudioDataset
    val: AudioDataset
    test: AudioDataset | None
    summary: dict[str, Any]


def _split_codes(corpus: Corpus, opts: AudioOptions) -> tuple[np.ndarray, str, list[str]]:
    """``(codes [N], rule, warnings)`` for every row, before any file is decoded (a broken file
    never moves another file to a different split)."""
    fr = opts.split_fractions
    if corpus.split is None:
        codes = grouped_split(corpus.groups, fr, opts.split_seed)
        rule = (f"grouped {fr[0]:.0%}/{fr[1]:.0%}/{fr[2]:.0%} of items by group, "
                f"seed {opts.split_seed}")
        return codes, rule, []
    codes = corpus.split
    if not (codes == 0).any():
        raise ValueError(f"{corpus.source}: the split assigns no clip to train (found "
                         f"{sorted({SPLITS[c] for c in codes.tolist()})}); train is required")
    rule = "as given"
    if not (codes == 1).any():
        codes = carve_val(codes, corpus.groups, opts.val_fraction, opts.split_seed)
        rule = (f"as given; val carved from train: {opts.val_fraction:.0%} of its items by "
                f"group, seed {opts.split_seed}")
    leaks = leaking_groups(codes, corpus.groups)
    warnings = [f"groups in more than one split (leak): {leaks[:10]}"] if leaks else []
    return codes, rule, warnings


def _prepare(corpus: Corpus, opts: AudioOptions) -> _Prepared:
    targets, task, class_names = encode_targets(corpus.columns, opts.task)
    split, rule, warnings = _split_codes(corpus, opts)
    for k in (0, 1):
        if not (split == k).any():
            raise ValueError(f"{corpus.source}: no clip lands in {SPLITS[k]} ({len(corpus)} clips "
                             f"in {len(set(corpus.groups))} groups); add clips or groups, or give "
                             "a split column")
    logmel = opts.features if opts.features is not None else LogMel()
    cache = FeatureCache(opts.cache_dir, enabled=opts.use_cache)
    got = FeatureExtractor(logmel, cache, allow_silent=opts.allow_silent).extract_all(
        corpus.paths, opts.on_error)
    if not got.kept:
        raise ValueError(f"{corpus.source}: none of the {len(corpus)} files could be used; first "
                         f"problems: {got.skipped[:3]}")
    return _Prepared(corpus, opts, logmel, targets, task, class_names, split, rule, got, cache,
                     warnings)


def _crop_seconds(p: _Prepared, train_samples: list[int]) -> tuple[float, str]:
    if p.options.crop_seconds is not None:
        return float(p.options.crop_seconds), "given"
    sr = p.logmel.sample_rate
    seconds = choose_crop_seconds([s / sr for s in train_samples],
                                  max_seconds=p.options.max_crop_seconds)
    return seconds, (f"90th percentile of training durations rounded up to 0.1 s, capped at "
                     f"{p.options.max_crop_seconds:g} s")


def _build(cls: type[AudioDataset], corpus: Corpus, opts: AudioOptions) -> AudioSplits:
    p = _prepare(corpus, opts)
    got, kept = p.got, np.asarray(p.got.kept, dtype=np.int64)
    split_of = p.split[kept]                                      # [n_kept]
    train_pos = np.flatnonzero(split_of == 0).tolist()
    if not train_pos:
        raise ValueError(f"{corpus.source}: every training file was skipped; problems: "
                         f"{got.skipped[:3]}")
    seconds, crop_rule = _crop_seconds(p, [got.samples[i] for i in train_pos])
    crop = p.logmel.frames(int(round(seconds * p.logmel.sample_rate)))
    stats = (dataset_stats([got.features[i] for i in train_pos])
             if opts.normalization == "dataset" else None)
    feats = [normalize(f, opts.normalization, stats) for f in got.features]
    pad = math.log(p.logmel.eps) if opts.normalization == "none" else 0.0
    seed = (int(torch.randint(0, 2**62, (1,), generator=opts.generator))
            if opts.generator is not None else 0)
    targets = torch.from_numpy(p.targets[kept])
    parts: dict[int, AudioDataset] = {}
    for code in (0, 1, 2):
        pos = np.flatnonzero(split_of == code).tolist()
        if code == 2 and not (p.split == 2).any():
            continue
        parts[code] = cls(
            [feats[i] for i in pos], targets[pos],
            paths=[str(corpus.paths[kept[i]]) for i in pos],
            crop_frames=crop if code == 0 or opts.eval_crop == "center" else None,
            train=code == 0, seed=seed, pad_value=pad, task=p.task,
            class_names=p.class_names, target_names=list(corpus.columns), norm_stats=stats)
        if not pos:
            p.warnings.append(f"every {SPLITS[code]} file was skipped: {SPLITS[code]} is empty")
    summary = _summary(p, parts, seconds, crop, crop_rule, [got.samples[i] for i in train_pos])
    return AudioSplits(parts[0], parts[1], parts.get(2), summary)


def _summary(p: _Prepared, parts: dict[int, AudioDataset], seconds: float, crop: int,
             crop_rule: str, train_samples: list[int]) -> dict[str, Any]:
    """JSON-ready account of the build (for ``summary.json`` and the report)."""
    sr = p.logmel.sample_rate
    dur = np.asarray(train_samples, dtype=np.float64) / sr
    if p.class_names is not None:
        present = set(p.targets[p.got.kept].tolist())
        empty = [c for i, c in enumerate(p.class_names) if i not in present]
        if empty:
            p.warnings.append(f"classes with no usable file: {empty}")
    return {
        "layout": p.corpus.layout, "source": str(p.corpus.source), "task": p.task,
        "target_names": list(p.corpus.columns), "class_names": p.class_names,
        "split_sizes": {SPLITS[k]: len(d) for k, d in parts.items()},
        "split_rule": p.split_rule, "sample_rate": sr, "features": p.logmel.params(),
        "crop_seconds": seconds, "crop_frames": crop, "crop_rule": crop_rule,
        "eval_crop": p.options.eval_crop, "normalization": p.options.normalization,
        "train_durations_s": {k: round(float(f(dur)), 3) for k, f in (
            ("min", np.min), ("median", np.median), ("p90", lambda d: np.percentile(d, 90)),
            ("max", np.max))} if len(dur) else {},
        "n_skipped": len(p.got.skipped), "skipped": p.got.skipped,
        "cache": {"dir": str(p.cache.dir), "enabled": p.cache.enabled, "hits": p.cache.hits,
                  "misses": p.cache.misses},
        "warnings": p.warnings,
    }


class CsvAudioDataset(AudioDataset):
    """An :class:`AudioDataset` read from a ``labels.csv`` (see :meth:`from_csv`)."""

    @classmethod
    def from_csv(cls, csv_path: str | os.PathLike[str], target: str | Sequence[str],
                 path_column: str = "path", split_column: str | None = None,
                 group_column: str | None = None, **options: Any) -> AudioSplits:
        """``(train, val, test, summary)`` from ``csv_path``.

        Args:
            csv_path: UTF-8 CSV with a header row; paths relative to its folder.
            target: one column (``"emotion"``) or several numeric ones (``"valence,arousal"``).
            path_column, split_column, group_column: column names (see the module docstring).
            **options: fields of :class:`AudioOptions`.
        """
        opts = AudioOptions(**options)
        corpus = read_csv_corpus(csv_path, target, path_column, split_column, group_column)
        return _build(cls, corpus, opts)


class AudioFolderDataset(AudioDataset):
    """An :class:`AudioDataset` read from class subfolders (see :meth:`from_folder`)."""

    @classmethod
    def from_folder(cls, root: str | os.PathLike[str],
                    group_fn: Callable[[Path], str] | None = None, **options: Any) -> AudioSplits:
        """``(train, val, test, summary)`` from ``root/<class>/...`` or
        ``root/<split>/<class>/...``; ``group_fn(path)`` names a file's group (default: itself).
        ``**options``: fields of :class:`AudioOptions` (``task`` is classification)."""
        if options.get("task", "classification") != "classification":
            raise ValueError(f"task must be 'classification' for a folder of class subfolders, "
                             f"got {options['task']!r}")
        opts = AudioOptions(**{**options, "task": "classification"})
        return _build(cls, read_folder_corpus(root, group_fn), opts)


def load_audio_splits(data: str | os.PathLike[str], target: str | Sequence[str] | None = None,
                      path_column: str = "path", split_column: str | None = None,
                      group_column: str | None = None, **options: Any) -> AudioSplits:
    """What ``advtrain train --data`` does: a ``.csv`` file -> :meth:`CsvAudioDataset.from_csv`,
    a folder -> :meth:`AudioFolderDataset.from_folder` (then ``target``, ``split_column`` and
    ``group_column`` must be None: the folders say them)."""
    path = Path(data)
    if path.is_dir():
        given = {"target": target, "split_column": split_column, "group_column": group_column}
        bad = [k for k, v in given.items() if v is not None]
        if bad:
            raise ValueError(f"data={str(data)!r} is a folder (classes from subfolders); {bad} "
                             "apply to a labels CSV only")
        return AudioFolderDataset.from_folder(path, **options)
    if path.suffix.lower() == ".csv":
        if target is None:
            raise ValueError(f"data={str(data)!r} is a CSV: target must name its label column(s)")
        return CsvAudioDataset.from_csv(path, target, path_column, split_column, group_column,
                                        **options)
    raise ValueError(f"data must be a labels .csv file or a folder of class subfolders, got "
                     f"{str(data)!r}" + ("" if path.exists() else " (not found)"))
