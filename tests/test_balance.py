"""engine/balance.py: class_weights='balanced' (scikit-learn's weights, applied to CE/NLL,
saved and returned) and sampler='balanced' (WeightedRandomSampler draws through the recorded
epoch order: mid-epoch resume bit-exact; sharded under DDP)."""

import json
import logging
from typing import get_args

import numpy as np
import pytest
import torch
import torch.distributed as dist
from sklearn.utils.class_weight import compute_class_weight
from torch.utils.data import (
    BatchSampler,
    DataLoader,
    Dataset,
    IterableDataset,
    RandomSampler,
    Subset,
    TensorDataset,
    WeightedRandomSampler,
)

from _helpers import Boom, crashing
from advanced_training_utils import checkpoint as ck
from advanced_training_utils import train_model_advanced
from advanced_training_utils.engine.balance import (
    BalancedSampler,
    balanced_loader,
    balanced_weights,
    training_labels,
    weigh_criterion,
)
from advanced_training_utils.engine.config import (
    CLASS_WEIGHT_MODES,
    FIXED,
    RESUME_RULES,
    SAMPLER_MODES,
    TrainConfig,
)
from advanced_training_utils.engine.distributed import DistContext, ShardedSampler
from advanced_training_utils.engine.options import ClassWeightsMode, SamplerMode

CPU = torch.device("cpu")
COUNTS = (40, 15, 5)  # an imbalanced toy set: 60 items, classes 0..2
N, BS = sum(COUNTS), 8


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _labels(counts=COUNTS, seed=0):
    y = torch.cat([torch.full((n,), c) for c, n in enumerate(counts)])
    return y[torch.randperm(len(y), generator=_gen(seed))]


def _data(counts=COUNTS, seed=0):
    y = _labels(counts, seed)
    x = torch.randn(len(y), 6, generator=_gen(seed + 1)) + y[:, None].float()
    return TensorDataset(x, y)


def _model(seed=1, log_softmax=False):
    torch.manual_seed(seed)
    layers = [torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3)]
    return torch.nn.Sequential(*layers, *([torch.nn.LogSoftmax(-1)] if log_softmax else []))


def _cfg(**kw):
    return TrainConfig.from_options(**kw)


def _sklearn(y, n_classes):
    return torch.from_numpy(compute_class_weight("balanced", classes=np.arange(n_classes),
                                                 y=np.asarray(y)))


class Targets(Dataset):
    """A torchvision-style dataset: ``targets`` list and ``classes``."""

    def __init__(self, ds, classes=None):
        self.ds, self.targets = ds, ds.tensors[1].tolist()
        if classes is not None:
            self.classes = classes

    def __len__(self):
        return len(self.ds)

    def __getitem__(self, i):
        return self.ds[i]


class Plain(Dataset):
    """No labels attribute: read by one pass (items as (x, int label))."""

    def __init__(self, ds):
        self.ds = ds

    def __len__(self):
        return len(self.ds)

    def __getitem__(self, i):
        x, y = self.ds[i]
        torch.rand(1)  # a dataset that draws: the pass must leave the global RNG as it was
        return x, int(y)


class Stream(IterableDataset):
    def __init__(self, ds):
        self.ds = ds

    def __iter__(self):
        return iter(self.ds)


# ---------------------------------------------------------------------------- the weights
@pytest.mark.parametrize("counts", [(40, 15, 5), (1, 1, 10, 100), (7, 3), (5, 5, 5)])
def test_weights_equal_scikit_learns_compute_class_weight(counts):
    y = _labels(counts)
    expected = _sklearn(y, len(counts))
    assert torch.equal(balanced_weights(y), expected)  # float64, same arithmetic: exact


