"""Differential test: ``train_model_advanced`` against a plain hand-written loop.

One strategy draws a configuration (scheduler x warmup, accumulation with batch sizes that do not
divide the data, sampler kind, clipping, loader with or without ``__len__``, map-style or iterable
dataset, optimizer, validation set, one or two processes); ``run_ours`` trains a tiny float64 MLP
with the package; ``run_reference`` trains a copy with ``reference_loop.train_reference`` (which
states the intended math and imports nothing from the package); one assertion compares the final
weights (``max |dw| <= ATOL``).

The same user objects (model, loaders, samplers) are built twice, once per side, from the
configuration: the reference iterates the user's own loader, so "the same data order" means the
order the user's plain ``for x, y in loader`` loop would see. Recovery, augmentation, mixed
precision, early stopping and checkpoints are off; both sides get the same optimizer factory
(SGD with or without momentum, or torch's ``AdamW(foreach=False)``), so the math is identical.

Two processes (``test_two_processes_match_reference_loop``): a few drawn configurations run in one
``torchrun`` launch (``diff_worker.py``). Each rank records every complete pass over the user's
sampler; the draws of epoch ``e`` are its last ``epochs`` complete passes (a rank may seed them
per epoch; both ranks must draw alike). Rank ``r`` trains on ``draws[r::2]``, so global step ``s``
sees ``draws[2bs : 2b(s + 1)]``, which the reference trains on as one batch. Data sizes are even
there (no padding question), and the loaders are map-style DataLoaders.

Not drawn, on purpose: onecycle with a loader that has no length (the package refuses it with a
``ValueError``, documented); an explicit ``T_max`` (the cosine horizon is the run's length).

Classes: the one-process test is parametrized by scheduler type x data source (40 classes) and
draws the rest (warmup, sizes, accumulation, clipping, optimizer, validation set, seed). Profiles:
``diff-ci`` (the default: 3 configurations per class, 120 in all, seeded per class so CI sees the
same ones on every run; the first draw of each class is a telling one: a short micro-batch inside
an accumulation window, warmup, clipping) and ``diff-long`` (30 random configurations per class):
``ADVTRAIN_DIFF_PROFILE=diff-long pytest tests/test_differential.py``.

The intended semantics (warmup, accumulation, samplers under DDP, iterables without
``__len__``) are stated in ``reference_loop.py``; ``test_known_defect_example`` keeps one explicit
configuration per defect the hardening issue fixed (each failed before its fix).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, Phase, given, seed, settings
from hypothesis import strategies as st
from torch.utils.data import (
    DataLoader,
    IterableDataset,
    RandomSampler,
    Sampler,
    SubsetRandomSampler,
    TensorDataset,
    WeightedRandomSampler,
)

from advanced_training_utils import train_model_advanced
from reference_loop import train_reference

ATOL = 1e-9          # float64 model and data: only summation order differs between the two sides
ROOT = Path(__file__).resolve().parents[1]
WORKER = Path(__file__).with_name("diff_worker.py")
MSE = torch.nn.MSELoss()

# CI: 3 examples per class (40 classes: 120 configurations), seeded per class; no shrinking
# (a drawn configuration is small and printed whole). diff-long: 30 random ones per class.
_NO_SHRINK = [Phase.explicit, Phase.reuse, Phase.generate]
settings.register_profile("diff-ci", max_examples=3, derandomize=False, deadline=None,
                          database=None, phases=_NO_SHRINK,
                          suppress_health_check=list(HealthCheck))
settings.register_profile("diff-long", max_examples=30, deadline=None, database=None,
                          suppress_health_check=list(HealthCheck))
PROFILE_NAME = os.environ.get("ADVTRAIN_DIFF_PROFILE", "diff-ci")
PROFILE = settings.get_profile(PROFILE_NAME)

SCHEDULERS = ("none", "plateau", "cosine", "step", "exp", "onecycle")
SAMPLERS = ("random", "subset", "weighted", "custom")
# Data classes: a map-style DataLoader with each sampler kind; a generator over such a loader
# (no __len__; sampler drawn); a DataLoader over an IterableDataset without / with __len__.
DATA = tuple(f"map:{k}" for k in SAMPLERS) + ("unsized", "iterable", "iterable_sized")
CLASSES = [(s, d) for s in SCHEDULERS for d in DATA
           if not (s == "onecycle" and d in ("unsized", "iterable"))]


# ---------------------------------------------------------------------------- configurations
@dataclasses.dataclass(frozen=True)
class Config:
    """One drawn run. ``n`` items, micro-batches of ``batch`` (per process)."""

    procs: int = 1
    loader: str = "map"           # map | unsized (a generator over a DataLoader) | iterable[_sized]
    sampler: str = "random"       # for map/unsized: random | subset | weighted | custom
    n: int = 10
    batch: int = 3
    accumulation: int = 1
    scheduler: str = "none"
    warmup: int = 0
    clip: float | None = None
    optimizer: str = "sgd"        # sgd | sgd_momentum | adamw
    val: bool = False
    epochs: int = 3
    lr: float = 0.05
    seed: int = 0
    gamma: float = 0.5
    step_size: int = 1
    min_lr: float = 0.0
    patience: int = 0
    pct_start: float = 0.3

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def one_of(*values: Any) -> st.SearchStrategy[Any]:
    """``sampled_from`` whose first value (the one Hypothesis tries first and shrinks towards)
    is the most telling one, e.g. a batch size that leaves a short last micro-batch."""
    return st.sampled_from(values)


@st.composite
def draw_config(draw: Any, procs: int = 1, scheduler: str | None = None,
                data: str | None = None) -> Config:
    """A random configuration. ``scheduler`` and ``data`` (one of ``DATA``) fix the class;
    with two processes the loaders are map-style and the sampler's draws even in number."""
    data = data or draw(st.sampled_from(DATA if procs == 1 else DATA[:4]))
    loader, _, sampler = data.partition(":")
    sized = loader in ("map", "iterable_sized")
    scheduler = scheduler or draw(st.sampled_from(SCHEDULERS if sized else SCHEDULERS[:-1]))
    # plateau: enough epochs after warmup for a reduction to change the weights
    epochs = draw(one_of(5, 4) if scheduler == "plateau" else one_of(3, 2, 4))
    if scheduler == "onecycle":
        warmup = draw(one_of(2, 0, 1, 3))
    elif scheduler == "none":
        warmup = 0
    else:
        warmup = draw(one_of(1, 0, 2).filter(lambda w: w < epochs))
    c = Config(
        procs=procs, loader=loader, scheduler=scheduler, warmup=warmup, epochs=epochs,
        sampler=sampler or draw(st.sampled_from(SAMPLERS)),
        n=draw(st.integers(6, 12)) * 2 if procs == 2 else draw(one_of(10, 7, 13, 5, 16, 17)),
        batch=draw(one_of(3, 2, 4, 5, 1) if procs == 1 else one_of(3, 2, 1)),
        accumulation=draw(one_of(2, 3, 4, 1)), clip=draw(one_of(0.05, None, 1.0)),
        optimizer=draw(one_of("sgd_momentum", "adamw", "sgd")), val=draw(one_of(True, False)),
        lr=draw(one_of(0.05, 0.2)), seed=draw(st.integers(0, 3)), gamma=draw(one_of(0.5, 0.8)),
        step_size=draw(one_of(1, 2)), min_lr=draw(one_of(1e-3, 0.0)),
        patience=draw(one_of(0, 1)), pct_start=draw(one_of(0.3, 0.5)),
    )
    if scheduler == "onecycle":  # torch's rise must not be exactly 1 step (0/0 in torch); the
        total = epochs * steps_per_epoch(c)  # warmup must leave a step for the anneal
        c = dataclasses.replace(c, warmup=warmup if warmup <= total - 2 else 0,
                                pct_start=0.3 if c.pct_start * total == 1 else c.pct_start)
    return c


