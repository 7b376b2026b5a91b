import numpy as np
import pytest

from advanced_training_utils.app.audio.splits import (
    assign_groups,
    carve_val,
    grouped_split,
    leaking_groups,
    parse_split_labels,
)


def _groups(n_groups=40, seed=0):
    """Groups of 1..9 items each, interleaved as rows of a real CSV would be."""
    sizes = np.random.default_rng(seed).integers(1, 10, n_groups)
    groups = [f"spk{g}" for g, s in enumerate(sizes) for _ in range(s)]
    return list(np.random.default_rng(seed + 1).permutation(groups))


def _assert_grouped(split, groups):
    for g in set(groups):
        assert len({int(s) for s, h in zip(split, groups) if h == g}) == 1, g


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_grouped_split_keeps_groups_whole_and_follows_item_fractions(seed):
    groups = _groups(seed=seed)
    split = grouped_split(groups)
    _assert_grouped(split, groups)
    counts = np.bincount(split, minlength=3) / len(groups)
    assert counts == pytest.approx([0.8, 0.1, 0.1], abs=9 / len(groups))  # within one group
    assert leaking_groups(split, groups) == []


def test_same_seed_same_split_other_seed_other_split():
    groups = _groups()
    assert np.array_equal(grouped_split(groups, seed=7), grouped_split(list(groups), seed=7))
    assert not np.array_equal(grouped_split(groups, seed=7), grouped_split(groups, seed=8))
    # the row order does not matter, only the groups
    order = np.random.default_rng(5).permutation(len(groups))
    shuffled = [groups[i] for i in order]
    assert np.array_equal(grouped_split(shuffled, seed=7), grouped_split(groups, seed=7)[order])


def test_every_wanted_split_gets_a_group_when_there_are_enough():
    groups = ["a", "a", "a", "a", "b", "c"]          # midpoints alone would leave val empty
    split = grouped_split(groups)
    assert set(split.tolist()) == {0, 1, 2}
    _assert_grouped(split, groups)
    assert set(grouped_split(["a", "b"]).tolist()) <= {0, 1, 2}   # too few: no crash


def test_carve_val_moves_whole_train_groups_only():
    groups = _groups(60)
    given = np.where(np.array([int(g[3:]) for g in groups]) % 5 == 0, 2, 0)  # test as given
    split = carve_val(given, groups, 0.1)
    assert np.array_equal(split[given == 2], given[given == 2])           # test untouched
    assert set(split[given == 0].tolist()) == {0, 1}
    _assert_grouped(split, groups)
    n_train = (given == 0).sum()
    assert (split == 1).sum() / n_train == pytest.approx(0.1, abs=9 / n_train)
    assert np.array_equal(split, carve_val(given, groups, 0.1))           # fixed seed


def test_parse_split_labels_aliases_and_errors():
    got = parse_split_labels(["train", "TRAINING", " val", "valid", "Validation", "dev", "test",
                              "testing"])
    assert got.tolist() == [0, 0, 1, 1, 1, 1, 2, 2]
    with pytest.raises(ValueError, match=r"fold column, data row 2: 'holdout' is not a split "
                                         r"name; allowed: dev, test, .*train"):
        parse_split_labels(["train", "holdout"], "fold")


@pytest.mark.parametrize("fractions, match", [
    ((0.8, 0.1), r"fractions must be non-empty and sum to 1"),
    ((1.2, -0.1, -0.1), r"fractions\[0\] must be in \[0, 1\], got 1.2"),
])
def test_fraction_validation(fractions, match):
    with pytest.raises(ValueError, match=match):
        assign_groups(["a", "b"], fractions)


def test_leaking_groups_reports_groups_in_two_splits():
    assert leaking_groups(np.array([0, 2, 1]), ["x", "x", "y"]) == ["x"]
