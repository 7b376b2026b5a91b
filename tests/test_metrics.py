"""Epoch metrics: every built-in against scikit-learn / torchmetrics, DDP stats, no host sync."""

import doctest
import io
import warnings

import numpy as np
import pytest
import torch
from sklearn import metrics as skm
from torch.utils.data import DistributedSampler
from torchmetrics import classification as tmc
from torchmetrics import regression as tmr

import advanced_training_utils.metrics as metrics_mod
from advanced_training_utils.metrics import (
    BUILTIN_METRICS,
    BatchMeanMetric,
    ClassificationStats,
    EpochMetrics,
    RegressionStats,
    TorchmetricsAdapter,
    nest_per_class,
    resolve_metrics,
)

TOL = dict(rel=0, abs=1e-6)
CLS = ["accuracy", "uar", "macro_f1", "per_class_recall"]
SIZES = (7, 16, 3, 16, 29, 1, 8)  # 80 rows in batches of unequal size
N = sum(SIZES)


def _split(*tensors, sizes=SIZES):
    """Batches of the given (unequal) sizes from row-aligned tensors (None passes through)."""
    start = 0
    for s in sizes:
        yield tuple(None if t is None else t[start:start + s] for t in tensors)
        start += s


def _classification_data(case, n=N, c=5, seed=0):
    """(logits [n, c], targets [n] or [n, c], true class [n], weight [n] or None).

    Classes are imbalanced (class 0 is ~half); ``missing``: class 3 is never a target but is
    predicted, class 4 is neither a target nor predicted.
    """
    g = torch.Generator().manual_seed(seed)
    probs = torch.tensor([0.5, 0.25, 0.15, 0.07, 0.03])
    true = torch.multinomial(probs, n, replacement=True, generator=g)
    logits = torch.randn(n, c, generator=g) + 1.5 * torch.nn.functional.one_hot(true, c)
    if case == "missing":
        true = torch.where(true >= 3, 0, true)
        logits[:, 4] -= 10.0
        logits[:5, 3] += 10.0  # predicted as 3, which never occurs in the targets
    weight, targets = None, true
    if case == "soft":  # mixup-like: the argmax is the true class
        lam = 0.6 + 0.3 * torch.rand(n, 1, generator=g)
        other = torch.nn.functional.one_hot(torch.roll(true, 1), c).float()
        targets = lam * torch.nn.functional.one_hot(true, c).float() + (1 - lam) * other
    if case == "mask":
        weight = (torch.rand(n, generator=g) > 0.2).float()
    if case == "weighted":  # sample weights, as scikit-learn's sample_weight
        weight = torch.rand(n, generator=g) * 3
    return logits, targets, true, weight


def _accumulate(m, outputs, targets, weight=None, sizes=SIZES):
    for o, t, w in _split(outputs, targets, weight, sizes=sizes):
        m.update(o, t, w)
    return m


def _sk_classification(pred, true, weight, c):
    """Our documented conventions, spelled in scikit-learn."""
    y, p = true.numpy(), pred.numpy()
    sw = None if weight is None else weight.numpy()
    labels = list(range(c))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "y_pred contains classes not in y_true"
        recall = skm.recall_score(y, p, labels=labels, average=None, zero_division=np.nan,
                                  sample_weight=sw)
        ref = {
            "accuracy": skm.accuracy_score(y, p, sample_weight=sw),
            "uar": skm.balanced_accuracy_score(y, p, sample_weight=sw),
            "uar_recall_score": skm.recall_score(y, p, labels=labels, average="macro",
                                                 zero_division=np.nan, sample_weight=sw),
            "macro_f1": skm.f1_score(y, p, labels=labels, average="macro",
                                     zero_division=np.nan, sample_weight=sw),
        }
    return ref, recall