# ---------------------------------------------------------------------------- the user's objects
class Recording:
    """Mixin: a sampler that records each complete pass it yields (the two-process check)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.passes: list[list[int]] = []

    def __iter__(self) -> Iterator[int]:
        draws = []
        for i in super().__iter__():
            draws.append(int(i))
            yield i
        self.passes.append(draws)


class BlockShuffleSampler(Sampler[int]):
    """A user's own sampler: blocks of two neighbouring items in a random order (global RNG)."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __iter__(self) -> Iterator[int]:
        blocks = [list(range(i, min(i + 2, self.n))) for i in range(0, self.n, 2)]
        for k in torch.randperm(len(blocks)).tolist():
            yield from blocks[k]


class _RecRandom(Recording, RandomSampler):
    pass


class _RecSubset(Recording, SubsetRandomSampler):
    pass


class _RecWeighted(Recording, WeightedRandomSampler):
    pass


class _RecBlocks(Recording, BlockShuffleSampler):
    pass


class Unsized:
    """A re-iterable without ``__len__``: a generator over an inner loader's batches."""

    def __init__(self, inner: DataLoader) -> None:
        self.inner = inner

    def __iter__(self) -> Iterator[Any]:
        yield from self.inner


class Stream(IterableDataset):
    """An iterable-style dataset that reshuffles its items on each pass (global RNG)."""

    def __init__(self, ds: TensorDataset) -> None:
        self.ds = ds

    def __iter__(self) -> Iterator[Any]:
        for i in torch.randperm(len(self.ds)).tolist():
            yield self.ds[i]


