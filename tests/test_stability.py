import logging
import math

import pytest
import torch

from advanced_training_utils import TrainingStability


def _model():
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.ReLU(), torch.nn.Linear(5, 2))
    m(torch.randn(7, 6)).pow(2).sum().backward()
    return m


def test_gradient_stats_match_hand_computation():
    m = _model()
    s = TrainingStability.check_gradients(m)
    grads = torch.cat([p.grad.flatten() for p in m.parameters()]).abs()
    assert s["max_grad"] == pytest.approx(grads.max().item(), rel=1e-6)
    # mean: root-mean-square of all elements; min: smallest per-parameter RMS
    assert s["mean_grad"] == pytest.approx(grads.pow(2).mean().sqrt().item(), rel=1e-5)
    per_param_rms = [p.grad.pow(2).mean().sqrt().item() for p in m.parameters()]
    assert s["min_grad"] == pytest.approx(min(per_param_rms), rel=1e-5)
    ref = torch.nn.utils.get_total_norm([p.grad for p in m.parameters()])
    assert s["total_norm"] == pytest.approx(ref.item(), rel=1e-6)
    assert s["nan_grads"] == 0 and s["inf_grads"] == 0 and s["healthy"] is True
    assert s["no_grad_params"] == [] and s["num_params"] == 4


@pytest.mark.parametrize(
    "where, value, key, names_key",
    [
        ("0.weight", math.nan, "nan_grads", "nan_grad_params"),
        ("2.bias", math.inf, "inf_grads", "inf_grad_params"),
        ("0.bias", -math.inf, "inf_grads", "inf_grad_params"),
    ],
)
def test_names_offending_gradients(where, value, key, names_key):
    m = _model()
    dict(m.named_parameters())[where].grad.view(-1)[0] = value
    s = TrainingStability.check_gradients(m)
    assert s[key] == 1 and s[names_key] == [where]
    assert s["healthy"] is False and math.isnan(s["total_norm"])
    # finite parameters still give finite stats
    assert math.isfinite(s["max_grad"]) and math.isfinite(s["mean_grad"])


def test_missing_gradients_listed():
    m = _model()
    m[2].bias.grad = None
    s = TrainingStability.check_gradients(m)
    assert s["no_grad_params"] == ["2.bias"] and s["num_params"] == 3


def test_weights_stats_and_nan_names():
    m = _model()
    w = torch.cat([p.detach().flatten() for p in m.parameters()]).abs()
    s = TrainingStability.check_weights(m)
    assert s["max_weight"] == pytest.approx(w.max().item(), rel=1e-6)
    assert s["mean_weight"] == pytest.approx(w.pow(2).mean().sqrt().item(), rel=1e-5)
    with torch.no_grad():
        m[0].weight[1, 1] = math.nan
        m[2].weight[0, 0] = math.inf
    s = TrainingStability.check_weights(m)
    assert s["nan_weights"] == 1 and s["nan_weight_params"] == ["0.weight"]
    assert s["inf_weights"] == 1 and s["inf_weight_params"] == ["2.weight"]
    assert s["healthy"] is False


def test_single_host_transfer(monkeypatch):
    m = _model()
    calls = []
    orig = torch.Tensor.tolist

    def spy(self):
        calls.append(1)
        return orig(self)

    monkeypatch.setattr(torch.Tensor, "tolist", spy)
    for name in ("item", "__float__", "__bool__"):
        monkeypatch.setattr(torch.Tensor, name, lambda *a, _n=name: calls.append(_n))
    TrainingStability.check_gradients(m)
    monkeypatch.undo()
    assert calls == [1]


def test_verbose_logs(caplog):
    m = _model()
    m[0].weight.grad[0, 0] = math.nan
    with caplog.at_level(logging.INFO, logger="advanced_training_utils.stability"):
        TrainingStability.check_gradients(m, verbose=True)
    assert "UNHEALTHY" in caplog.text and "0.weight" in caplog.text


def test_rejects_non_module():
    with pytest.raises(TypeError, match="model must be a torch.nn.Module, got list"):
        TrainingStability.check_gradients([1])
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        TrainingStability.check_weights(None)


def test_model_without_parameters():
    s = TrainingStability.check_weights(torch.nn.ReLU())
    assert s["num_params"] == 0 and s["healthy"] is True and s["max_weight"] == 0.0


# ---- NaN/Inf by class: one table for gradients and weights, exact counts and names
NAN, INF = math.nan, math.inf
CASES = [  # id, {param: values written at flat indices 0, 1, ...} or "all nan"/"all inf", nan, inf
    ("finite", {}, [], []),
    ("nan_only", {"0.weight": [NAN]}, ["0.weight"], []),
    ("inf_only", {"2.bias": [INF]}, [], ["2.bias"]),
    ("neg_inf_only", {"0.bias": [-INF]}, [], ["0.bias"]),
    ("nan_then_inf", {"0.weight": [NAN, INF]}, ["0.weight"], ["0.weight"]),
    ("inf_then_nan", {"0.weight": [INF, NAN]}, ["0.weight"], ["0.weight"]),
    ("nan_and_neg_inf", {"2.weight": [-INF, NAN, INF]}, ["2.weight"], ["2.weight"]),
    ("all_nan", {"2.weight": "all nan"}, ["2.weight"], []),
    ("all_inf", {"0.bias": "all inf"}, [], ["0.bias"]),
    ("two_params", {"0.weight": [NAN], "2.weight": [INF, NAN], "2.bias": [-INF]},
     ["0.weight", "2.weight"], ["2.weight", "2.bias"]),
]