# ---------------------------------------------------------------- classification
@pytest.mark.parametrize("case", ["imbalanced", "missing", "soft", "mask", "weighted"])
def test_classification_equals_sklearn_and_torchmetrics(case):
    logits, targets, true, weight = _classification_data(case)
    result = _accumulate(resolve_metrics(CLS), logits, targets, weight).compute()
    ref, recall = _sk_classification(logits.argmax(1), true, weight, 5)
    assert ref["uar"] == pytest.approx(ref["uar_recall_score"], abs=1e-12)
    for k in ("accuracy", "uar", "macro_f1"):
        assert result[k] == pytest.approx(ref[k], **TOL), k
    np.testing.assert_allclose([result[f"recall_{k}"] for k in range(5)], recall, atol=1e-6)
    if case == "missing":  # the absent class is NaN, not a 0 that would drag UAR down
        assert np.isnan(result["recall_3"]) and np.isnan(result["recall_4"])
        assert result["macro_f1"] == pytest.approx(skm.f1_score(true, logits.argmax(1),
                                                                 average="macro"), **TOL)
    if case == "weighted":
        return
    keep = slice(None) if weight is None else weight.bool()
    p, t = logits[keep], true[keep]  # torchmetrics has no weights: give it the kept rows
    tm_acc = tmc.MulticlassAccuracy(5, average="micro")(p, t)
    tm_f1 = tmc.MulticlassF1Score(5, average="macro")(p, t)
    assert result["accuracy"] == pytest.approx(tm_acc.item(), **TOL)
    assert result["macro_f1"] == pytest.approx(tm_f1.item(), **TOL)
    if case != "missing":  # torchmetrics scores a predicted-but-absent class 0 in macro recall
        tm_uar = tmc.MulticlassRecall(5, average="macro")(p, t)
        assert result["uar"] == pytest.approx(tm_uar.item(), **TOL)


def test_confusion_matrix_is_sklearns_and_ignore_index_is_not_counted():
    logits, true, _, _ = _classification_data("imbalanced")
    targets = true.clone()
    targets[::9] = -100  # CrossEntropyLoss's ignore_index: matches no class
    m = _accumulate(ClassificationStats(), logits, targets)
    kept = targets >= 0
    ref = skm.confusion_matrix(targets[kept], logits.argmax(1)[kept], labels=range(5))
    assert torch.equal(m.confusion_matrix(), torch.tensor(ref, dtype=torch.float64))
    assert m.compute()["accuracy"] == pytest.approx(
        skm.accuracy_score(targets[kept], logits.argmax(1)[kept]), **TOL)


def test_batch_mean_pitfall_macro_f1_and_ccc():
    """The mean of per-batch macro-F1 (the old loop's way) is not the epoch macro-F1; ours is."""
    logits, true, _, _ = _classification_data("imbalanced", n=96, seed=3)
    pred = logits.argmax(1)
    sizes = (16,) * 6
    epoch_f1 = skm.f1_score(true, pred, average="macro")
    per_batch = [skm.f1_score(t, p, average="macro") for p, t in _split(pred, true, sizes=sizes)]
    assert abs(np.mean(per_batch) - epoch_f1) > 0.02
    ours = _accumulate(resolve_metrics("macro_f1"), logits, true, sizes=sizes).compute()
    assert ours["macro_f1"] == pytest.approx(epoch_f1, **TOL)

    def batch_f1(out, tgt):
        return torch.tensor(skm.f1_score(tgt, out.argmax(1), average="macro"))

    legacy = _accumulate(resolve_metrics({"f1": batch_f1}), logits, true, sizes=sizes).compute()
    assert legacy["f1"] == pytest.approx(np.mean(per_batch), **TOL)  # documented approximation

    x, y = _regression_data(2, n=96)
    per_batch_ccc = [_lin_ccc(a, b)[0] for a, b in _split(x[:, 0], y[:, 0], sizes=sizes)]
    epoch_ccc = _lin_ccc(x[:, 0], y[:, 0])[0]
    assert abs(np.mean(per_batch_ccc) - epoch_ccc) > 0.01
    got = _accumulate(resolve_metrics("ccc"), x[:, 0], y[:, 0], sizes=sizes).compute()["ccc"]
    assert got == pytest.approx(epoch_ccc, **TOL)


# ---------------------------------------------------------------- regression
def _regression_data(k, n=N, seed=0):
    g = torch.Generator().manual_seed(seed)
    y = torch.randn(n, k, generator=g) * torch.tensor([1.0, 0.5, 2.0][:k]) + 3.0
    x = 0.7 * y + 0.4 * torch.randn(n, k, generator=g) + 0.3
    return x, y


def _lin_ccc(x, y):
    """Lin (1989), two-pass, population moments, per column, float64 numpy."""
    x, y = np.asarray(x, np.float64).reshape(len(x), -1), np.asarray(y, np.float64).reshape(len(y), -1)
    mx, my = x.mean(0), y.mean(0)
    cov = ((x - mx) * (y - my)).mean(0)
    return 2 * cov / (x.var(0) + y.var(0) + (mx - my) ** 2)