LABEL_SOURCES = {  # where training_labels reads them from; each in dataset index order
    "tensor_dataset": lambda ds: DataLoader(ds, batch_size=BS, shuffle=True),
    "targets_attribute": lambda ds: DataLoader(Targets(ds), batch_size=BS, shuffle=True),
    "subset": lambda ds: DataLoader(Subset(Targets(ds), list(range(N))), batch_size=BS),
    "one_pass_map_style": lambda ds: DataLoader(Plain(ds), batch_size=BS, shuffle=True,
                                                generator=_gen(3)),
    "one_pass_unbatched": lambda ds: DataLoader(Plain(ds), batch_size=None),
    "one_pass_iterable_dataset": lambda ds: DataLoader(Stream(ds), batch_size=BS),
    "one_pass_list_of_batches": lambda ds: [(ds.tensors[0][i:i + BS], ds.tensors[1][i:i + BS])
                                            for i in range(0, N, BS)],
}


@pytest.mark.parametrize("source", list(LABEL_SOURCES))
def test_labels_are_read_in_index_order_with_every_rng_untouched(source):
    ds = _data()
    loader = LABEL_SOURCES[source](ds)
    gen = getattr(loader, "generator", None)
    torch.manual_seed(5)
    before, gen_before = torch.get_rng_state(), gen.get_state() if gen is not None else None
    labels = training_labels(loader)
    assert labels.dtype == torch.int64 and torch.equal(labels, ds.tensors[1])
    assert torch.equal(torch.get_rng_state(), before)
    if gen is not None:
        assert torch.equal(gen.get_state(), gen_before)


@pytest.mark.parametrize("source", ["tensor_dataset", "targets_attribute", "one_pass_map_style",
                                    "one_pass_list_of_batches"])
@pytest.mark.parametrize("loss", [torch.nn.CrossEntropyLoss, torch.nn.NLLLoss])
def test_the_criterion_gets_sklearns_weights_on_a_copy(source, loss):
    ds = _data()
    user = loss()
    crit, part = weigh_criterion(user, LABEL_SOURCES[source](ds), _cfg(class_weights="balanced"),
                                 CPU)
    expected = _sklearn(ds.tensors[1], 3)
    assert user.weight is None and crit is not user and type(crit) is loss
    assert torch.equal(crit.weight, expected.float())
    assert part.as_list() == expected.tolist()
    assert torch.equal(part.state_dict()["weights"], expected)


def test_the_weights_take_the_models_float_type():
    crit, _ = weigh_criterion(torch.nn.CrossEntropyLoss(), DataLoader(_data()),
                              _cfg(class_weights="balanced"), CPU, torch.float64)
    assert crit.weight.dtype == torch.float64


def test_labels_at_ignore_index_are_not_counted():
    ds = _data()
    y = ds.tensors[1].clone()
    y[:10] = -100
    crit, _ = weigh_criterion(torch.nn.CrossEntropyLoss(), DataLoader(TensorDataset(
        ds.tensors[0], y)), _cfg(class_weights="balanced"), CPU)
    assert torch.equal(crit.weight, _sklearn(y[10:], 3).float())


def test_off_leaves_the_criterion_alone():
    user = torch.nn.CrossEntropyLoss()
    crit, part = weigh_criterion(user, DataLoader(_data()), _cfg(), CPU)
    assert crit is user and part.as_list() is None and part.state_dict() is None


@pytest.mark.parametrize("criterion, match", [
    (torch.nn.MSELoss(), r"class_weights='balanced' applies to torch\.nn\.CrossEntropyLoss or "
                         r"torch\.nn\.NLLLoss .*got criterion of type MSELoss"),
    (torch.nn.BCEWithLogitsLoss(), r"CrossEntropyLoss or .*NLLLoss.*BCEWithLogitsLoss"),
    (lambda out, y: torch.nn.functional.cross_entropy(out, y),
     r"CrossEntropyLoss or .*NLLLoss.*of type function"),
    (torch.nn.CrossEntropyLoss(weight=torch.ones(3)),
     r"would replace the weight your CrossEntropyLoss already has"),
])
def test_an_unsupported_criterion_is_refused_by_name(criterion, match):
    with pytest.raises(ValueError, match=match):
        weigh_criterion(criterion, DataLoader(_data()), _cfg(class_weights="balanced"), CPU)
    with pytest.raises(ValueError, match=match):  # before any step of a run
        train_model_advanced(_model(), DataLoader(_data()), None, criterion, epochs=1,
                             device="cpu", verbose=False, class_weights="balanced")