class SizedStream(Stream):
    def __len__(self) -> int:
        return len(self.ds)


def dataset(n: int, seed: int) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, generator=g, dtype=torch.float64)
    y = torch.stack([x[:, 0] * x[:, 1], torch.sin(x[:, 2])], 1)
    return TensorDataset(x, y + 0.1 * torch.randn(n, 2, generator=g, dtype=torch.float64))


def model() -> torch.nn.Module:
    torch.manual_seed(1234)
    return torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(),
                               torch.nn.Linear(4, 2)).double()


def subset_indices(c: Config) -> list[int]:
    """A train split: every item but each third one (an even count with two processes)."""
    idx = [i for i in range(c.n) if i % 3]
    return idx[:len(idx) // 2 * 2] if c.procs == 2 else idx


def weighted_draws(c: Config) -> int:
    return c.n + 2 if c.procs == 2 else c.n + 1


def make_sampler(c: Config) -> Sampler[int]:
    """The user's sampler; recording subclasses with two processes."""
    rec = c.procs == 2
    if c.sampler == "random":
        return (_RecRandom if rec else RandomSampler)(
            range(c.n), generator=torch.Generator().manual_seed(c.seed + 7))
    if c.sampler == "subset":
        return (_RecSubset if rec else SubsetRandomSampler)(subset_indices(c))
    if c.sampler == "weighted":
        weights = torch.linspace(0.1, 1.0, c.n, dtype=torch.float64)
        return (_RecWeighted if rec else WeightedRandomSampler)(weights, weighted_draws(c))
    return (_RecBlocks if rec else BlockShuffleSampler)(c.n)


def build_loaders(c: Config) -> tuple[Any, DataLoader | None]:
    """The user's train and validation loaders (fresh objects and generators on each call)."""
    ds = dataset(c.n, 0)
    if c.loader in ("iterable", "iterable_sized"):
        train: Any = DataLoader((SizedStream if c.loader == "iterable_sized" else Stream)(ds),
                                batch_size=c.batch)
    elif c.sampler == "random" and c.procs == 1:   # the ordinary way: shuffle with a generator
        train = DataLoader(ds, batch_size=c.batch, shuffle=True,
                           generator=torch.Generator().manual_seed(c.seed + 7))
    else:
        train = DataLoader(ds, batch_size=c.batch, sampler=make_sampler(c))
    if c.loader == "unsized":
        train = Unsized(train)
    # Validation: 6 training inputs with negated targets, so that training makes it worse and
    # plateau reductions happen (and change the weights) in most plateau runs.
    x, y = ds.tensors
    val = DataLoader(TensorDataset(x[:6], -y[:6]), batch_size=4) if c.val else None
    return train, val


def optimizer_factory(c: Config) -> Any:
    if c.optimizer == "adamw":
        return lambda p: torch.optim.AdamW(p, lr=c.lr, weight_decay=0.01, foreach=False)
    return lambda p: torch.optim.SGD(p, lr=c.lr, momentum=0.9 if c.optimizer == "sgd_momentum"
                                     else 0.0, foreach=False)


def items_per_epoch(c: Config) -> int:
    """How many items one process sees per epoch."""
    per_sampler = {"subset": len(subset_indices(c)), "weighted": weighted_draws(c)}
    n = c.n if c.loader.startswith("iterable") else per_sampler.get(c.sampler, c.n)
    return n // c.procs


def steps_per_epoch(c: Config) -> int:
    return math.ceil(math.ceil(items_per_epoch(c) / c.batch) / c.accumulation)


# ---------------------------------------------------------------------------- the two sides
def run_ours(c: Config) -> tuple[torch.nn.Module, Any]:
    """Train with the package; returns the model and the (possibly recording) train loader."""
    net = model()
    train, val = build_loaders(c)
    train_model_advanced(
        net, train, val, MSE, epochs=c.epochs, learning_rate=c.lr, device="cpu", seed=c.seed,
        optimizer=optimizer_factory(c), accumulation_steps=c.accumulation, gradient_clip=c.clip,
        use_scheduler=c.scheduler != "none",
        scheduler_type=c.scheduler if c.scheduler != "none" else "plateau",
        warmup_steps=c.warmup, gamma=c.gamma, step_size=c.step_size, min_lr=c.min_lr,
        plateau_patience=c.patience, factor=0.5, recovery=False,
        # onecycle: warmup_steps is the length of its rise, so pct_start only without warmup
        **({} if c.warmup else {"pct_start": c.pct_start}),
        restore_best_weights=False, checkpoint_dir=None, handle_signals=False, verbose=False)
    return net, train


def run_reference(c: Config, passes: list[list[int]] | None = None) -> torch.nn.Module:
    """Train with the reference loop. ``passes``: with two processes, the sampler's draws per
    epoch (the global batch of step ``s`` is ``draws[2bs : 2b(s + 1)]``)."""
    net = model()
    torch.manual_seed(c.seed)           # as the package does first
    train, val = build_loaders(c)
    if passes is None:
        batches: Any = lambda epoch: train  # noqa: E731  (the user's own loop)
    else:
        ds, width = train.dataset, c.batch * c.procs

        def batches(epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
            draws = passes[epoch]
            for s in range(0, len(draws), width):
                yield ds[draws[s:s + width]]
    if c.scheduler == "onecycle":
        schedule = {"pct_start": c.pct_start}
    else:
        schedule = {"gamma": c.gamma, "step_size": c.step_size, "min_lr": c.min_lr}
    train_reference(net, batches, MSE, optimizer_factory(c)(list(net.parameters())),
                    epochs=c.epochs, lr=c.lr, accumulation=c.accumulation, clip=c.clip,
                    kind=c.scheduler, warmup=c.warmup, steps_per_epoch=steps_per_epoch(c),
                    val=(lambda: val) if val is not None else None, patience=c.patience,
                    factor=0.5, **schedule)
    return net


def max_dw(ours: dict[str, torch.Tensor], ref: dict[str, torch.Tensor]) -> float:
    return max((ours[k] - ref[k]).abs().max().item() for k in ref)


def assert_same(ours: dict[str, torch.Tensor], ref: dict[str, torch.Tensor], c: Config) -> None:
    """The one assertion: the final weights agree."""
    dw = max_dw(ours, ref)
    assert dw <= ATOL, f"{c}: final weights differ from the reference loop, max |dw| = {dw:.3g}"


# ---------------------------------------------------------------------------- one process
@pytest.mark.parametrize("scheduler,data", CLASSES)
def test_matches_reference_loop(scheduler, data):
    """Every class (scheduler type x data source) with its own drawn configurations; seeded by
    the class, so CI sees the same examples on every run."""

    @PROFILE
    @given(draw_config(scheduler=scheduler, data=data))
    def check(c: Config) -> None:
        assert_same(run_ours(c)[0].state_dict(), run_reference(c).state_dict(), c)

    if PROFILE_NAME == "diff-ci":
        check = seed(CLASSES.index((scheduler, data)))(check)
    check()


# One explicit example per defect found by this test (each failed before its fix).
def _defect(config: Config, reason: str, ident: str) -> Any:
    return pytest.param(config, id=ident)


DEFECTS = [
    _defect(Config(sampler="subset", n=10, batch=2, scheduler="cosine", warmup=1, epochs=4),
             "#2: warmup shortens the cosine schedule", "2-cosine-warmup"),
    _defect(Config(sampler="subset", n=10, batch=2, scheduler="onecycle", warmup=2),
             "#2: onecycle warms up twice", "2-onecycle-warmup"),
    _defect(Config(sampler="subset", n=10, batch=4, accumulation=2),  # micro-batches 4 + 2
             "#3: micro-batch means are weighted equally", "3-short-micro-batch"),
    _defect(Config(loader="unsized", sampler="subset", n=10, batch=2, accumulation=2),
             "#3: without __len__ the last partial window is dropped",  # 3 batches
             "3-no-len-last-window"),
    _defect(Config(loader="iterable", n=10, batch=3),
             "#19: an IterableDataset without __len__ raises TypeError", "19-iterable"),
    _defect(Config(sampler="random", n=10, batch=3),
             "found here: check_inputs' iter() and first_batch's peek advance the "
             "DataLoader's seeded generator", "seeded-generator-order"),
]


@pytest.mark.parametrize("c", DEFECTS)
def test_known_defect_example(c):
    assert_same(run_ours(c)[0].state_dict(), run_reference(c).state_dict(), c)


# ---------------------------------------------------------------------------- two processes
def draw_one(strategy: st.SearchStrategy[Config], run_seed: int, k: int = 6) -> Config:
    """The ``k``-th distinct draw of ``strategy`` in a run seeded with ``run_seed``
    (reproducible; a run's first draws are its simplest ones). Draws one torchrun launch's
    configurations up front."""
    out: list[Config] = []

    @seed(run_seed)
    @settings(max_examples=3 * k, database=None, phases=[Phase.generate], deadline=None)
    @given(strategy)
    def collect(c: Config) -> None:
        if c not in out:
            out.append(c)

    collect()
    return out[min(k, len(out)) - 1]


def _torchrun(out: Path, configs: list[Config]) -> subprocess.CompletedProcess[str]:
    (out / "configs.json").write_text(json.dumps([c.to_json() for c in configs]))
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT / "src") + os.pathsep + env.get("PYTHONPATH", "")
    env.pop("WORLD_SIZE", None)
    p = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone",
                          "--nproc-per-node", "2", str(WORKER), str(out)], env=env, text=True,
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        log, _ = p.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        raise
    return subprocess.CompletedProcess(p.args, p.returncode, log, None)