@pytest.mark.parametrize("k, masked", [(1, False), (1, True), (2, False), (3, True)])
def test_regression_equals_reference_sklearn_and_torchmetrics(k, masked):
    x, y = _regression_data(k)
    if k == 1:
        x, y = x[:, 0], y[:, 0]  # [B] inputs
    weight = (torch.arange(len(x)) % 5 != 0).float() if masked else None
    names = ["valence", "arousal", "dominance"][:k] if k > 1 else None
    m = resolve_metrics(["ccc", "mae"], target_names=names)
    result = _accumulate(m, x, y, weight).compute()
    keep = slice(None) if weight is None else weight.bool()
    xk, yk = x[keep].double(), y[keep].double()
    ccc = _lin_ccc(xk, yk)
    mae = skm.mean_absolute_error(yk, xk, multioutput="raw_values")
    assert result["ccc"] == pytest.approx(ccc.mean(), **TOL)
    assert result["mae"] == pytest.approx(skm.mean_absolute_error(yk, xk), **TOL)
    assert result["mae"] == pytest.approx(tmr.MeanAbsoluteError()(xk, yk).item(), **TOL)
    for i, name in enumerate(names or []):
        assert result[f"ccc_{name}"] == pytest.approx(ccc[i], **TOL)
        assert result[f"mae_{name}"] == pytest.approx(mae[i], **TOL)
    if names is None:
        assert set(result) == {"ccc", "mae"}
    # torchmetrics uses 1/(n-1) variances: equal to ours exactly when the means agree ...
    shifted = xk - xk.mean(0) + yk.mean(0)
    ours = _accumulate(resolve_metrics("ccc"), shifted, yk).compute()["ccc"]
    tm = tmr.ConcordanceCorrCoef(num_outputs=k)(shifted, yk).mean().item()
    assert ours == pytest.approx(tm, **TOL)
    # ... and O(1/n) apart otherwise (the documented difference)
    assert abs(tmr.ConcordanceCorrCoef(num_outputs=k)(xk, yk).mean().item() - ccc.mean()) > 1e-4


def test_regression_sample_weights_equal_weighted_references():
    x, y = _regression_data(2)
    w = torch.rand(len(x), generator=torch.Generator().manual_seed(5)) * 2
    got = _accumulate(resolve_metrics(["ccc", "mae"]), x, y, w).compute()
    xd, yd, wd = x.double().numpy(), y.double().numpy(), w.double().numpy()[:, None]
    mx, my = (wd * xd).sum(0) / wd.sum(), (wd * yd).sum(0) / wd.sum()
    vx, vy = (wd * (xd - mx) ** 2).sum(0) / wd.sum(), (wd * (yd - my) ** 2).sum(0) / wd.sum()
    cov = (wd * (xd - mx) * (yd - my)).sum(0) / wd.sum()
    ccc = 2 * cov / (vx + vy + (mx - my) ** 2)
    assert got["ccc_0"] == pytest.approx(ccc[0], **TOL)
    assert got["ccc_1"] == pytest.approx(ccc[1], **TOL)
    assert got["mae"] == pytest.approx(skm.mean_absolute_error(yd, xd, sample_weight=wd[:, 0]),
                                       **TOL)


# ---------------------------------------------------------------- DDP: stats add up
def _rank_batches(n, world, rank, shuffle):
    """Indices a DistributedSampler gives ``rank`` and the 0/1 mask of its padded duplicates:
    position p on rank r is item r + p * world of the padded list, padding iff >= n."""
    sampler = DistributedSampler(range(n), num_replicas=world, rank=rank, shuffle=shuffle,
                                 seed=1)
    idx = torch.tensor(list(sampler))
    pos = torch.arange(len(idx))
    return idx, (rank + pos * world < n).float()


