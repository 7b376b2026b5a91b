"""The training loop against plain hand-written loops: accumulation windows weighted by example
counts (short last batch, short last window), loaders with and without ``__len__``, and
non-finite validation batches."""

import logging
import math

import pytest
import torch

from advanced_training_utils import train_model_advanced

MSE = torch.nn.MSELoss()
QUIET = dict(verbose=False, device="cpu", use_scheduler=False, gradient_clip=None,
             restore_best_weights=False, seed=0)


def _data(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 6, generator=g)
    return x, torch.tanh(x[:, :2] * 1.5) + 0.1 * torch.randn(n, 2, generator=g)


def _model():
    torch.manual_seed(3)
    return torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))


class _Stream(torch.utils.data.IterableDataset):
    """Examples one at a time, no ``__len__`` (a DataLoader batches them)."""

    def __init__(self, x, y):
        self.x, self.y = x, y

    def __iter__(self):
        return iter(zip(self.x, self.y))


class _Batches:
    """A re-iterable of (x, y) batches with no ``__len__``: a generator per epoch."""

    def __init__(self, x, y, bs):
        self.x, self.y, self.bs = x, y, bs

    def __iter__(self):
        for i in range(0, len(self.x), self.bs):
            yield self.x[i:i + self.bs], self.y[i:i + self.bs]


def _loader(kind, x, y, bs):
    if kind == "map":
        return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=bs)
    if kind == "iterable_dataset":
        return torch.utils.data.DataLoader(_Stream(x, y), batch_size=bs)
    return _Batches(x, y, bs)


_OPTIMIZERS = {
    "sgd": lambda p: torch.optim.SGD(p, lr=0.1),
    "adamw": lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.01, fused=True),
}


def _reference(x, y, bs, accum, opt_name, epochs):
    """One big batch per accumulation window (the last window holds what is left)."""
    model = _model()
    opt = _OPTIMIZERS[opt_name](model.parameters())
    window = bs * accum
    for _ in range(epochs):
        for i in range(0, len(x), window):
            opt.zero_grad(set_to_none=True)
            MSE(model(x[i:i + window]), y[i:i + window]).backward()
            opt.step()
    return model


# (examples, batch size, accumulation): short last micro-batch (28 = 8+8+8+4), last windows of
# 1, 2 and 3 micro-batches for accumulation 4 (and 2 for 3), fewer batches than one window,
# dividing sizes, and no accumulation.
_TRIPLES = [(28, 8, 4), (36, 8, 4), (80, 8, 4), (88, 8, 4), (92, 8, 4), (20, 4, 3),
            (23, 4, 3), (10, 3, 5), (64, 8, 4), (28, 8, 1)]


@pytest.mark.parametrize("recovery", [True, False])
@pytest.mark.parametrize("opt_name", list(_OPTIMIZERS))
@pytest.mark.parametrize("kind", ["map", "iterable_dataset", "plain"])
@pytest.mark.parametrize("n, bs, accum", _TRIPLES)
def test_accumulation_equals_one_big_batch_per_window(n, bs, accum, kind, opt_name, recovery,
                                                      caplog):
    x, y = _data(n)
    ours = _model()
    with caplog.at_level(logging.WARNING, logger="advanced_training_utils"):
        res = train_model_advanced(ours, _loader(kind, x, y, bs), None, MSE, epochs=2,
                                   accumulation_steps=accum, optimizer=_OPTIMIZERS[opt_name],
                                   recovery=recovery, **QUIET)
    assert not caplog.records  # every window closed where it should (no end-of-epoch fix-up)
    ref = _reference(x, y, bs, accum, opt_name, epochs=2)
    for a, b in zip(ours.parameters(), ref.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    assert res["skipped_steps"] == 0
    assert not torch.equal(ours[0].weight, _model()[0].weight)  # it did train


def test_accumulation_train_loss_is_the_example_mean():
    x, y = _data(28)
    model = _model()
    res = train_model_advanced(model, _loader("plain", x, y, 8), None, MSE, epochs=1,
                               accumulation_steps=4, optimizer=_OPTIMIZERS["sgd"], **QUIET)
    with torch.no_grad():
        expected = MSE(_model()(x), y).item()  # one step: every batch saw the initial weights
    assert res["history"][0]["train_loss"] == pytest.approx(expected, rel=1e-6)


def test_loader_without_len_trains_and_onecycle_is_refused():
    x, y = _data(40)
    loader = _loader("iterable_dataset", x, y, 8)
    with pytest.raises(TypeError):
        len(loader)  # the case: torch's DataLoader over an IterableDataset has no len()
    val = _loader("iterable_dataset", *_data(16, seed=1), 8)
    res = train_model_advanced(_model(), loader, val, MSE, epochs=2, **{**QUIET,
                               "verbose": True})  # verbose: a progress bar without a total
    assert res["epochs_run"] == 2 and math.isfinite(res["history"][-1]["val_loss"])
    with pytest.raises(ValueError, match="'onecycle' needs a train_loader with a length"):
        train_model_advanced(_model(), loader, None, MSE, epochs=1,
                             **{**QUIET, "use_scheduler": True, "scheduler_type": "onecycle"})


class _NanOnEpoch:
    """Validation batches; on the chosen pass, one batch's inputs are NaN."""

    def __init__(self, x, y, bs, bad_pass, bad_batch):
        self.x, self.y, self.bs, self.bad_pass, self.bad_batch = x, y, bs, bad_pass, bad_batch
        self.passes = 0

    def __iter__(self):
        self.passes += 1
        for j, i in enumerate(range(0, len(self.x), self.bs)):
            xb = self.x[i:i + self.bs]
            if self.passes == self.bad_pass and j == self.bad_batch:
                xb = torch.full_like(xb, math.nan)
            yield xb, self.y[i:i + self.bs]


def test_nonfinite_validation_batch_makes_val_loss_nan_and_is_never_best(caplog):
    x, y = _data(64)
    vx, vy = _data(32, seed=1)
    vy[24:] += 50.0  # the last batch has a large loss: dropping it would flatter the epoch
    val = _NanOnEpoch(vx, vy, 8, bad_pass=3, bad_batch=3)
    with caplog.at_level(logging.WARNING, logger="advanced_training_utils"):
        res = train_model_advanced(_model(), _loader("map", x, y, 8), val, MSE, epochs=4,
                                   optimizer=_OPTIMIZERS["sgd"], **QUIET)
    h = res["history"]
    assert [e["nonfinite_val_examples"] for e in h] == [0, 0, 8, 0]
    assert math.isnan(h[2]["val_loss"]) and not h[2]["improved"]
    assert all(math.isfinite(e["val_loss"]) for e in (h[0], h[1], h[3]))
    assert res["best_epoch"] != 3
    assert res["best_val_loss"] == min(e["val_loss"] for e in (h[0], h[1], h[3]))
    warned = [r for r in caplog.records if r.levelno == logging.WARNING
              and "non-finite loss" in r.getMessage()]
    assert len(warned) == 1 and "epoch 3" in warned[0].getMessage()
