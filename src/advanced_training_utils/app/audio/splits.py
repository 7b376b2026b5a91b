"""Train / val / test assignment that keeps every group (speaker, session, ...) in one split.

Split codes are 0 (train), 1 (val), 2 (test). Groups are shuffled with a fixed seed and laid end
to end in that order; a group goes to the split in which the midpoint of its items falls, so the
split sizes follow the requested fractions of *items* (not of groups) as closely as whole groups
allow. A split asked for with a positive fraction receives at least one group whenever another
split has more than one to give. Same groups and seed, same assignment.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ..._validate import check_int, check_real

__all__ = ["SPLITS", "SPLIT_SEED", "assign_groups", "carve_val", "grouped_split",
           "leaking_groups", "parse_split_labels"]

SPLITS = ("train", "val", "test")
SPLIT_SEED = 2024

_ALIASES = {"train": 0, "training": 0, "val": 1, "valid": 1, "validation": 1, "dev": 1,
            "test": 2, "testing": 2}


def parse_split_labels(values: Sequence[str], column: str = "split") -> np.ndarray:
    """Split names -> codes ``[N]`` int64. Accepted (case-insensitive): train/training,
    val/valid/validation/dev, test/testing; anything else is a ``ValueError`` naming the row."""
    out = np.empty(len(values), dtype=np.int64)
    for i, v in enumerate(values):
        code = _ALIASES.get(str(v).strip().lower())
        if code is None:
            raise ValueError(f"{column} column, data row {i + 1}: {v!r} is not a split name; "
                             f"allowed: {', '.join(sorted(_ALIASES))}")
        out[i] = code
    return out


def assign_groups(groups: Sequence[object], fractions: Sequence[float],
                  seed: int = SPLIT_SEED) -> np.ndarray:
    """Per item, the index of its part (0 .. len(fractions) - 1), whole groups at a time.

    Args:
        groups: ``[N]`` group of each item (compared as strings).
        fractions: target share of items per part, each >= 0, summing to 1 (within 1e-6).
        seed: shuffles the groups.
    """
    fr = [check_real(f"fractions[{i}]", f, low=0.0, high=1.0) for i, f in enumerate(fractions)]
    if not fr or abs(sum(fr) - 1.0) > 1e-6:
        raise ValueError(f"fractions must be non-empty and sum to 1, got {list(fractions)}")
    seed = check_int("seed", seed)
    keys = np.array([str(g) for g in groups])
    uniq, inverse, sizes = np.unique(keys, return_inverse=True, return_counts=True)
    order = np.random.default_rng(seed).permutation(len(uniq))
    bounds = np.cumsum(fr)                                        # [P] upper edge of each part
    part_of = np.empty(len(uniq), dtype=np.int64)
    start = 0
    for g in order:
        mid = (start + sizes[g] / 2.0) / max(len(keys), 1)
        part_of[g] = min(int(np.searchsorted(bounds, mid, side="right")), len(fr) - 1)
        start += sizes[g]
    _fill_empty_parts(part_of, order, fr)
    return part_of[inverse]


def _fill_empty_parts(part_of: np.ndarray, order: np.ndarray, fractions: list[float]) -> None:
    """Give each wanted-but-empty part the last group (in shuffled order) of the fullest part."""
    for p, f in enumerate(fractions):
        counts = np.bincount(part_of, minlength=len(fractions))
        if f <= 0 or counts[p] > 0:
            continue
        donor = int(counts.argmax())
        if counts[donor] < 2:
            continue
        last = [g for g in order if part_of[g] == donor][-1]
        part_of[last] = p


def grouped_split(groups: Sequence[object], fractions: tuple[float, float, float] = (0.8, 0.1, 0.1),
                  seed: int = SPLIT_SEED) -> np.ndarray:
    """Split codes ``[N]`` (0 train, 1 val, 2 test), 80/10/10 of the items by default."""
    if len(fractions) != 3:
        raise ValueError(f"fractions must be (train, val, test), got {fractions}")
    return assign_groups(groups, fractions, seed)


def carve_val(split: np.ndarray, groups: Sequence[object], val_fraction: float = 0.1,
              seed: int = SPLIT_SEED) -> np.ndarray:
    """A copy of ``split`` with about ``val_fraction`` of the training items, whole groups,
    moved to val (code 1). Other splits are untouched."""
    val_fraction = check_real("val_fraction", val_fraction, low=0.0, high=1.0,
                              low_inclusive=False, high_inclusive=False)
    out = np.array(split, dtype=np.int64, copy=True)
    train = np.flatnonzero(out == 0)
    keys = [groups[i] for i in train]
    part = assign_groups(keys, (1.0 - val_fraction, val_fraction), seed)
    out[train[part == 1]] = 1
    return out


def leaking_groups(split: np.ndarray, groups: Sequence[object]) -> list[str]:
    """Groups (as strings, sorted) whose items lie in more than one split."""
    seen: dict[str, set[int]] = {}
    for s, g in zip(np.asarray(split).tolist(), groups):
        seen.setdefault(str(g), set()).add(s)
    return sorted(g for g, s in seen.items() if len(s) > 1)