@pytest.mark.parametrize("kind", ["classification", "regression"])
@pytest.mark.parametrize("shuffle", [False, True])
def test_two_ranks_summed_stats_equal_one_process(kind, shuffle):
    n, world = 77, 2  # 77 items: the sampler pads rank 1 with one duplicate
    if kind == "classification":
        outputs, targets, _, _ = _classification_data("imbalanced", n=n)
        spec = dict(metrics=CLS, num_classes=5)
    else:
        outputs, targets = _regression_data(2, n=n)
        spec = dict(metrics=["ccc", "mae"])
    whole = _accumulate(resolve_metrics(**spec), outputs, targets, sizes=(n,)).compute()
    ranks, unmasked = [], resolve_metrics(**spec)
    for r in range(world):
        idx, mask = _rank_batches(n, world, r, shuffle)
        sizes = (16, 16, len(idx) - 32)
        ranks.append(_accumulate(resolve_metrics(**spec), outputs[idx], targets[idx], mask, sizes))
        _accumulate(unmasked, outputs[idx], targets[idx], None, sizes)
    assert _rank_batches(n, world, 1, shuffle)[1].tolist()[-1] == 0  # one padded duplicate
    summed = ranks[0].stats() + ranks[1].stats()  # what all_reduce(SUM) leaves on each rank
    ranks[0].load_stats(summed)
    for k, v in whole.items():
        assert ranks[0].compute()[k] == pytest.approx(v, abs=1e-12, nan_ok=True), k
    merged = resolve_metrics(**spec)
    merged.merge(ranks[1])
    merged.merge(ranks[1])  # merge adds: rank1 twice != whole
    assert merged.compute() != whole
    assert unmasked.compute() != whole  # the padded duplicate counted: the mask matters


def test_merge_two_halves_equals_whole_including_inferred_size():
    logits, targets, _, _ = _classification_data("missing")

    def make():
        return resolve_metrics([*CLS, tmc.MulticlassF1Score(5, average="macro")])

    a = _accumulate(make(), logits[:40], targets[:40], sizes=(40,))
    b = _accumulate(make(), logits[40:], targets[40:], sizes=(40,))
    fresh = make()
    fresh.merge(a)
    fresh.merge(b)
    whole = _accumulate(make(), logits, targets).compute()
    assert fresh.compute() == pytest.approx(whole, abs=1e-12, nan_ok=True)
    assert whole["MulticlassF1Score"] == pytest.approx(whole["macro_f1"], **TOL)


# ---------------------------------------------------------------- state_dict
def _mixed_set():
    def mean_abs_logit(out, tgt):
        return out.abs().mean()

    return resolve_metrics([*CLS, mean_abs_logit, tmc.MulticlassAccuracy(5, average="macro")])


def test_state_dict_round_trip_mid_epoch_into_fresh_object():
    logits, targets, _, _ = _classification_data("imbalanced")
    reference = _accumulate(_mixed_set(), logits, targets).compute()
    first = _accumulate(_mixed_set(), logits[:30], targets[:30], sizes=(7, 23))
    buf = io.BytesIO()
    torch.save(first.state_dict(), buf)
    buf.seek(0)
    fresh = _mixed_set()  # num_classes not known yet: learnt from the state
    fresh.load_state_dict(torch.load(buf, weights_only=True))
    assert torch.equal(fresh.stats(), first.stats())
    _accumulate(fresh, logits[30:], targets[30:], sizes=(11, 39))
    assert fresh.compute() == pytest.approx(reference, **TOL)  # float32 batch means
    assert set(reference) == {"accuracy", "uar", "macro_f1", *[f"recall_{k}" for k in range(5)],
                              "mean_abs_logit", "MulticlassAccuracy"}
    assert reference["MulticlassAccuracy"] == pytest.approx(reference["uar"], **TOL)


def test_regression_state_dict_round_trip():
    x, y = _regression_data(2)
    m = _accumulate(RegressionStats(), x[:50], y[:50], sizes=(50,))
    fresh = RegressionStats()
    fresh.load_state_dict(m.state_dict())
    _accumulate(fresh, x[50:], y[50:], sizes=(30,))
    whole = _accumulate(RegressionStats(), x, y).compute()
    assert fresh.compute() == pytest.approx(whole, abs=1e-12)


# ---------------------------------------------------------------- host syncs
_CONVERSIONS = ("item", "tolist", "__bool__", "__float__", "__int__", "__index__", "cpu", "numpy")


@pytest.fixture
def conversions(monkeypatch):
    """Counts every Python-level tensor-to-host conversion, whoever calls it."""
    calls = []
    for name in _CONVERSIONS:
        orig = getattr(torch.Tensor, name)

        def spy(self, *a, _orig=orig, _name=name, **k):
            calls.append(_name)
            return _orig(self, *a, **k)

        monkeypatch.setattr(torch.Tensor, name, spy)
    return calls


