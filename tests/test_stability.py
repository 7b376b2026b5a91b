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
