import math

import pytest
import torch

from _helpers import assert_equal_nan
from advanced_training_utils import GradientClipper


def _model_with_grads(scale=1.0, seed=0):
    torch.manual_seed(seed)
    m = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 4))
    (m(torch.randn(32, 8)).pow(2).sum() * scale).backward()
    return m


@pytest.mark.parametrize("norm_type", [1.0, 2.0, 3.5, math.inf])
@pytest.mark.parametrize("max_norm", [0.01, 1.0, 1e6])
def test_matches_torch_clip_grad_norm(norm_type, max_norm):
    a, b = _model_with_grads(), _model_with_grads()
    ref_norm = torch.nn.utils.get_total_norm([p.grad for p in b.parameters()], norm_type)
    torch.nn.utils.clip_grad_norm_(b.parameters(), max_norm, norm_type)
    norm = GradientClipper(max_norm, norm_type).clip(a)
    assert norm.dim() == 0
    assert torch.allclose(norm, ref_norm, rtol=1e-6, atol=0)
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.allclose(pa.grad, pb.grad, rtol=1e-6, atol=1e-12)


def test_accepts_param_iterable_and_tensor():
    m = _model_with_grads()
    ref = torch.nn.utils.get_total_norm([p.grad for p in m.parameters()])
    c = GradientClipper(max_norm=1e9)
    assert torch.allclose(c.clip(list(m.parameters())), ref)
    w = m[0].weight
    assert torch.allclose(c.clip(w), w.grad.norm())


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_nonfinite_norm_leaves_grads_untouched_and_is_flagged(bad):
    m = _model_with_grads()
    m[0].weight.grad[0, 0] = bad
    before = [p.grad.clone() for p in m.parameters()]
    c = GradientClipper(max_norm=1.0)
    norm = c.clip(m)
    assert not torch.isfinite(norm)
    assert c.last_finite is not None and not bool(c.last_finite)
    for i, (p, g) in enumerate(zip(m.parameters(), before)):
        nan = torch.zeros_like(g, dtype=torch.bool)
        if i == 0 and math.isnan(bad):
            nan[0, 0] = True  # the one NaN put there; every other entry exactly as before
        assert_equal_nan(p.grad, g, nan)
    s = c.get_stats()
    assert s["num_nonfinite"] == 1 and s["num_clipped"] == 0 and s["num_steps"] == 1


def test_stats_match_hand_computation():
    c = GradientClipper(max_norm=2.0)
    norms = []
    for seed, scale in enumerate([0.1, 0.5, 3.0, 0.01, 10.0]):
        m = _model_with_grads(scale, seed)
        norms.append(float(c.clip(m)))
    s = c.get_stats()
    mean = sum(norms) / len(norms)
    std = math.sqrt(sum((n - mean) ** 2 for n in norms) / len(norms))
    assert s["mean_norm"] == pytest.approx(mean, rel=1e-6)
    assert s["std_norm"] == pytest.approx(std, rel=1e-5)
    assert s["max_norm"] == pytest.approx(max(norms), rel=1e-6)
    assert s["min_norm"] == pytest.approx(min(norms), rel=1e-6)
    assert s["last_norm"] == pytest.approx(norms[-1], rel=1e-6)
    clipped = sum(n > 2.0 for n in norms)
    assert s["num_clipped"] == clipped and s["num_steps"] == 5
    assert s["clip_fraction"] == pytest.approx(clipped / 5)
    assert all(isinstance(v, (int, float)) for v in s.values())
    c.reset()
    assert c.get_stats()["num_steps"] == 0


def test_no_host_reads_during_clip(monkeypatch):
    m = _model_with_grads()
    calls = []
    for name in ("item", "tolist", "__bool__", "__float__", "cpu"):
        orig = getattr(torch.Tensor, name)

        def spy(self, *a, _orig=orig, _n=name, **k):
            calls.append(_n)
            return _orig(self, *a, **k)

        monkeypatch.setattr(torch.Tensor, name, spy)
    c = GradientClipper(1.0)
    for _ in range(3):
        c.clip(m)
    monkeypatch.undo()
    assert calls == []