def test_updates_make_no_host_conversion_and_compute_makes_one(conversions):
    logits, soft, _, _ = _classification_data("soft")
    x, y = _regression_data(2)
    mask = (torch.arange(N) % 4 != 0).float()
    cls, reg = resolve_metrics(CLS), resolve_metrics(["ccc", "mae"])
    for (o, t, w), (a, b) in zip(_split(logits, soft, mask), _split(x, y)):
        cls.update(o, t, w)
        cls.update(o, t.argmax(1), None)
        reg.update(a, b, w.bool())
    for m in (cls, reg):
        m.load_stats(m.stats() * 1)  # stand-in for the all-reduce
    assert conversions == []
    cls.compute()
    assert conversions == ["tolist"]  # the spy sees reads: one transfer for all values


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_update_never_synchronizes():
    """CUDA's sync detector catches syncs inside torch ops too (bincount, nonzero...)."""
    logits, soft = (t.cuda() for t in _classification_data("soft")[:2])
    x, y = (t.cuda() for t in _regression_data(2))
    cls, reg = resolve_metrics(CLS, num_classes=5), resolve_metrics(["ccc", "mae"])
    w = torch.ones(len(logits), device="cuda")
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(2):
            cls.update(logits, soft, w)
            cls.update(logits, soft.argmax(1))
            reg.update(x, y, w)
            cls.compute_tensors(), reg.compute_tensors()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert cls.stats().device.type == "cuda"
    ref = resolve_metrics(CLS)
    _accumulate(ref, logits.cpu(), soft.cpu(), sizes=(len(logits),))
    _accumulate(ref, logits.cpu(), soft.cpu(), sizes=(len(logits),))
    _accumulate(ref, logits.cpu(), soft.argmax(1).cpu(), sizes=(len(logits),))
    _accumulate(ref, logits.cpu(), soft.argmax(1).cpu(), sizes=(len(logits),))
    assert cls.compute() == pytest.approx(ref.compute(), abs=1e-12)


# ---------------------------------------------------------------- torchmetrics and callables
def test_torchmetrics_object_is_reset_each_epoch_and_sees_the_whole_epoch():
    tm = tmc.MulticlassF1Score(5, average="macro")
    m = resolve_metrics(["macro_f1", tm])
    logits, targets, _, weight = _classification_data("mask")
    for epoch in range(2):
        lo, ta, we = (t[40 * epoch:40 * epoch + 40] for t in (logits, targets, weight))
        m.reset()
        _accumulate(m, lo, ta, we, sizes=(16, 16, 8))
        got = m.compute()
        keep = we.bool()
        expect = tmc.MulticlassF1Score(5, average="macro")(lo[keep], ta[keep]).item()
        assert got["MulticlassF1Score"] == pytest.approx(expect, **TOL)  # this epoch only
        assert got["macro_f1"] == pytest.approx(expect, **TOL)


def test_torchmetrics_vector_and_dict_results_are_flattened():
    logits, targets, _, _ = _classification_data("imbalanced")
    m = resolve_metrics({"recall": tmc.MulticlassRecall(5, average=None)})
    got = _accumulate(m, logits, targets).compute()
    expect = tmc.MulticlassRecall(5, average=None)(logits, targets)
    assert list(got) == [f"recall_{k}" for k in range(5)]
    np.testing.assert_allclose(list(got.values()), expect.numpy(), atol=1e-6)
    assert isinstance(m.members[0], TorchmetricsAdapter) and m.stats().numel() == 0


def test_callable_is_an_example_weighted_mean_and_weight_drops_rows():
    def mse(out, tgt):
        return ((out - tgt) ** 2).mean()

    x, y = _regression_data(1)
    x, y = x[:, 0], y[:, 0]
    weight = (torch.arange(len(x)) % 3 != 0).float()
    m = resolve_metrics(mse)
    assert isinstance(m.members[0], BatchMeanMetric)
    got = _accumulate(m, x, y).compute()["mse"]
    assert got == pytest.approx(((x - y) ** 2).double().mean().item(), **TOL)
    m.reset()
    got = _accumulate(m, x, y, weight, sizes=(3, 1, 76)).compute()["mse"]  # 2nd batch: all 0
    assert got == pytest.approx(((x - y)[weight.bool()] ** 2).double().mean().item(), **TOL)


