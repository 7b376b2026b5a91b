"""Device validation (``prepare.check_device`` / ``resolve_device``), tested by class."""

import re

import pytest
import torch

from advanced_training_utils.engine import prepare
from advanced_training_utils.engine.config import TrainConfig
from advanced_training_utils.engine.prepare import check_device, resolve_device


@pytest.fixture
def no_accelerators(monkeypatch):
    """A CPU-only machine: no CUDA, no MPS, no torch_xla (mocked at the hardware boundary)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    monkeypatch.setattr(prepare, "_xla_available", lambda: False)


@pytest.mark.parametrize("device, expected", [
    ("auto", "cpu"), ("cpu", "cpu"), (torch.device("cpu"), "cpu"),
])
def test_cpu_devices_are_accepted(no_accelerators, device, expected):
    assert check_device(device) == str(device)
    assert resolve_device(device) == torch.device(expected)
    assert TrainConfig.from_options(device=device).device == str(device)


@pytest.mark.parametrize("device", ["cuda", "cuda:0", "cuda:3"])
def test_cuda_without_cuda_falls_back_to_cpu_with_a_warning(no_accelerators, device):
    assert TrainConfig.from_options(device=device).device == device  # documented fallback
    with pytest.warns(RuntimeWarning, match=f"device='{device}' but CUDA is not available"):
        assert resolve_device(device) == torch.device("cpu")


@pytest.mark.parametrize("device, why", [
    ("meta", "the meta device holds no data"),
    ("xla", "torch_xla is not installed"),
    ("mps", "MPS is not available"),
    ("hpu", "not a device this package trains on"),
    ("xpu", "not a device this package trains on"),
    ("lazy", "not a device this package trains on"),
    ("gpu", None), ("tpu", None), ("CPU", None), ("cuda:x", None), ("cuda:-1", None), ("", None),
    ("cuda:0:1", None),
])
def test_unusable_devices_are_refused_up_front(no_accelerators, device, why):
    match = re.escape(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N'; got {device!r}"
                      + (f" ({why}" if why else ""))
    for check in (check_device, resolve_device, lambda d: TrainConfig.from_options(device=d)):
        with pytest.raises(ValueError, match=match):
            check(device)


def test_mps_and_xla_are_accepted_where_available(monkeypatch):
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    monkeypatch.setattr(prepare, "_xla_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert check_device("mps") == "mps" and check_device("xla") == "xla"
    assert resolve_device("mps") == torch.device("mps")
    assert resolve_device("auto") == torch.device("mps")
    with pytest.raises(ValueError, match="device must be 'auto', 'cpu', 'cuda', 'cuda:N', 'mps' "
                       "or 'xla'; got 'meta'"):
        check_device("meta")


def test_cuda_index_must_name_a_present_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert check_device("cuda:1") == "cuda:1"
    with pytest.raises(ValueError, match=r"device 'cuda:2': this machine has 2 CUDA device\(s\) "
                       r"\(cuda:0..cuda:1\)"):
        TrainConfig.from_options(device="cuda:2")


@pytest.mark.parametrize("labels, bad", [
    ([0, 1, 2], None),          # every class of a 3-output model
    ([2, 2], None),
    ([0, -100, 2], None),       # CrossEntropyLoss's ignore_index is not a label
    ([0, 3], "0..3"),           # one past the last class
    ([-1, 1], "-1..1"),
])
def test_class_labels_are_checked_against_the_model_outputs(labels, bad):
    """``check_labels``: class indices must be in [0, C - 1] for a model with C outputs."""
    model = torch.nn.Linear(4, 3)
    x, y = torch.randn(len(labels), 4), torch.tensor(labels)
    if bad is None:
        prepare.check_labels(torch.nn.CrossEntropyLoss(), model, x, y, torch.device("cpu"))
    else:
        with pytest.raises(ValueError, match=re.escape(
                f"class labels must be in [0, 2] for a model with 3 outputs; the first batch "
                f"holds labels {bad}")):
            prepare.check_labels(torch.nn.CrossEntropyLoss(), model, x, y, torch.device("cpu"))


def test_the_first_batch_check_runs_one_extra_forward_for_metrics_and_mixing():
    """The metric check and the mixing check share one eval forward on the first batch (the
    label check runs its own, on one example)."""
    from advanced_training_utils.metrics import resolve_metrics

    calls = []
    model = torch.nn.Linear(3, 4)
    model.register_forward_hook(lambda m, args, out: calls.append(len(args[0])))
    cfg = TrainConfig.from_options(metrics="accuracy", mixup_alpha=0.2, seed=0)
    check = prepare.FirstBatchCheck(cfg, torch.nn.CrossEntropyLoss(), model,
                                    torch.device("cpu"), resolve_metrics("accuracy"),
                                    prepare.build_mixing(cfg))
    batch = (torch.randn(5, 3), torch.tensor([0, 1, 2, 3, 0]))
    assert next(check.wrap(iter([batch]))) is batch
    assert calls == [1, 5]
