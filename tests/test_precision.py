import pytest
import torch

from advanced_training_utils import GradientClipper, MixedPrecisionTrainer


def _setup(seed=0):
    torch.manual_seed(seed)
    m = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 1))
    return m, torch.optim.SGD(m.parameters(), lr=0.1)


def test_guide_device_cuda_without_cuda_warns_and_disables():
    if torch.cuda.is_available():
        pytest.skip("machine has CUDA")
    with pytest.warns(RuntimeWarning, match="CUDA is not available; mixed precision is disabled"):
        mp = MixedPrecisionTrainer(enabled=True, device="cuda")
    assert not mp.enabled and mp.scaler is None and mp.scale == 1.0


def test_disabled_is_a_noop_with_the_same_api():
    m, opt = _setup()
    mp = MixedPrecisionTrainer(enabled=False, device="cpu")
    x = torch.randn(4, 8)
    with mp.autocast():
        y = m(x)
    assert y.dtype == torch.float32
    loss = y.sum()
    assert mp.scale_loss(loss) is loss
    loss.backward()
    mp.unscale_(opt)
    before = [p.clone() for p in m.parameters()]
    assert mp.step_optimizer(opt) is True
    assert any(not torch.equal(a, b) for a, b in zip(before, m.parameters()))
    assert mp.state_dict()["scaler"] == {}


def test_bf16_autocast_without_scaler():
    m, _ = _setup()
    mp = MixedPrecisionTrainer(enabled=True, device="cpu", dtype="bfloat16")
    assert mp.scaler is None
    with mp.autocast():
        assert m(torch.randn(2, 8)).dtype == torch.bfloat16


def test_auto_dtype_on_cpu_is_bf16():
    assert MixedPrecisionTrainer(device="cpu", dtype="auto").dtype == torch.bfloat16


def test_fp16_autocast_and_real_scaling_on_cpu():
    m, opt = _setup()
    mp = MixedPrecisionTrainer(enabled=True, device="cpu", dtype="float16", init_scale=1024.0)
    with mp.autocast():
        y = m(torch.randn(4, 8))
    assert y.dtype == torch.float16
    loss = y.float().pow(2).mean()
    assert torch.allclose(mp.scale_loss(loss), loss * 1024.0)


def test_forced_fp16_overflow_skips_step_and_lowers_scale():
    m, opt = _setup()
    mp = MixedPrecisionTrainer(enabled=True, device="cpu", dtype="float16", init_scale=2.0**16)
    with mp.autocast():
        loss = m(torch.randn(4, 8)).float().sum()
    mp.scale_loss(loss * 1e30).backward()  # scaled grads overflow to inf
    before = [p.clone() for p in m.parameters()]
    assert mp.step_optimizer(opt) is False
    for a, b in zip(before, m.parameters()):
        assert torch.equal(a, b)
    assert mp.scale == 2.0**15
    # Training continues: a clean step is taken.
    opt.zero_grad()
    with mp.autocast():
        loss = m(torch.randn(4, 8)).float().pow(2).mean()
    mp.scale_loss(loss).backward()
    assert mp.step_optimizer(opt) is True
    assert any(not torch.equal(a, b) for a, b in zip(before, m.parameters()))


def test_clipping_after_unscale_sees_fp32_norms():
    x = torch.randn(16, 8)
    # fp32 reference: same graph without autocast, loss scaled only by the scaler.
    m32, _ = _setup(1)
    m32(x).pow(2).mean().backward()
    ref = GradientClipper(1e9).clip(m32)

    m16, opt = _setup(1)
    mp = MixedPrecisionTrainer(enabled=True, device="cpu", dtype="float16", init_scale=4096.0)
    mp.scale_loss(m16(x).pow(2).mean()).backward()
    mp.unscale_(opt)
    mp.unscale_(opt)  # idempotent within a step
    norm = GradientClipper(1e9).clip(m16)
    assert torch.allclose(norm, ref, rtol=1e-6)
    for a, b in zip(m32.parameters(), m16.parameters()):
        assert torch.allclose(a.grad, b.grad, rtol=1e-5, atol=1e-7)
    assert mp.step_optimizer(opt) is True


def test_every_step_is_unscaled_once():
    """``unscale_`` divides each step's gradients by the scale exactly once; ``update()`` (here
    through ``step_optimizer``) ends the step, so the next step's gradients are unscaled too:
    over three steps the gradients clipping sees equal an fp32 run's."""
    x = torch.randn(16, 8)
    m32, opt32 = _setup(1)
    m16, opt16 = _setup(1)
    mp = MixedPrecisionTrainer(enabled=True, device="cpu", dtype="float16", init_scale=4096.0)
    for step in range(3):
        opt32.zero_grad()
        opt16.zero_grad()
        m32(x).pow(2).mean().backward()
        mp.scale_loss(m16(x).pow(2).mean()).backward()
        mp.unscale_(opt16)
        for a, b in zip(m32.parameters(), m16.parameters()):
            assert torch.allclose(a.grad, b.grad, rtol=1e-5, atol=1e-7), step
        opt32.step()
        assert mp.step_optimizer(opt16) is True


def test_state_dict_round_trip():
    m, opt = _setup()
    mp = MixedPrecisionTrainer(enabled=True, device="cpu", dtype="float16", init_scale=512.0)
    with mp.autocast():
        loss = m(torch.randn(4, 8)).float().sum()
    mp.scale_loss(loss * 1e30).backward()
    mp.step_optimizer(opt)
    fresh = MixedPrecisionTrainer(enabled=True, device="cpu", dtype="float16")
    fresh.load_state_dict(mp.state_dict())
    assert fresh.scale == mp.scale == 256.0
    assert mp.state_dict()["dtype"] == "float16"


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        (dict(enabled="yes"), TypeError, "enabled must be a bool"),
        (dict(device="gpu0"), ValueError, "device must name a torch device, got 'gpu0'"),
        (dict(device="cpu", dtype="float8"), ValueError, "dtype must be one of .*got 'float8'"),
        (dict(device="cpu", dtype=torch.float32), ValueError, "dtype must be float16 or bfloat16"),
        (dict(device="cpu", init_scale=0), ValueError, "init_scale must be > 0, got 0"),
        (dict(device="cpu", growth_interval=0), ValueError, "growth_interval must be >= 1, got 0"),
    ],
)
def test_rejects_bad_arguments(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        MixedPrecisionTrainer(**kwargs)