# ---------------------------------------------------------------- names, empties, docs
def test_keys_names_and_nesting():
    m = resolve_metrics(CLS, class_names=["angry", "happy", "sad"])
    assert m.compute() == {"accuracy": pytest.approx(np.nan, nan_ok=True),
                           "uar": pytest.approx(np.nan, nan_ok=True),
                           "macro_f1": pytest.approx(np.nan, nan_ok=True),
                           **{f"recall_{c}": pytest.approx(np.nan, nan_ok=True)
                              for c in ("angry", "happy", "sad")}}
    m.update(torch.eye(3), torch.tensor([0, 1, 1]))
    nested = nest_per_class(m.compute())
    assert nested["per_class_recall"] == {"angry": 1.0, "happy": 0.5, "sad": pytest.approx(
        np.nan, nan_ok=True)}
    assert nested["uar"] == 0.75 and nested["accuracy"] == pytest.approx(2 / 3)
    assert BUILTIN_METRICS == ("accuracy", "uar", "macro_f1", "per_class_recall", "ccc", "mae")


def test_given_sizes_fix_the_stats_length_before_any_batch():
    """Under DDP a rank with no batch must still all-reduce a vector of the same length."""
    assert resolve_metrics(CLS, num_classes=5).stats().shape == (25,)
    assert resolve_metrics(["ccc", "mae"], num_targets=2).stats().shape == (13,)
    assert resolve_metrics("ccc", target_names=["valence"]).stats().shape == (7,)
    assert resolve_metrics(CLS).stats().shape == (0,)  # inferred at the first update


def test_no_metrics_is_a_no_op_object():
    m = resolve_metrics(None)
    assert isinstance(m, EpochMetrics) and len(m) == 0
    m.update(torch.zeros(2, 3), torch.zeros(2, dtype=torch.long))
    assert m.compute() == {} and m.stats().numel() == 0
    m.load_stats(m.stats())
    assert resolve_metrics(m) is m


def test_module_docstring_example_runs():
    assert doctest.testmod(metrics_mod).failed == 0


# ---------------------------------------------------------------- errors
def _tm():
    return tmc.MulticlassAccuracy(3)


@pytest.mark.parametrize("spec, kwargs, exc, match", [
    ("f1", {}, ValueError, r"unknown metric 'f1'; built-in metrics: accuracy, uar, macro_f1, "
                           r"per_class_recall, ccc, mae"),
    (["uar", "ccc"], {}, ValueError, r"classification metrics \['uar'\] and regression metrics "
                                     r"\['ccc'\]"),
    (["uar", "uar"], {}, ValueError, r"'uar' is given twice"),
    ("uar", dict(num_classes=1), ValueError, r"num_classes must be >= 2, got 1"),
    ("uar", dict(num_classes=2.0), TypeError, r"num_classes must be an integer, got 2.0"),
    ("uar", dict(num_classes=2, class_names=["a", "b", "c"]), ValueError,
     r"class_names has 3 names but the size given is 2"),
    ("uar", dict(class_names=["a", "a"]), ValueError, r"unique non-empty strings"),
    ("ccc", dict(target_names="valence"), TypeError, r"target_names must be a sequence of str"),
    ({"x": "uar"}, {}, TypeError, r"metrics\['x'\] is the str 'uar'"),
    ([42], {}, TypeError, r"each item must be a built-in name .* got 42 of type int"),
    (3.5, {}, TypeError, r"metrics must be None, a name, .* got float"),
    ([_tm(), _tm()], {}, ValueError, r"two metrics report the key 'MulticlassAccuracy'"),
])
def test_resolve_errors(spec, kwargs, exc, match):
    with pytest.raises(exc, match=match):
        resolve_metrics(spec, **kwargs)


