"""Resumable data order: a mid-epoch resume is bit-exact for every kind of shuffling loader."""

import logging
import random

import pytest
import torch
from torch.utils.data import (
    BatchSampler,
    DataLoader,
    IterableDataset,
    RandomSampler,
    SubsetRandomSampler,
    WeightedRandomSampler,
)

from _helpers import Boom, crashing, make_data
from advanced_training_utils import train_model_advanced
from advanced_training_utils.engine.dataorder import find_generators

CE = torch.nn.CrossEntropyLoss()
N, BS = 96, 8  # 12 batches per epoch




class Reshuffled:
    """A new user's loader: not a DataLoader; reshuffles from a global RNG when iterated."""

    def __init__(self, ds, rng="torch", per_batch_noise=False):
        self.x, self.y = ds.tensors
        self.rng, self.per_batch_noise = rng, per_batch_noise

    def __iter__(self):
        if self.rng == "torch":
            perm = torch.randperm(len(self.x)).tolist()
        else:
            perm = list(range(len(self.x)))
            random.shuffle(perm)
        for i in range(0, len(perm), BS):
            j = perm[i:i + BS]
            x = self.x[j]
            if self.per_batch_noise:  # draws while yielding: cannot be replayed exactly
                x = x + 0.01 * torch.randn_like(x)
            yield x, self.y[j]


class SizedReshuffled(Reshuffled):
    def __len__(self):
        return len(self.x) // BS


class ShuffledStream(IterableDataset):
    def __init__(self, ds):
        self.x, self.y = ds.tensors

    def __len__(self):
        return len(self.x)

    def __iter__(self):
        for i in torch.randperm(len(self.x)).tolist():
            yield self.x[i], self.y[i]


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _python_seeded(loader):
    random.seed(0)  # the library seeds torch only; the user's script seeds python's RNG
    return loader


def _weights():
    return torch.rand(N, generator=_gen(9)) + 0.1


LOADERS = {  # each call builds the loader afresh, as a user's script does on every start
    "shuffle": lambda ds: DataLoader(ds, batch_size=BS, shuffle=True),
    "loader_generator": lambda ds: DataLoader(ds, batch_size=BS, shuffle=True,
                                              generator=_gen(3)),
    "random_sampler_generator": lambda ds: DataLoader(
        ds, batch_size=BS, sampler=RandomSampler(ds, generator=_gen(4))),
    "random_sampler_replacement": lambda ds: DataLoader(
        ds, batch_size=BS, sampler=RandomSampler(ds, replacement=True, generator=_gen(4))),
    "weighted_sampler_generator": lambda ds: DataLoader(
        ds, batch_size=BS, sampler=WeightedRandomSampler(_weights(), N, generator=_gen(5))),
    "subset_sampler_generator": lambda ds: DataLoader(
        ds, batch_size=BS, sampler=SubsetRandomSampler(range(N), generator=_gen(6))),
    "batch_sampler_generator": lambda ds: DataLoader(
        ds, batch_sampler=BatchSampler(RandomSampler(ds, generator=_gen(7)), BS, False)),
    "both_generators": lambda ds: DataLoader(
        ds, batch_size=BS, sampler=RandomSampler(ds, generator=_gen(4)), generator=_gen(8)),
    "iterable_torch_reshuffle": lambda ds: SizedReshuffled(ds),
    "iterable_python_reshuffle": lambda ds: _python_seeded(SizedReshuffled(ds, rng="python")),
    "iterable_no_len": lambda ds: Reshuffled(ds),
    "iterable_dataset_loader": lambda ds: DataLoader(ShuffledStream(ds), batch_size=BS),
    "iterable_dataset_loader_generator": lambda ds: DataLoader(ShuffledStream(ds),
                                                               batch_size=BS,
                                                               generator=_gen(2)),
}

OPTS = dict(epochs=3, learning_rate=3e-3, device="cpu", verbose=False, seed=0,
            scheduler_type="cosine", restore_best_weights=False, model_name="m",
            checkpoint_every_n_steps=1)


def _model(seed=1):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(48, 32), torch.nn.ReLU(),
                               torch.nn.Dropout(0.3), torch.nn.Linear(32, 3))




