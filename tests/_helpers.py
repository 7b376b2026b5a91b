"""Small real models and loaders shared by the training tests."""

import torch


def make_data(n=96, seed=0, features=(8, 6), classes=3):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, *features, generator=g)
    y = (x.flatten(1)[:, :classes].argmax(-1)).long()
    return torch.utils.data.TensorDataset(x, y)


def make_loaders(n=96, batch_size=16, seed=0, features=(8, 6), shuffle=True):
    train = make_data(n, seed, features)
    val = make_data(n // 2, seed + 1, features)
    return (torch.utils.data.DataLoader(train, batch_size=batch_size, shuffle=shuffle),
            torch.utils.data.DataLoader(val, batch_size=batch_size))


def make_model(seed=0, features=(8, 6), classes=3):
    torch.manual_seed(seed)
    n = 1
    for f in features:
        n *= f
    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(n, 16), torch.nn.Tanh(),
                               torch.nn.Linear(16, classes))


def assert_equal_nan(actual, expected, nan_mask=None):
    """``actual`` equals ``expected`` exactly where it is not NaN, and is NaN exactly at
    ``nan_mask`` (default: where ``expected`` is NaN). Same shape and dtype."""
    import torch

    assert actual.shape == expected.shape and actual.dtype == expected.dtype
    mask = torch.isnan(expected) if nan_mask is None else nan_mask
    assert torch.equal(torch.isnan(actual), mask), "NaN where not expected (or missing)"
    assert torch.equal(actual[~mask], expected[~mask]), "values differ where not NaN"


class Boom(Exception):
    """The crash raised by :func:`crashing` (a test catches exactly this one)."""


def crashing(at, loss=torch.nn.functional.cross_entropy):
    """A criterion that computes ``loss`` but raises :class:`Boom` on its ``at``-th call (1-based):
    a run interrupted mid-training at a known batch."""
    calls = [0]

    def crit(out, y):
        calls[0] += 1
        if calls[0] == at:
            raise Boom()
        return loss(out, y)
    return crit