@pytest.mark.parametrize("classes, match", [
    (None, r"class\(es\) 1 have no training example"),
    (["calm", "angry", "sad", "happy"], r"class\(es\) 1 \('angry'\), 3 \('happy'\) have no "),
])
def test_a_class_without_training_labels_is_an_error_naming_it(classes, match):
    ds = _data(counts=(10, 0, 6))
    with pytest.raises(ValueError, match=match):
        weigh_criterion(torch.nn.CrossEntropyLoss(), DataLoader(Targets(ds, classes)),
                        _cfg(class_weights="balanced"), CPU)


@pytest.mark.parametrize("y, match", [
    (torch.rand(N), r"class_weights='balanced' needs integer class labels; .* torch\.float32"),
    (torch.zeros(N, 2, dtype=torch.int64), r"one class label per item .* shape \(60, 2\)"),
])
def test_labels_that_are_not_class_indices_are_refused(y, match):
    loader = DataLoader(TensorDataset(torch.randn(N, 6), y))
    with pytest.raises(ValueError, match=match):
        weigh_criterion(torch.nn.CrossEntropyLoss(), loader, _cfg(class_weights="balanced"), CPU)


def test_a_model_with_more_outputs_than_weighted_classes_is_named_at_the_first_batch():
    ds = _data(counts=(10, 6))  # two classes in the labels, three outputs
    with pytest.raises(ValueError, match=r"class weight has 2 entries for a model with 3 outputs"):
        train_model_advanced(_model(), DataLoader(ds, batch_size=BS), None,
                             torch.nn.CrossEntropyLoss(), epochs=1, device="cpu", verbose=False,
                             class_weights="balanced")


# ---------------------------------------------------------------------------- in a run
PLAIN = dict(epochs=2, learning_rate=0.1, device="cpu", verbose=False, seed=0,
             use_scheduler=False, gradient_clip=None, recovery=False,
             restore_best_weights=False, optimizer=lambda p: torch.optim.SGD(p, lr=0.1))


def _hand_loop(model, loader, criterion, epochs=2):
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(epochs):
        for x, y in loader:
            opt.zero_grad()
            criterion(model(x), y).backward()
            opt.step()
    return model


@pytest.mark.parametrize("loss, log_softmax", [(torch.nn.CrossEntropyLoss, False),
                                               (torch.nn.NLLLoss, True)])
def test_a_run_trains_on_the_weighted_loss_as_a_hand_loop_does(loss, log_softmax):
    ds = _data()
    ours = _model(log_softmax=log_softmax)
    res = train_model_advanced(ours, DataLoader(ds, batch_size=BS), None, loss(),
                               class_weights="balanced", **PLAIN)
    w = _sklearn(ds.tensors[1], 3)
    ref = _hand_loop(_model(log_softmax=log_softmax), DataLoader(ds, batch_size=BS),
                     loss(weight=w.float()))
    unweighted = _hand_loop(_model(log_softmax=log_softmax), DataLoader(ds, batch_size=BS),
                            loss())
    for a, b, c in zip(ours.parameters(), ref.parameters(), unweighted.parameters()):
        assert torch.equal(a, b)
        assert not torch.allclose(a, c, rtol=0, atol=1e-4)  # the weights changed the training
    assert res["class_weights"] == w.tolist()