def _strip(history):
    """History without timings, NaN (no val_loader) as None so that entries compare equal."""
    return [{k: None if v != v else v for k, v in e.items() if k != "seconds"} for e in history]


def _crash_and_resume(tmp_path, make_loader, crash_at, **extra):
    ds = make_data(N)
    with pytest.raises(Boom):
        train_model_advanced(_model(), make_loader(ds), None, crashing(crash_at),
                             checkpoint_dir=tmp_path, **OPTS, **extra)
    resumed = _model(seed=7)  # another init: the weights must come from the checkpoint
    res = train_model_advanced(resumed, make_loader(ds), None, CE, checkpoint_dir=tmp_path,
                               resume=True, **OPTS, **extra)
    return resumed, res


@pytest.mark.parametrize("kind", list(LOADERS))
@pytest.mark.parametrize("crash_at", [17, 30])  # mid-epoch 2 and mid-epoch 3
def test_mid_epoch_resume_is_bit_exact_for_every_loader_kind(tmp_path, kind, crash_at, caplog):
    ds = make_data(N)
    ref = _model()
    r_ref = train_model_advanced(ref, LOADERS[kind](ds), None, CE,
                                 checkpoint_dir=tmp_path / "ref", **OPTS)
    resumed, res = _crash_and_resume(tmp_path / "c", LOADERS[kind], crash_at)
    for a, b in zip(ref.parameters(), resumed.parameters()):
        assert torch.equal(a, b)
    assert _strip(res["history"]) == _strip(r_ref["history"])
    assert "not bit-exact" not in caplog.text


def test_epoch_end_resume_restores_the_loader_generator(tmp_path):
    """Stop after epoch 1 (a normal end), resume for 3 epochs: epochs 2-3 draw the same order."""
    ds = make_data(N)
    opts = {**OPTS, "use_scheduler": False}  # no schedule horizon tied to epochs
    ref = _model()
    train_model_advanced(ref, LOADERS["loader_generator"](ds), None, CE,
                         checkpoint_dir=tmp_path / "ref", **opts)
    train_model_advanced(_model(), LOADERS["loader_generator"](ds), None, CE,
                         checkpoint_dir=tmp_path / "c", **{**opts, "epochs": 1})
    resumed = _model(seed=7)
    train_model_advanced(resumed, LOADERS["loader_generator"](ds), None, CE,
                         checkpoint_dir=tmp_path / "c", resume=True, **opts)
    for a, b in zip(ref.parameters(), resumed.parameters()):
        assert torch.equal(a, b)


def test_iterable_drawing_per_batch_is_reported(tmp_path, caplog):
    """Per-batch draws inside the iterable interleave with the model's: the resume says it is
    not exact instead of staying silent."""
    with caplog.at_level(logging.WARNING):
        _crash_and_resume(tmp_path, lambda ds: SizedReshuffled(ds, per_batch_noise=True), 17)
    assert "draws random numbers while it yields batches" in caplog.text


def test_changed_generators_on_resume_are_refused(tmp_path):
    ds = make_data(N)
    with pytest.raises(Boom):
        train_model_advanced(_model(), LOADERS["loader_generator"](ds), None, crashing(17),
                             checkpoint_dir=tmp_path, **OPTS)
    with pytest.raises(ValueError, match=r"recorded 1 torch.Generator\(s\).*have 0"):
        train_model_advanced(_model(), LOADERS["shuffle"](ds), None, CE, checkpoint_dir=tmp_path,
                             resume=True, **OPTS)


def test_find_generators_follows_samplers_once_each():
    ds = make_data(16)
    g1, g2, g3 = _gen(1), _gen(2), _gen(3)
    loader = DataLoader(ds, batch_sampler=BatchSampler(RandomSampler(ds, generator=g2), 4, False),
                        generator=g1)
    assert find_generators(loader) == [g1, g2]
    shared = DataLoader(ds, batch_size=4, shuffle=True, generator=g1)  # sampler shares g1
    assert find_generators(shared) == [g1]
    stream = ShuffledStream(ds)
    stream.generator = g3
    assert find_generators(DataLoader(stream, batch_size=4), shared) == [g3, g1]
    assert find_generators([1, 2], None) == []