def test_state_dict_round_trip():
    c = GradientClipper(0.5)
    for seed in range(3):
        c.clip(_model_with_grads(seed=seed))
    fresh = GradientClipper(1.0)
    fresh.load_state_dict(c.state_dict())
    assert fresh.get_stats() == c.get_stats()
    m1, m2 = _model_with_grads(seed=9), _model_with_grads(seed=9)
    c.clip(m1)
    fresh.clip(m2)
    assert fresh.get_stats() == c.get_stats()


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        (dict(max_norm=0), ValueError, "max_norm must be > 0, got 0"),
        (dict(max_norm=-1.0), ValueError, "max_norm must be > 0, got -1.0"),
        (dict(max_norm=math.nan), ValueError, "max_norm must be a number"),
        (dict(max_norm="1"), TypeError, "max_norm must be a real number"),
        (dict(norm_type=0), ValueError, "norm_type must be > 0, got 0"),
        (dict(norm_type=None), TypeError, "norm_type must be a real number"),
    ],
)
def test_rejects_bad_arguments(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        GradientClipper(**kwargs)


# ---- what clip() accepts: a module, a tensor, an iterable of tensors; anything else by class
_RULE = (r"model_or_params must be a torch.nn.Module, a tensor, or an iterable of tensors "
         r"\(e.g. model.parameters\(\)\)")


def _named(m):
    return m.named_parameters()


@pytest.mark.parametrize(
    "make_bad, match",
    [
        (lambda m: "abc", _RULE + ", got 'abc' of type str$"),
        (lambda m: b"ab", _RULE + ", got b'ab' of type bytes$"),
        (lambda m: 3, _RULE + ", got 3 of type int$"),
        (lambda m: 1.5, _RULE + ", got 1.5 of type float$"),
        (lambda m: None, _RULE + ", got None of type NoneType$"),
        (lambda m: object(), _RULE + ", got <object object at .*> of type object$"),
        (lambda m: {"w": m[0].weight}, _RULE + r", got \{'w': Parameter .* of type dict; "
         r"pass its .values\(\)$"),
        (lambda m: [1, 2], _RULE + ", but item 0 is 1 of type int$"),
        (lambda m: [m[0].weight, "x"], _RULE + ", but item 1 is 'x' of type str$"),
        (lambda m: [m[0].weight, None], _RULE + ", but item 1 is None of type NoneType$"),
        (lambda m: [{"params": list(m.parameters())}], _RULE + ", but item 0 is .* of type dict$"),
        (_named, _RULE + r", but item 0 is \('0.weight', .* of type tuple; "
         r"pass model.parameters\(\), not named_parameters\(\)$"),
        (lambda m: [m[0]], _RULE + ", but item 0 is Linear.* of type Linear$"),
    ],
    ids=["str", "bytes", "int", "float", "None", "object", "dict", "list_of_int",
         "tensor_then_str", "tensor_then_None", "param_groups", "named_parameters",
         "list_of_modules"],
)
def test_clip_rejects_bad_inputs_by_class(make_bad, match):
    m = _model_with_grads()
    before = [p.grad.clone() for p in m.parameters()]
    c = GradientClipper(max_norm=1e-3)
    with pytest.raises(TypeError, match=match):
        c.clip(make_bad(m))
    assert c.num_steps == 0  # nothing recorded
    assert all(torch.equal(p.grad, g) for p, g in zip(m.parameters(), before))  # nor clipped


@pytest.mark.parametrize("make_ok", [
    lambda m: m, lambda m: m.parameters(), lambda m: list(m.parameters()),
    lambda m: tuple(m.parameters()), lambda m: (p for p in m.parameters()),
    lambda m: dict(m.named_parameters()).values(),
], ids=["module", "generator", "list", "tuple", "genexpr", "dict_values"])
def test_clip_accepts_every_documented_form(make_ok):
    m, ref = _model_with_grads(), _model_with_grads()
    want = torch.nn.utils.clip_grad_norm_(ref.parameters(), 0.5)
    got = GradientClipper(0.5).clip(make_ok(m))
    assert torch.allclose(got, want, rtol=1e-6, atol=0)
    for p, q in zip(m.parameters(), ref.parameters()):
        assert torch.allclose(p.grad, q.grad, rtol=1e-6, atol=1e-12)


# ---- sparse gradients (nn.Embedding(sparse=True)): torch's own norms refuse them
def _sparse_model():
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Embedding(10, 4, sparse=True), torch.nn.Linear(4, 3))
    m(torch.tensor([1, 7, 1, 3])).pow(2).sum().backward()  # index 1 twice: uncoalesced
    return m