def test_the_weights_are_saved_in_the_checkpoint_and_a_resume_uses_the_saved_ones(tmp_path,
                                                                                   caplog):
    opts = {**PLAIN, "epochs": 1, "checkpoint_dir": tmp_path, "model_name": "m"}
    first = _data()
    res = train_model_advanced(_model(), DataLoader(first, batch_size=BS), None,
                               torch.nn.CrossEntropyLoss(), class_weights="balanced", **opts)
    saved = ck.load_checkpoint(res["last_checkpoint"])[ck.CLASS_WEIGHTS_KEY]["weights"]
    expected = _sklearn(first.tensors[1], 3)
    assert torch.equal(saved, expected) and res["class_weights"] == expected.tolist()
    other = _data(counts=(20, 20, 20))  # other labels: the resume keeps the saved weights
    with caplog.at_level(logging.WARNING):
        res2 = train_model_advanced(_model(), DataLoader(other, batch_size=BS), None,
                                    torch.nn.CrossEntropyLoss(), class_weights="balanced",
                                    resume=True, **{**opts, "epochs": 2})
    assert res2["class_weights"] == expected.tolist()
    assert "differ from the ones this run's labels give" in caplog.text
    assert ck.load_checkpoint(res2["last_checkpoint"])[ck.CLASS_WEIGHTS_KEY] is not None


def test_off_the_result_and_checkpoint_hold_none(tmp_path):
    res = train_model_advanced(_model(), DataLoader(_data(), batch_size=BS), None,
                               torch.nn.CrossEntropyLoss(), checkpoint_dir=tmp_path,
                               **{**PLAIN, "epochs": 1})
    assert res["class_weights"] is None
    assert ck.load_checkpoint(res["last_checkpoint"])[ck.CLASS_WEIGHTS_KEY] is None


# ---------------------------------------------------------------------------- the options
def test_the_options_name_their_allowed_values_and_are_fixed_on_resume():
    assert get_args(ClassWeightsMode) == CLASS_WEIGHT_MODES == ("balanced",)
    assert get_args(SamplerMode) == SAMPLER_MODES == ("balanced",)
    for name in ("class_weights", "sampler"):
        with pytest.raises(ValueError, match=rf"{name} must be one of 'balanced'; got 'inverse'"):
            TrainConfig.from_options(**{name: "inverse"})
        assert RESUME_RULES[name][0] == FIXED


# ---------------------------------------------------------------------------- the sampler
def test_the_balanced_sampler_draws_as_weighted_random_sampler_with_inverse_counts():
    y = _labels()
    per_item = 1.0 / torch.tensor(COUNTS, dtype=torch.float64)[y]
    ours = list(BalancedSampler(y, generator=_gen(0)))
    torch_own = list(WeightedRandomSampler(per_item, N, replacement=True, generator=_gen(0)))
    assert ours == torch_own and len(ours) == N


def test_the_balanced_sampler_draws_each_class_about_equally_often():
    """counts 900/90/10; 200 epochs of 1000 draws. Each class has probability 1/3 per draw, so
    its frequency over n = 200,000 draws has standard deviation sqrt(p(1-p)/n) = 0.00105: a
    tolerance of 0.006 is > 5 standard deviations (the draws are seeded, so the test is
    deterministic; the margin says it is not tuned to the seed). Without balancing class 2
    would have frequency 0.01."""
    y = _labels((900, 90, 10))
    s = BalancedSampler(y, generator=_gen(0))
    drawn = torch.cat([y[torch.tensor(list(s))] for _ in range(200)])
    freq = torch.bincount(drawn, minlength=3).double() / len(drawn)
    assert torch.allclose(freq, torch.full((3,), 1 / 3, dtype=torch.float64), rtol=0, atol=0.006)


def test_set_epoch_is_passed_to_the_dataset():
    class WithEpoch(Targets):
        epoch = None

        def set_epoch(self, e):
            self.epoch = e

    ds = WithEpoch(_data())
    BalancedSampler(torch.as_tensor(ds.targets), ds).set_epoch(4)
    assert ds.epoch == 4