def _poison(m, kind, where):
    for name, p in m.named_parameters():
        if name not in where:
            continue
        t = p.grad if kind == "grad" else p.data
        spec = where[name]
        if isinstance(spec, str):
            t.fill_(NAN if spec == "all nan" else INF)
        else:
            t.view(-1)[: len(spec)] = torch.tensor(spec)


@pytest.mark.parametrize("kind", ["grad", "weight"])
@pytest.mark.parametrize("case, where, nan, inf", CASES, ids=[c[0] for c in CASES])
def test_nan_inf_table(kind, case, where, nan, inf):
    m = _model()
    _poison(m, kind, where)
    check = TrainingStability.check_gradients if kind == "grad" else TrainingStability.check_weights
    s = check(m)
    assert s[f"nan_{kind}s"] == len(nan) and s[f"nan_{kind}_params"] == nan
    assert s[f"inf_{kind}s"] == len(inf) and s[f"inf_{kind}_params"] == inf
    assert s["healthy"] is (not nan and not inf) and s["num_params"] == 4
    # The other statistics are those of the finite parameters, by hand.
    good = [(p.grad if kind == "grad" else p).detach() for n, p in m.named_parameters()
            if n not in set(nan) | set(inf)]
    flat = torch.cat([t.flatten() for t in good]).double()
    assert s[f"max_{kind}"] == pytest.approx(flat.abs().max().item(), rel=1e-6)
    assert s[f"mean_{kind}"] == pytest.approx(flat.pow(2).mean().sqrt().item(), rel=1e-5)
    assert s[f"min_{kind}"] == pytest.approx(
        min(t.double().pow(2).mean().sqrt().item() for t in good), rel=1e-5)
    if nan or inf:
        assert math.isnan(s["total_norm"])
    else:
        assert s["total_norm"] == pytest.approx(flat.norm().item(), rel=1e-6)


def test_none_gradients_are_listed_not_counted():
    m = _model()
    m[0].weight.grad = None
    m[2].bias.grad = None
    m[2].weight.grad.view(-1)[:2] = torch.tensor([NAN, INF])
    s = TrainingStability.check_gradients(m)
    assert s["no_grad_params"] == ["0.weight", "2.bias"] and s["num_params"] == 2
    assert s["nan_grad_params"] == ["2.weight"] and s["inf_grad_params"] == ["2.weight"]
    assert s["max_grad"] == pytest.approx(m[0].bias.grad.abs().max().item(), rel=1e-6)


def _sparse_model():
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Embedding(6, 3, sparse=True), torch.nn.Linear(3, 2))
    m(torch.tensor([1, 4, 1, 2])).pow(2).sum().backward()  # index 1 twice: uncoalesced
    return m


@pytest.mark.parametrize(
    "values, nan, inf",
    [([], [], []), ([NAN], ["0.weight"], []), ([INF], [], ["0.weight"]),
     ([NAN, -INF], ["0.weight"], ["0.weight"])],
)
def test_sparse_gradients(values, nan, inf):
    m = _sparse_model()
    g = m[0].weight.grad
    assert g.is_sparse and not g.is_coalesced()
    g._values().view(-1)[: len(values)] = torch.tensor(values)
    s = TrainingStability.check_gradients(m)
    m[0].weight.grad = g.to_dense()  # the same gradient, dense: the reference
    ref = TrainingStability.check_gradients(m)
    assert s["nan_grad_params"] == nan and s["inf_grad_params"] == inf
    for key in ("max_grad", "min_grad", "mean_grad", "total_norm", "nan_grads", "inf_grads"):
        assert s[key] == pytest.approx(ref[key], rel=1e-6, nan_ok=True), key


@pytest.mark.parametrize(
    "value, nan, inf",
    [(complex(1, 2), [], []), (complex(NAN, 0), ["c"], []), (complex(0, INF), [], ["c"]),
     (complex(INF, NAN), ["c"], ["c"])],
)
def test_complex_parameters(value, nan, inf):
    m = torch.nn.Module()
    m.c = torch.nn.Parameter(torch.tensor([complex(3, -4), complex(0, 0)]))
    m.c.grad = torch.tensor([value, complex(0, 0)])
    for kind, check in (("grad", TrainingStability.check_gradients),
                        ("weight", TrainingStability.check_weights)):
        with torch.no_grad():
            m.c[0] = value
        s = check(m)
        assert s[f"nan_{kind}_params"] == nan and s[f"inf_{kind}_params"] == inf, kind
        if not nan and not inf:
            assert s["total_norm"] == pytest.approx(math.sqrt(1 + 4), rel=1e-6)
            assert s[f"max_{kind}"] == 2.0  # largest real or imaginary part


def test_meta_parameters_are_refused():
    m = torch.nn.Linear(2, 2, device="meta")
    with pytest.raises(ValueError, match="weights on the meta device have no values to check: "
                       "weight, bias"):
        TrainingStability.check_weights(m)