# (sampler kind, run seed): every kind, 5 runs in one launch, each with accumulation and a short
# last window. Seeds picked from the draws to cover: onecycle, AdamW, clipping (random 5);
# plateau on the training loss (subset 6); plateau on a sharded validation set (weighted 38);
# exp after warmup (custom 2); a short micro-batch inside a window, i.e. #3 (subset 14).
DDP_DRAWS = [("random", 5), ("subset", 6), ("weighted", 38), ("custom", 2), ("subset", 14)]


def test_two_processes_match_reference_loop(tmp_path):
    configs = [draw_one(draw_config(procs=2, data=f"map:{s}"), r) for s, r in DDP_DRAWS]
    done = _torchrun(tmp_path, configs)
    assert done.returncode == 0, done.stdout[-3000:]
    failures = []
    for i, c in enumerate(configs):
        r0, r1 = (torch.load(tmp_path / f"{i}_rank{r}.pt", weights_only=True) for r in (0, 1))
        if r0["error"] or r1["error"]:
            failures.append(f"{c}: raised {r0['error'] or r1['error']}")
            continue
        if r0["passes"][-c.epochs:] != r1["passes"][-c.epochs:] or len(r0["passes"]) < c.epochs:
            failures.append(f"{c}: the ranks did not draw alike from the user's sampler "
                            f"({len(r0['passes'])} and {len(r1['passes'])} complete passes "
                            f"for {c.epochs} epochs)")
            continue
        ref = run_reference(c, passes=r0["passes"][-c.epochs:]).state_dict()
        dw = max_dw(r0["state"], ref)
        if dw > ATOL:
            failures.append(f"{c}: final weights differ from the reference loop, max |dw| = "
                            f"{dw:.3g}")
    assert not failures, "\n".join(failures)
