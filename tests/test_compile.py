"""engine/compiled.py: ``compile=True`` trains through ``torch.compile`` with the eager run's
math, compiles once per mode (the short last batch runs eagerly), keeps the module's keys in
checkpoints, and resumes and rolls back like an eager run.

Most tests compile with :class:`Counting`, a backend that records each graph and runs it as
traced (the same torch ops as eager: the runs are bit-exact), or ``aot_eager``; one test uses
the default inductor backend (it generates C++ and compiles it with gcc: 3-10 s with a warm
inductor cache, 15-55 s cold on the shared 2-core machine).
"""

import math
import time

import pytest
import torch
import torch._dynamo
from torch._dynamo.utils import counters

from _helpers import Boom, crashing, make_data, make_model
from advanced_training_utils import checkpoint as ck
from advanced_training_utils import train_model_advanced
from advanced_training_utils.app.models import EmotionRecognizer, EmotionRegressor, NoteGenerator
from advanced_training_utils.engine.compiled import CompiledForward, plain_keys, unwrap_compiled

CE = torch.nn.CrossEntropyLoss()


class Counting:
    """A torch.compile backend that records the example input shapes of each graph it is
    given and runs the graph as traced."""

    def __init__(self):
        self.graphs, self.ops = [], []

    def __call__(self, gm, example_inputs):
        self.graphs.append([tuple(t.shape) for t in example_inputs
                            if isinstance(t, torch.Tensor)])
        self.ops.append([str(n.target) for n in gm.graph.nodes
                         if n.op in ("call_function", "call_module", "call_method")])
        return gm.forward


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