@pytest.mark.parametrize("make, outputs, targets, weight, exc, match", [
    (ClassificationStats, torch.zeros(4, 3, 2), torch.zeros(4, dtype=torch.long), None,
     ValueError, r"outputs must be logits of shape \[B, C\], got shape \(4, 3, 2\)"),
    (ClassificationStats, torch.zeros(4, 1), torch.zeros(4, dtype=torch.long), None,
     ValueError, r"outputs of shape \(4, 1\) hold one value per example .* need logits of "
                 r"shape \[B, C\], one column per class, C >= 2"),
    (ClassificationStats, torch.zeros(4), torch.zeros(4, dtype=torch.long), None,
     ValueError, r"outputs of shape \(4,\) hold one value per example"),
    (ClassificationStats, (torch.zeros(4, 3), torch.zeros(4, 8)), torch.zeros(4, dtype=torch.long),
     None, TypeError, r"outputs must be a torch.Tensor, got tuple: the built-in metrics "
                      r"\['accuracy', .* \(a model returning several outputs, such as "
                      r"\(logits, embedding\)\?\)"),
    (lambda: ClassificationStats(4), torch.zeros(4, 3), torch.zeros(4, dtype=torch.long), None,
     ValueError, r"outputs of shape \(4, 3\) has 3 columns but this metric has num_classes=4"),
    (ClassificationStats, torch.zeros(4, 3), torch.zeros(5, dtype=torch.long), None,
     ValueError, r"targets must have shape \[B\] = \(4,\) or \[B, C\] = \(4, 3\) to match "
                 r"outputs \(4, 3\), got \(5,\)"),
    (ClassificationStats, torch.zeros(4, 3), torch.zeros(4), None,
     TypeError, r"targets of shape \[B\] must be integer class indices, got dtype torch.float32"),
    (ClassificationStats, torch.zeros(4, 3), torch.zeros(4, 3, dtype=torch.long), None,
     TypeError, r"targets of shape \[B, C\] \(4, 3\) must be float"),
    (ClassificationStats, torch.zeros(4, 3), torch.zeros(4, dtype=torch.long), torch.ones(3),
     ValueError, r"weight must have shape \[B\] = \(4,\) to match the batch, got shape \(3,\)"),
    (ClassificationStats, [[0.0, 1.0]], torch.zeros(1, dtype=torch.long), None,
     TypeError, r"outputs must be a torch.Tensor, got list"),
    (RegressionStats, torch.zeros(4, 1), torch.zeros(4), None,
     ValueError, r"outputs and targets must have the same shape, \[B\] or \[B, K\], got "
                 r"outputs \(4, 1\) and targets \(4,\)"),
    (lambda: RegressionStats(2), torch.zeros(4, 3), torch.zeros(4, 3), None,
     ValueError, r"outputs of shape \(4, 3\) has 3 columns but this metric has num_targets=2"),
    (lambda: BatchMeanMetric(lambda o, t: o.mean(1), "rowmean"), torch.zeros(4, 3),
     torch.zeros(4), None, ValueError, r"metric 'rowmean' must return a 0-d tensor .* got \(4,\)"),
])
def test_update_errors(make, outputs, targets, weight, exc, match):
    with pytest.raises(exc, match=match):
        make().update(outputs, targets, weight)


@pytest.mark.parametrize("make, exc, match", [
    (lambda: ClassificationStats(report=["f1"]), ValueError,
     r"report must be a non-empty subset of \('accuracy', 'uar', 'macro_f1', "
     r"'per_class_recall'\), got \('f1',\)"),
    (lambda: RegressionStats(report=[]), ValueError, r"report must be a non-empty subset"),
    (lambda: TorchmetricsAdapter(object()), TypeError,
     r"metric must have update, compute and reset methods .* got object"),
    (lambda: BatchMeanMetric(3), TypeError, r"fn must be callable, got int"),
    (lambda: resolve_metrics(CLS, num_classes=3).load_stats(torch.zeros(4)), ValueError,
     r"flat must have the shape of stats\(\), \(9,\), got \(4,\)"),
    (lambda: resolve_metrics("uar").load_state_dict(resolve_metrics("ccc").state_dict()),
     ValueError, r"state_dict holds metrics \['RegressionStats'\], this object has "
                 r"\['ClassificationStats'\]"),
    (lambda: ClassificationStats(3).load_state_dict(ClassificationStats(4).state_dict()),
     ValueError, r"state_dict \(num_classes=4\) has 4 columns but this metric has num_classes=3"),
    (lambda: ClassificationStats().merge(RegressionStats()), TypeError,
     r"other must be a ClassificationStats, got RegressionStats"),
])
def test_construction_and_state_errors(make, exc, match):
    with pytest.raises(exc, match=match):
        make()