def test_the_rebuilt_loader_keeps_the_loaders_options():
    def collate(items):
        return torch.stack([x for x, _ in items]), torch.tensor([int(y) for _, y in items])

    ds = _data()
    loader = DataLoader(ds, batch_size=7, shuffle=True, drop_last=True, collate_fn=collate,
                        generator=_gen(2))
    new = balanced_loader(loader, _cfg(sampler="balanced", seed=3))
    assert isinstance(new.sampler, BalancedSampler) and new.dataset is ds
    assert (new.batch_size, new.drop_last, new.collate_fn, new.generator) == (
        7, True, collate, loader.generator)
    assert list(new.sampler) == list(BalancedSampler(ds.tensors[1], generator=_gen(3)))
    assert balanced_loader(loader, _cfg()) is loader


@pytest.mark.parametrize("make, match", [
    (lambda ds: [(ds.tensors[0], ds.tensors[1])], r"needs a torch DataLoader .* got list"),
    (lambda ds: DataLoader(Stream(ds), batch_size=BS), r"over an IterableDataset \(Stream\)"),
    (lambda ds: DataLoader(ds, batch_size=None), r"batch_size= .*has batch_size=None"),
    (lambda ds: DataLoader(ds, batch_sampler=type("Mine", (BatchSampler,), {})(
        RandomSampler(ds), BS, False)), r"batch_size= .*has Mine batches"),
    (lambda ds: DataLoader(TensorDataset(torch.randn(N, 6), torch.rand(N))),
     r"sampler='balanced' needs integer class labels"),
])
def test_a_loader_the_sampler_cannot_rebuild_is_refused(make, match):
    with pytest.raises(ValueError, match=match):
        balanced_loader(make(_data()), _cfg(sampler="balanced"))


def test_a_run_trains_on_the_balanced_draws():
    """The batches the criterion sees are those of the user's own loader with torch's
    WeightedRandomSampler(1 / count, N, replacement=True, generator seeded with the seed)."""
    ds, seen = _data(), []

    def crit(out, y):
        seen.append(y.clone())
        return torch.nn.functional.cross_entropy(out, y)

    train_model_advanced(_model(), DataLoader(ds, batch_size=BS, shuffle=True), None, crit,
                         sampler="balanced", **{**PLAIN, "seed": 11})
    per_item = 1.0 / torch.tensor(COUNTS, dtype=torch.float64)[ds.tensors[1]]
    ref = DataLoader(ds, batch_size=BS, sampler=WeightedRandomSampler(
        per_item, N, replacement=True, generator=_gen(11)))
    expected = [y for _ in range(2) for _, y in ref]
    assert len(seen) == len(expected) and all(torch.equal(a, b) for a, b in zip(seen, expected))






class CrashingCE(torch.nn.CrossEntropyLoss):
    def __init__(self, at):
        super().__init__()
        self.at, self.calls = at, 0

    def forward(self, out, y):
        self.calls += 1
        if self.calls == self.at:
            raise Boom()
        return super().forward(out, y)


def _strip(history):
    """History without timings, NaN (no val_loader) as None so that entries compare equal."""
    return [{k: None if v != v else v for k, v in e.items() if k != "seconds"} for e in history]


RESUME = dict(epochs=3, learning_rate=3e-3, device="cpu", verbose=False, seed=0,
              scheduler_type="cosine", restore_best_weights=False, model_name="m",
              checkpoint_every_n_steps=1)


@pytest.mark.parametrize("extra", [{"sampler": "balanced"},
                                   {"sampler": "balanced", "class_weights": "balanced"}])