@pytest.mark.parametrize("norm_type", [1.0, 2.0, math.inf])
@pytest.mark.parametrize("max_norm", [0.05, 1e6])
def test_sparse_gradients_match_torch_on_the_dense_equivalent(norm_type, max_norm):
    m, ref = _sparse_model(), _sparse_model()
    assert m[0].weight.grad.is_sparse and not m[0].weight.grad.is_coalesced()
    ref[0].weight.grad = ref[0].weight.grad.to_dense()
    want = torch.nn.utils.clip_grad_norm_(ref.parameters(), max_norm, norm_type)
    c = GradientClipper(max_norm, norm_type)
    for _ in range(2):  # the first call finds the sparse gradient, the second takes its path
        m2 = _sparse_model()
        got = c.clip(m2)
    assert torch.allclose(got, want, rtol=1e-6, atol=0)
    assert m2[0].weight.grad.is_sparse  # clipped in place, still sparse
    for p, q in zip(m2.parameters(), ref.parameters()):
        assert torch.allclose(p.grad.to_dense(), q.grad, rtol=1e-6, atol=1e-12)
    assert c.get_stats()["num_steps"] == 2


def test_sparse_gradient_with_no_stored_values():
    e = torch.nn.Embedding(5, 2, sparse=True)
    e.weight.grad = torch.sparse_coo_tensor(torch.zeros(1, 0, dtype=torch.long),
                                            torch.zeros(0, 2), (5, 2), check_invariants=True)
    assert float(GradientClipper(1.0).clip(e)) == 0.0


@pytest.mark.parametrize(
    "state, exc, match",
    [
        (None, TypeError, r"state must be a dict from GradientClipper.state_dict\(\), got NoneType"),
        ([1], TypeError, "got list"),
        ({"max_norm": 1.0}, ValueError, "state is missing norm_type, num_steps, stats"),
        ({"max_norm": -1.0, "norm_type": 2.0, "num_steps": 0, "stats": None}, ValueError,
         "max_norm must be > 0, got -1.0"),
    ],
)
def test_load_state_dict_rejects_bad_state(state, exc, match):
    with pytest.raises(exc, match=match):
        GradientClipper().load_state_dict(state)


@pytest.mark.parametrize("gradient_clip", [0.1, None])
def test_train_model_advanced_trains_a_sparse_embedding_model(gradient_clip):
    """The loop clips (or only measures) every step: sparse gradients used to stop it."""
    from advanced_training_utils import train_model_advanced

    torch.manual_seed(0)
    x = torch.randint(0, 20, (64, 3))
    data = torch.utils.data.TensorDataset(x, x.sum(1) % 2)
    loader = torch.utils.data.DataLoader(data, batch_size=16)
    model = torch.nn.Sequential(torch.nn.EmbeddingBag(20, 8, sparse=True), torch.nn.Linear(8, 2))
    before = model[0].weight.detach().clone()
    res = train_model_advanced(model, loader, loader, torch.nn.CrossEntropyLoss(), epochs=2,
                               verbose=False, device="cpu", gradient_clip=gradient_clip,
                               optimizer=lambda p: torch.optim.SGD(p, lr=0.1))
    assert res["epochs_run"] == 2 and math.isfinite(res["best_val_loss"])
    assert res["grad_stats"]["mean_norm"] > 0
    assert not torch.equal(model[0].weight.detach(), before)