def _loaders(n=100, batch_size=16):
    """Train: 100 examples in batches of 16 (the last has 4); val: 50 (the last has 2)."""
    return (torch.utils.data.DataLoader(make_data(n), batch_size=batch_size, shuffle=True),
            torch.utils.data.DataLoader(make_data(n // 2, seed=1), batch_size=batch_size))


def _run(model=None, epochs=2, **kw):
    model = make_model(0) if model is None else model
    tl, vl = _loaders()
    res = train_model_advanced(model, tl, vl, CE, epochs=epochs, device="cpu", verbose=False,
                               seed=0, **kw)
    return model, res


def _assert_same(a, b, exact=True, rtol=0.0, atol=0.0):
    for (na, pa), (nb, pb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert na == nb
        if exact:
            assert torch.equal(pa, pb), na
        else:
            torch.testing.assert_close(pa, pb, rtol=rtol, atol=atol)


# ------------------------------------------------------------------ compiled == eager
@pytest.mark.parametrize("extra", [{}, {"accumulation_steps": 3},
                                   {"use_mixed_precision": True, "amp_dtype": "bfloat16"}],
                         ids=["plain", "accumulation", "bf16-autocast"])
def test_compiled_run_equals_eager_run(extra):
    """The traced graph runs the eager ops: bit-exact weights and history, short batches and
    accumulation windows and autocast included; one graph for training, one for validation."""
    eager, r_eager = _run(**extra)
    backend = Counting()
    compiled, r_comp = _run(compile=True, compile_options={"backend": backend}, **extra)
    _assert_same(eager, compiled)
    assert [h["val_loss"] for h in r_comp["history"]] == [h["val_loss"] for h in
                                                           r_eager["history"]]
    assert len(backend.graphs) == 2


def test_aot_eager_run_equals_eager_run_within_float32_rounding():
    """aot_eager traces forward and backward to aten ops (decomposed): the same math, rounded
    the same way up to the order of a few float32 operations, hence rtol 1e-6 (it is exact
    here with torch 2.13)."""
    eager, _ = _run(accumulation_steps=2)
    compiled, _ = _run(accumulation_steps=2, compile=True, compile_options={"backend": "aot_eager"})
    _assert_same(eager, compiled, exact=False, rtol=1e-6, atol=1e-7)
    assert counters["stats"]["unique_graphs"] == 2  # it did compile: training and validation


def test_inductor_run_equals_eager_run_within_tolerance():
    """The default backend (inductor: fused C++ kernels, compiled with gcc). Fusion reorders
    float32 sums and uses other exp/tanh implementations: a few ulp per op, which grow
    over 14 Adam steps; measured max abs difference 1.5e-8 (weights ~0.1), asserted with
    rtol 1e-4, atol 1e-6."""
    eager, r_eager = _run()
    t = time.perf_counter()
    compiled, r_comp = _run(compile=True)
    took = time.perf_counter() - t
    _assert_same(eager, compiled, exact=False, rtol=1e-4, atol=1e-6)
    assert counters["stats"]["unique_graphs"] == 2
    for a, b in zip(r_eager["history"], r_comp["history"]):
        assert math.isclose(a["val_loss"], b["val_loss"], rel_tol=1e-5)
    assert took < 120, f"inductor compile + 2 epochs took {took:.1f} s"


# ------------------------------------------------------------------ no recompilation
def test_short_last_batches_run_eagerly_without_recompiling():
    """Two epochs whose last train (4 examples) and val (2) batches are short: exactly two
    graphs, each for a full batch of 16 (training, then validation under no_grad); no
    recompilation is recorded by dynamo."""
    backend = Counting()
    _run(compile=True, compile_options={"backend": backend})
    assert [g[0] for g in backend.graphs] == [(16, 8, 6), (16, 8, 6)]
    assert not counters["recompiles"] and sum(counters["graph_break"].values()) == 0


def test_the_gate_counts_eager_calls_per_mode():
    net = torch.nn.Linear(3, 2)
    fwd = CompiledForward(net, torch.compile(net, backend=Counting()))
    x8, x3 = torch.randn(8, 3), torch.randn(3, 3)
    torch.testing.assert_close(fwd(x3), net(x3))    # first call in training mode compiles
    fwd(x8)                                          # another shape: eager
    with torch.no_grad():
        fwd.eval()
        fwd(x8), fwd(x3)                             # eval compiles for 8; 3 is eager
    assert fwd.compilations == 2 and fwd.eager_calls == 2


def test_dynamic_true_sends_every_batch_through_the_compiled_model():
    backend = Counting()
    _run(compile=True, compile_options={"backend": backend, "dynamic": True}, epochs=1)
    assert len(backend.graphs) == 2  # one shape-generic graph per mode, no eager batch


def test_inputs_varying_beyond_the_batch_dimension_warn_once(caplog):
    net = torch.nn.Conv1d(2, 2, 3)
    fwd = CompiledForward(net, torch.compile(net, backend=Counting()))
    with caplog.at_level("WARNING", logger="advanced_training_utils"):
        for t in (10, 11, 12):
            fwd(torch.randn(4, 2, t))
    warned = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warned) == 1 and "'dynamic': True" in warned[0]


# ------------------------------------------------------------------ graph breaks and the guard
@pytest.mark.parametrize("model, x", [
    (EmotionRecognizer(n_mels=16, width=4), torch.randn(4, 1, 16, 40)),
    (EmotionRegressor(n_mels=16, width=4), torch.randn(4, 1, 16, 40)),
    (NoteGenerator(hidden=16), torch.randn(4, 3)),
], ids=["recognizer", "regressor", "notes"])
def test_builtin_models_compile_without_graph_breaks(model, x):
    explained = torch._dynamo.explain(model.train())(x)
    assert explained.graph_break_count == 0 and explained.graph_count == 1
    with torch.no_grad():
        explained = torch._dynamo.explain(model.eval())(x)
    assert explained.graph_break_count == 0 and explained.graph_count == 1


def test_only_the_model_is_compiled_the_guard_clip_and_step_run_eagerly():
    """A run with the guard, clipping and a per-batch scheduler on: each graph holds exactly
    the ops of the bare model's forward (no loss, optimizer, clip or guard op), and no graph
    break."""
    backend, bare = Counting(), Counting()
    torch.compile(make_model(0), backend=bare)(torch.randn(16, 8, 6))
    _run(compile=True, compile_options={"backend": backend}, gradient_clip=0.5,
         use_scheduler=True, scheduler_type="onecycle", spike_factor=5.0)
    assert backend.ops == bare.ops * 2  # training, validation
    assert [len(g) for g in backend.graphs] == [5, 5]  # input + 2 weights + 2 biases
    assert sum(counters["graph_break"].values()) == 0


# ------------------------------------------------------------------ checkpoints hold plain keys
@pytest.mark.parametrize("compile", [False, True])
def test_a_user_compiled_model_is_saved_with_the_module_keys(tmp_path, compile, caplog):
    plain = make_model(0)
    user = torch.compile(plain, backend=Counting())
    opts = {"compile_options": {"backend": Counting()}} if compile else {}
    with caplog.at_level("INFO", logger="advanced_training_utils"):
        _run(user, epochs=1, compile=compile, checkpoint_dir=tmp_path, **opts)
    saved = ck.load_checkpoint(tmp_path / "model_last.pt")[ck.MODEL_KEY]
    assert list(saved) == list(plain.state_dict())
    fresh = make_model(1)
    fresh.load_state_dict(saved)
    _assert_same(fresh, plain)
    level = "INFO" if compile else "WARNING"
    assert any(r.levelname == level and "torch.compile'd module" in r.getMessage()
               for r in caplog.records)


def test_unwrap_compiled_returns_the_original_module():
    plain = torch.nn.Linear(2, 2)
    assert unwrap_compiled(torch.compile(plain, backend="eager"), compile=True) is plain
    assert unwrap_compiled(plain) is plain


@pytest.mark.parametrize("keys, expected", [
    (["_orig_mod.a", "_orig_mod.b"], ["a", "b"]),
    (["module.a", "module.b"], ["a", "b"]),
    (["module._orig_mod.a"], ["a"]),
    (["_orig_mod.a", "b"], ["_orig_mod.a", "b"]),  # not every key: left as saved
])
def test_plain_keys(keys, expected):
    assert list(plain_keys(dict.fromkeys(keys, 0))) == expected


def _prefixed_copy(path):
    """Rewrite a checkpoint as if saved from torch.compile(model): every model key (and the
    recovery snapshot's) prefixed with ``_orig_mod.``."""
    state = ck.load_checkpoint(path)
    state[ck.MODEL_KEY] = {f"_orig_mod.{k}": v for k, v in state[ck.MODEL_KEY].items()}
    snap = state[ck.RECOVERY_KEY]["snapshot"]
    if snap[ck.MODEL_KEY] is not None:
        snap[ck.MODEL_KEY] = {f"_orig_mod.{k}": v for k, v in snap[ck.MODEL_KEY].items()}
    ck.save_checkpoint(path, {k: v for k, v in state.items() if k != "digest"})


def test_a_checkpoint_with_orig_mod_keys_resumes_bit_exact(tmp_path, caplog):
    ref, _ = _run(epochs=2)
    with pytest.raises(Boom):
        _crash(tmp_path, 9)
    _prefixed_copy(tmp_path / "model_last.pt")
    with caplog.at_level("INFO", logger="advanced_training_utils"):
        resumed, _ = _run(epochs=2, checkpoint_dir=tmp_path, resume=True)
    _assert_same(ref, resumed)
    assert any("prefix '_orig_mod.' removed" in r.getMessage() for r in caplog.records)


def _crash(tmp_path, at, **kw):
    """A run that crashes on criterion call ``at`` (epoch 1 has 7 train + 4 val calls)."""
    tl, vl = _loaders()
    train_model_advanced(make_model(0), tl, vl, crashing(at, CE), epochs=2, device="cpu",
                         verbose=False, seed=0, checkpoint_dir=tmp_path,
                         checkpoint_every_n_steps=1, **kw)


# ------------------------------------------------------------------ resume and rollback
@pytest.mark.parametrize("first, then", [(False, True), (True, False)],
                         ids=["eager-then-compiled", "compiled-then-eager"])
def test_resume_across_compile_is_bit_exact(tmp_path, first, then):
    ref, _ = _run(epochs=2, checkpoint_every_n_steps=1)
    backend = Counting()
    with pytest.raises(Boom):
        _crash(tmp_path, 15, compile=first, compile_options={"backend": backend})
    resumed, _ = _run(epochs=2, checkpoint_dir=tmp_path, resume=True,
                      checkpoint_every_n_steps=1, compile=then,
                      compile_options={"backend": backend})
    _assert_same(ref, resumed)
    assert len(backend.graphs) == 2  # the compiled part: training and validation


def _diverging(**kw):
    """SGD at a 100x too high LR: recovery rolls the weights back in place."""
    F = (12,)
    tl = torch.utils.data.DataLoader(make_data(120, features=F), batch_size=16, shuffle=True)
    vl = torch.utils.data.DataLoader(make_data(60, seed=9, features=F), batch_size=64)
    model = make_model(1, features=F)
    res = train_model_advanced(
        model, tl, vl, CE, epochs=4, learning_rate=5.0, device="cpu", verbose=False, seed=0,
        use_scheduler=False, restore_best_weights=False,
        optimizer=lambda p: torch.optim.SGD(p, lr=5.0, momentum=0.9), rollback_lr_factor=0.1,
        max_rollbacks=5, recovery_check_every=3, **kw)
    return model, res


def test_a_rollback_restores_the_weights_the_compiled_model_sees():
    """Rollbacks load the snapshot into the module in place: the compiled graph (which reads
    the module's parameters) trains on from the restored weights, as the eager run does."""
    eager, r_eager = _diverging()
    assert r_eager["rollbacks"] >= 1
    backend = Counting()
    compiled, r_comp = _diverging(compile=True, compile_options={"backend": backend})
    assert len(backend.graphs) == 2
    assert r_comp["recovery_events"] == r_eager["recovery_events"]
    _assert_same(eager, compiled)


# ------------------------------------------------------------------ errors
def _failing_backend(gm, example_inputs):
    raise RuntimeError("no kernel for this op")


def test_a_model_the_compiler_cannot_handle_fails_naming_compile_true():
    with pytest.raises(ValueError, match=r"compile=True: torch.compile could not compile .*"
                                         r"no kernel for this op.*compile=False"):
        _run(compile=True, compile_options={"backend": _failing_backend}, epochs=1)


class _DataDependent(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(48, 3)

    def forward(self, x):
        h = self.lin(x.flatten(1))
        return h if h.sum() > 0 else -h  # a graph break: refused under fullgraph=True


def test_a_graph_break_under_fullgraph_fails_naming_compile_true():
    with pytest.raises(ValueError, match="compile=True: torch.compile could not compile"):
        _run(_DataDependent(), compile=True,
             compile_options={"backend": Counting(), "fullgraph": True}, epochs=1)


def test_a_model_that_fails_eagerly_too_raises_its_own_error():
    broken = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(5, 3))  # 48 inputs
    with pytest.raises(ValueError, match="failed on inputs shaped") as e:
        _run(broken, compile=True, compile_options={"backend": Counting()}, epochs=1)
    assert "compile=True" not in str(e.value) and "48" in str(e.value)