@pytest.mark.parametrize("crash_at", [11, 20])  # mid-epoch 2 and mid-epoch 3 (8 batches each)
def test_mid_epoch_resume_is_bit_exact_with_the_balanced_sampler(tmp_path, extra, crash_at):
    ds = _data()

    def loader():
        return DataLoader(ds, batch_size=BS, shuffle=True)

    crit = CrashingCE if "class_weights" in extra else crashing
    ref = _model()
    r_ref = train_model_advanced(ref, loader(), None, torch.nn.CrossEntropyLoss(),
                                 checkpoint_dir=tmp_path / "ref", **RESUME, **extra)
    with pytest.raises(Boom):
        train_model_advanced(_model(), loader(), None, crit(crash_at),
                             checkpoint_dir=tmp_path / "c", **RESUME, **extra)
    resumed = _model(seed=7)  # another init: the weights must come from the checkpoint
    res = train_model_advanced(resumed, loader(), None, torch.nn.CrossEntropyLoss(),
                               checkpoint_dir=tmp_path / "c", resume=True, **RESUME, **extra)
    for a, b in zip(ref.parameters(), resumed.parameters()):
        assert torch.equal(a, b)
    assert _strip(res["history"]) == _strip(r_ref["history"])
    assert res["class_weights"] == r_ref["class_weights"]


@pytest.fixture
def one_process_group(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0,
                            world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def test_under_ddp_each_rank_takes_its_share_of_the_same_balanced_draws(one_process_group):
    """Two ranks (simulated: a DistContext that believes it is rank r of 2): the loader is
    sharded with ShardedSampler over the BalancedSampler; per epoch every rank draws torch's
    WeightedRandomSampler sequence seeded with seed + epoch and takes items[rank::2]."""
    ds, seed = _data(), 5
    balanced = balanced_loader(DataLoader(ds, batch_size=BS, shuffle=True),
                               _cfg(sampler="balanced", seed=seed))
    per_item = 1.0 / torch.tensor(COUNTS, dtype=torch.float64)[ds.tensors[1]]
    for epoch in (0, 3):
        shares = []
        for rank in (0, 1):
            loader = DistContext(world_size=2, rank=rank).shard(balanced, seed, train=True)
            s = loader.sampler
            assert isinstance(s, ShardedSampler) and s.inner is balanced.sampler
            s.agree = None  # one real process: the ranks' digest check has no peer to ask
            s.set_epoch(epoch)
            shares.append(list(s))
        full = list(WeightedRandomSampler(per_item, N, replacement=True,
                                          generator=_gen(seed + epoch)))
        assert shares[0] == full[0::2] and shares[1] == full[1::2]


# ---------------------------------------------------------------------------- the CLI
def test_the_cli_sets_both_options_for_a_builtin_task(tmp_path):
    from advanced_training_utils.app.cli import main

    run = tmp_path / "run"
    assert main(["train", "--task", "emotion", "--out", str(run), "--quiet", "--epochs", "1",
                 "--device", "cpu", "--set", "per_piece=1", "--set", "class_weights=balanced",
                 "--set", "sampler=balanced"]) == 0
    s = json.loads((run / "summary.json").read_text())
    assert s["options"]["class_weights"] == s["options"]["sampler"] == "balanced"
    w = s["class_weights"]
    assert len(w) == 4 and all(v > 0 for v in w)
    saved = ck.load_checkpoint(run / "checkpoints" / "emotion_last.pt")
    assert saved[ck.CLASS_WEIGHTS_KEY]["weights"].tolist() == w


def test_the_cli_sets_both_options_for_the_users_audio(tmp_path, monkeypatch):
    from _audio_corpus import EMOTIONS, folder_corpus, write_good
    from advanced_training_utils.app.cli import main

    monkeypatch.setenv("ADVTRAIN_CACHE", str(tmp_path / "cache"))
    root, _ = folder_corpus(tmp_path / "f", speakers=5, broken=False)
    for k in range(10):  # the first class four times as frequent in every speaker
        write_good(root / EMOTIONS[0] / f"spk{k % 5}_{k + 2}.wav", 100 + k)
    run = tmp_path / "run"
    assert main(["train", "--data", str(root), "--out", str(run), "--epochs", "1", "--quiet",
                 "--device", "cpu", "--set", "n_mels=32", "--set", "class_weights=balanced",
                 "--set", "sampler=balanced"]) == 0
    w = json.loads((run / "summary.json").read_text())["class_weights"]
    assert len(w) == 3 and w[0] < min(w[1:])  # the frequent class weighs least
