"""The two on-disk layouts of a user's corpus, read into one listing (no audio is decoded here).

* **CSV** (``labels.csv``): one row per clip; a path column (relative to the CSV's folder, or
  absolute), one or more target columns, optionally a split column (train / val / test or any
  subset) and a group column (speaker, session: kept within one split).
* **Folder** (the audiofolder / ImageFolder convention): ``root/<class>/**/*.wav`` (also
  ``.flac``, ``.ogg``; hidden files and other endings are ignored), or with the split in the
  tree, ``root/<split>/<class>/...`` when every top-level folder is a split name and one is
  ``train``. Each file is its own group unless ``group_fn(path)`` names one.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .decode import AUDIO_EXTENSIONS
from .splits import _ALIASES, parse_split_labels
from .targets import parse_target_names

__all__ = ["Corpus", "read_csv_corpus", "read_folder_corpus"]


@dataclass
class Corpus:
    """A listing of clips: ``paths[i]`` with ``columns[name][i]`` per target, ``groups[i]`` and,
    when the layout says, ``split[i]`` (0 train, 1 val, 2 test; None: not given)."""

    layout: str                        # "csv" or "folder"
    source: Path
    paths: list[Path]
    columns: dict[str, list[str]]
    groups: list[str]
    split: np.ndarray | None

    def __len__(self) -> int:
        return len(self.paths)


def _read_rows(csv_path: Path) -> tuple[list[str], list[dict[str, str]]]:
    if not csv_path.is_file():
        raise FileNotFoundError(f"labels CSV {str(csv_path)!r} not found")
    with open(csv_path, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        header = [h.strip() for h in (reader.fieldnames or [])]
        reader.fieldnames = header
        rows = [r for r in reader if any((v or "").strip() for v in r.values() if isinstance(v, str))]
    if not header or not rows:
        raise ValueError(f"labels CSV {str(csv_path)!r} has no header or no data rows")
    return header, rows


def read_csv_corpus(csv_path: str | os.PathLike[str], target: str | Sequence[str],
                    path_column: str = "path", split_column: str | None = None,
                    group_column: str | None = None) -> Corpus:
    """Read ``csv_path`` (UTF-8, header row). Errors name the missing column or the bad row."""
    csv_path = Path(csv_path).absolute()
    header, rows = _read_rows(csv_path)
    names = parse_target_names(target)
    wanted = {"path_column": path_column, "split_column": split_column,
              "group_column": group_column, **{f"target {n!r}": n for n in names}}
    for arg, col in wanted.items():
        if col is not None and col not in header:
            raise ValueError(f"{arg}: column {col!r} not in {str(csv_path)!r}; columns: {header}")

    def cells(col: str) -> list[str]:
        return [(r.get(col) or "").strip() for r in rows]

    raw_paths = cells(path_column)
    for i, p in enumerate(raw_paths):
        if not p:
            raise ValueError(f"{str(csv_path)!r}, data row {i + 1}: empty {path_column!r} cell")
    paths = [Path(p) if os.path.isabs(p) else csv_path.parent / p for p in raw_paths]
    groups = cells(group_column) if group_column else [str(p) for p in paths]
    if group_column:
        for i, g in enumerate(groups):
            if not g:
                raise ValueError(f"{str(csv_path)!r}, data row {i + 1}: empty group "
                                 f"({group_column!r}) cell")
    split = parse_split_labels(cells(split_column), split_column) if split_column else None
    return Corpus("csv", csv_path, paths, {n: cells(n) for n in names}, groups, split)


def _audio_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*")
                  if p.suffix.lower() in AUDIO_EXTENSIONS and p.is_file()
                  and not any(part.startswith(".") for part in p.relative_to(folder).parts))


def _subdirs(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def read_folder_corpus(root: str | os.PathLike[str],
                       group_fn: Callable[[Path], str] | None = None) -> Corpus:
    """Read ``root/<class>/...`` or ``root/<split>/<class>/...``; the target column is
    ``"label"`` (the class folder's name)."""
    root = Path(root).absolute()
    if not root.is_dir():
        raise FileNotFoundError(f"data folder {str(root)!r} not found")
    top = _subdirs(root)
    names = [p.name.lower() for p in top]
    by_split = (bool(top) and all(n in _ALIASES for n in names)
                and any(_ALIASES[n] == 0 for n in names))          # root/<split>/<class>/...
    parts = [(p, _ALIASES[p.name.lower()]) for p in top] if by_split else [(root, -1)]
    paths: list[Path] = []
    labels: list[str] = []
    codes: list[int] = []
    for folder, code in parts:
        for cls in _subdirs(folder):
            files = _audio_files(cls)
            paths += files
            labels += [cls.name] * len(files)
            codes += [code] * len(files)
    if not paths:
        raise ValueError(f"data folder {str(root)!r} holds no audio files in class subfolders "
                         f"(expected root/<class>/*{{{','.join(AUDIO_EXTENSIONS)}}})")
    groups = [group_fn(p) if group_fn else str(p) for p in paths]
    split = np.array(codes, dtype=np.int64) if by_split else None
    return Corpus("folder", root, paths, {"label": labels}, [str(g) for g in groups], split)
