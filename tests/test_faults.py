"""Fault injection over every write and signal path (harness: tests/faults.py).

(a) ENOSPC / EIO at a chosen write of each file the engine writes (checkpoints, the best copy,
    the rotation, the metrics log, its rewrite on resume, TensorBoard) -> training goes on, the
    failure is logged, no temporary file is left, the newest checkpoint resumes; repeated
    failures raise CheckpointError.
(b) SIGKILL at file operations drawn with a fixed seed (inside checkpoint writes and rotations)
    -> resume is bit-exact with an uninterrupted run and no temporary file is left.
(c) SIGTERM in every phase (training step, validation, checkpoint write, last epoch), with the
    default checkpoint_every_n_steps=None -> exit code 143, a checkpoint at the step where
    training stopped, resume bit-exact; two SIGTERMs 50 ms apart to a real process likewise.
(d) each checkpoint file in turn truncated, bit-flipped, zeroed or deleted -> resume picks the
    newest intact one and matches training from that file.
(e) a symlink planted at each name we write never redirects a write outside the folder.
"""

import errno
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
import types
from pathlib import Path

import pytest
import torch

from _helpers import make_loaders
from advanced_training_utils import CheckpointError, load_checkpoint, train_model_advanced
from advanced_training_utils.checkpoint import EPOCH_KEY, STEP_KEY, checkpoint_chain
from advanced_training_utils.engine.preemption import TrainingPreempted
from faults import OPS, FileFaults, temp_files

CE = torch.nn.CrossEntropyLoss()
ROOT = Path(__file__).resolve().parents[1]
WORKER = Path(__file__).with_name("crash_worker.py")
STEPS = 6  # optimizer steps per epoch: 48 examples, batch size 8
OPTS = dict(epochs=3, learning_rate=3e-3, device="cpu", verbose=False, seed=0, model_name="m",
            restore_best_weights=False)


def _model(seed=1):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(48, 16), torch.nn.ReLU(),
                               torch.nn.Dropout(0.2), torch.nn.Linear(16, 3))


def _loaders():
    return make_loaders(n=48, batch_size=8)


def _train(folder, model=None, criterion=CE, **kw):
    tl, vl = _loaders()
    model = model if model is not None else _model()
    return model, train_model_advanced(model, tl, vl, criterion, checkpoint_dir=folder,
                                       **{**OPTS, **kw})


def _same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def _position(path):
    obj = load_checkpoint(path)
    return obj[EPOCH_KEY], obj[STEP_KEY]


@pytest.fixture(scope="module")
def reference():
    """Final weights of an uninterrupted run (no checkpoint folder needed for the weights)."""
    tl, vl = _loaders()
    m = _model()
    r = train_model_advanced(m, tl, vl, CE, **OPTS)
    return m, r


# ------------------------------------------------------------------ (a) ENOSPC / EIO per path
# (ops, file glob, nth matching call, extra options); nth picks a write before the last epoch.
WRITE_SITES = {
    "step checkpoint": ("write", ".m_last.pt.*.tmp", 2, {"checkpoint_every_n_steps": 2}),
    "epoch checkpoint (writer thread)": ("write", ".m_last.pt.*.tmp", 1, {}),
    "best copy": ("write", ".m_best.pt.*.tmp", 1, {}),
    "fsync": ("fsync", ".m_last.pt.*.tmp", 2, {}),
    "rotation link": ("link", "m_last.pt", 1, {"keep_last": 3}),
    "rotation rename": ("replace", "m_last.2.pt", 1, {"keep_last": 3,
                                                      "checkpoint_every_n_steps": 2}),
    "final rename": ("replace", "m_last.pt", 2, {}),
    "metrics append": ("write", "m_metrics.jsonl", 1, {}),
}


def _check_folder_after_faults(folder, model, res, epochs=3):
    assert temp_files(folder) == []
    for p in [folder / "m_best.pt", *checkpoint_chain(folder / "m_last.pt", 8)]:
        if p.exists():
            load_checkpoint(p)  # every file at a final name is intact
    assert _position(folder / "m_last.pt") == (epochs, 0)
    lines = (folder / "m_metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["epoch"] for x in lines] == [e["epoch"] for e in res["history"]]
    resumed, _ = _train(folder, _model(9), resume=True, epochs=epochs)
    assert _same_weights(resumed, model)


@pytest.mark.parametrize("err", [errno.ENOSPC, errno.EIO], ids=["ENOSPC", "EIO"])
@pytest.mark.parametrize("site", list(WRITE_SITES))
def test_one_failed_write_is_logged_and_training_goes_on(tmp_path, monkeypatch, caplog, site,
                                                         err):
    ops, pattern, nth, extra = WRITE_SITES[site]
    faults = FileFaults(tmp_path).fail(ops, pattern, err, nth=nth).install(monkeypatch)
    model, res = _train(tmp_path, **extra)
    monkeypatch.undo()
    assert faults.fired, f"the fault at {site} never fired: {faults.seen}"
    assert res["epochs_run"] == 3
    assert "write failed" in caplog.text and os.strerror(err) in caplog.text
    _check_folder_after_faults(tmp_path, model, res)


def test_failed_metrics_rewrite_on_resume(tmp_path, monkeypatch, caplog):
    _train(tmp_path, epochs=2)
    faults = FileFaults(tmp_path).fail("write", ".m_metrics.jsonl.*.tmp", errno.ENOSPC
                                       ).install(monkeypatch)
    model, res = _train(tmp_path, resume=True)
    monkeypatch.undo()
    assert faults.fired and "metrics log write failed" in caplog.text
    _check_folder_after_faults(tmp_path, model, res)


@pytest.mark.parametrize("site", ["step checkpoint", "fsync", "rotation rename",
                                  "metrics append"])
def test_repeated_failed_writes_raise_checkpoint_error(tmp_path, monkeypatch, site):
    ops, pattern, _, extra = WRITE_SITES[site]
    FileFaults(tmp_path).fail(ops, pattern, errno.ENOSPC, always=True).install(monkeypatch)
    with pytest.raises(CheckpointError, match="3 (checkpoint|metrics log) writes failed in a"):
        _train(tmp_path, **{**extra, "checkpoint_every_n_steps": 1})
    monkeypatch.undo()
    assert temp_files(tmp_path) == []


def test_unwritable_folder_probe_fails_before_training(tmp_path, monkeypatch):
    FileFaults(tmp_path).fail("open", "*.write-test.*", errno.EACCES).install(monkeypatch)
    with pytest.raises(CheckpointError, match="checkpoint_dir is not writable"):
        _train(tmp_path)


def test_failed_tensorboard_write_is_logged(tmp_path, monkeypatch, caplog):
    class Writer:  # stands in for torch.utils.tensorboard.SummaryWriter (may not be installed)
        def __init__(self, logdir):
            self.calls = 0

        def add_scalar(self, *a):
            raise OSError(errno.ENOSPC, "No space left on device")

        def close(self):
            pass

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard",
                        types.SimpleNamespace(SummaryWriter=Writer))
    model, res = _train(tmp_path, tensorboard=True)
    assert res["epochs_run"] == 3 and "TensorBoard write failed" in caplog.text
    _check_folder_after_faults(tmp_path, model, res)


# ------------------------------------------------------------------ (d) damaged files
DAMAGES = ["truncate", "flip", "zero", "delete"]
FILES = ["m_last.pt", "m_last.1.pt", "m_last.2.pt", "m_best.pt"]


def _damage(path, how):
    if how == "delete":
        path.unlink()
        return
    at = 0
    if how == "flip":  # one bit inside the stored weights (not in alignment padding)
        w = load_checkpoint(path)["model"]["1.weight"].numpy().tobytes()
        at = path.read_bytes().find(w) + len(w) // 2
        assert at > len(w) // 2
    with open(path, "r+b") as f:  # in place: the same inode (what a hard link would share)
        if how == "truncate":
            f.truncate(path.stat().st_size // 2)
        elif how == "zero":
            f.truncate(0)
        else:
            f.seek(at)
            b = f.read(1)
            f.seek(at)
            f.write(bytes([b[0] ^ 0x04]))


@pytest.fixture(scope="module")
def damaged_base(tmp_path_factory):
    """A finished 3-epoch run (keep_last=3; every epoch improved, so _best.pt == _last.pt) and
    a cache of runs resumed to epoch 4 from each undamaged file."""
    folder = tmp_path_factory.mktemp("base")
    _, res = _train(folder, keep_last=3, restore_best_weights=True)
    assert res["best_epoch"] == 3  # _best.pt and _last.pt hold the same checkpoint
    assert [_position(folder / f) for f in FILES] == [(3, 0), (2, 0), (1, 0), (3, 0)]
    return folder, {}


def _copy_folder(src, dst):
    """Copy a checkpoint folder keeping hard links as hard links (what a damage in place to a
    shared file does must be reproduced in the copy)."""
    seen = {}
    for p in sorted(Path(src).iterdir()):
        if p.is_file():
            ino = os.stat(p).st_ino
            if ino in seen:
                os.link(seen[ino], Path(dst) / p.name)
            else:
                shutil.copy2(p, Path(dst) / p.name)
                seen[ino] = Path(dst) / p.name


def _resumed_from(base, cache, tmp_path_factory, name):
    """Weights after resuming to epoch 4 from the undamaged file ``name`` (cached)."""
    if name not in cache:
        folder = tmp_path_factory.mktemp("ref")
        _copy_folder(base, folder)
        cache[name], _ = _train(folder, _model(5), resume=str(folder / name), epochs=4,
                                keep_last=3, restore_best_weights=True)
    return cache[name]


@pytest.mark.parametrize("how", DAMAGES)
@pytest.mark.parametrize("damaged", FILES)
def test_damaged_file_resume_picks_newest_intact(tmp_path, tmp_path_factory, damaged_base,
                                                 damaged, how, caplog):
    base, cache = damaged_base
    _copy_folder(base, tmp_path)
    _damage(tmp_path / damaged, how)
    # The newest intact file: _last.pt unless it is the damaged one; then _best.pt (the same
    # epoch-3 checkpoint, an independent copy), else _last.1.pt.
    expected = "m_best.pt" if damaged == "m_last.pt" else "m_last.pt"
    model, res = _train(tmp_path, _model(5), resume=True, epochs=4, keep_last=3,
                        restore_best_weights=True)
    assert res["epochs_run"] == 4
    assert _same_weights(model, _resumed_from(base, cache, tmp_path_factory, expected))
    if damaged == "m_last.pt":
        assert "falling back to the newest intact checkpoint" in caplog.text


def test_damaged_last_and_best_fall_back_to_older(tmp_path, tmp_path_factory, damaged_base):
    base, cache = damaged_base
    _copy_folder(base, tmp_path)
    _damage(tmp_path / "m_last.pt", "truncate")
    _damage(tmp_path / "m_best.pt", "flip")
    model, res = _train(tmp_path, _model(5), resume=True, epochs=4, keep_last=3,
                        restore_best_weights=True)
    assert _same_weights(model, _resumed_from(base, cache, tmp_path_factory, "m_last.1.pt"))


@pytest.mark.parametrize("how", DAMAGES)
def test_damaged_best_restores_best_weights_from_the_chain(tmp_path, how, caplog):
    """Only epoch 1 improves (min_delta=10); with _best.pt damaged, resume and
    restore_best_weights take epoch 1's weights from _last.2.pt, with a warning."""
    _train(tmp_path, keep_last=3, min_delta=10.0, restore_best_weights=True)
    want = load_checkpoint(tmp_path / "m_last.2.pt")["model"]
    _damage(tmp_path / "m_best.pt", how)
    model, res = _train(tmp_path, _model(5), resume=True, keep_last=3, min_delta=10.0,
                        restore_best_weights=True)
    assert res["best_epoch"] == 1
    assert all(torch.equal(model.state_dict()[k], want[k]) for k in want)
    if how != "delete":
        assert "restore_best_weights: skipping" in caplog.text


# ------------------------------------------------------------------ (c) SIGTERM in each phase
@pytest.fixture
def sigterm_guard():
    """If our handler were not installed, a SIGTERM would end pytest: fail the test instead."""
    def guard(signum, frame):
        raise AssertionError("SIGTERM reached the default handler")
    previous = signal.signal(signal.SIGTERM, guard)
    yield
    signal.signal(signal.SIGTERM, previous)


def _term_criterion(phase, at):
    """CE that sends this process SIGTERM at the ``at``-th batch of ``phase`` (train/val)."""
    calls = {"train": 0, "val": 0}

    def crit(out, y):
        kind = "train" if torch.is_grad_enabled() else "val"
        calls[kind] += 1
        if kind == phase and calls[kind] == at:
            os.kill(os.getpid(), signal.SIGTERM)
        return CE(out, y)
    return crit


# phase -> (criterion or None, expected (epochs done, batch) of the preemption checkpoint)
SIGTERM_PHASES = {
    "training step": (("train", 4), (0, 4)),
    "last step of an epoch": (("train", STEPS), (0, STEPS)),
    "validation": (("val", 2), (1, 0)),
    "last epoch, training": (("train", 2 * STEPS + 3), (2, 3)),
    "last epoch, validation": (("val", 3 * 3), (3, 0)),
}


@pytest.mark.parametrize("phase", list(SIGTERM_PHASES))
def test_sigterm_in_each_phase_checkpoints_where_it_stopped(tmp_path, reference, sigterm_guard,
                                                            phase):
    (kind, at), position = SIGTERM_PHASES[phase]
    with pytest.raises(TrainingPreempted) as e:
        _train(tmp_path, criterion=_term_criterion(kind, at))  # checkpoint_every_n_steps=None
    assert e.value.code == 143
    assert _position(tmp_path / "m_last.pt") == position
    model, res = _train(tmp_path, _model(9), resume=True)
    assert _same_weights(model, reference[0])
    strip = lambda h: [{k: v for k, v in x.items() if k != "seconds"} for x in h]  # noqa: E731
    assert strip(res["history"]) == strip(reference[1]["history"])


def test_sigterm_during_checkpoint_write(tmp_path, reference, sigterm_guard, monkeypatch):
    faults = FileFaults(tmp_path).kill("write", ".m_last.pt.*.tmp", nth=1, sig=signal.SIGTERM)
    faults.install(monkeypatch)
    with pytest.raises(TrainingPreempted) as e:
        _train(tmp_path)
    monkeypatch.undo()
    assert faults.fired and e.value.code == 143
    assert temp_files(tmp_path) == []
    load_checkpoint(tmp_path / "m_last.pt")
    model, _ = _train(tmp_path, _model(9), resume=True)
    assert _same_weights(model, reference[0])


# ------------------------------------------------------------------ (e) planted symlinks
PLANTED = {  # name -> whether the planted link points at an existing outside file
    ".m.write-test": False,            # the write probe's former fixed name
    ".m_last.pt.link.tmp": False,      # the rotation's former fixed temporary name
    "m_metrics.jsonl": True,
    "m_last.pt": True,
    "m_last.1.pt": True,
    "m_best.pt": True,
}


@pytest.mark.parametrize("name", list(PLANTED))
def test_planted_symlink_never_redirects_a_write(tmp_path, name):
    folder, outside = tmp_path / "ck", tmp_path / "outside"
    folder.mkdir()
    outside.mkdir()
    target = outside / "victim"

    def plant():
        if target.exists() or PLANTED[name]:
            target.write_bytes(b"precious")
        if os.path.lexists(folder / name):
            os.unlink(folder / name)
        os.symlink(target, folder / name)

    calls = [0]

    def crit(out, y):  # plant again in the middle of the run (after epoch 1)
        calls[0] += 1
        if calls[0] == STEPS + 3 + 1:
            plant()
        return CE(out, y)

    plant()
    _train(folder, criterion=crit, epochs=2, keep_last=3)
    plant()
    _train(folder, criterion=crit, resume=True, keep_last=3)
    if PLANTED[name]:
        assert target.read_bytes() == b"precious"
    else:
        assert not target.exists()
    assert not os.path.islink(folder / name) or not PLANTED[name]
    lines = (folder / "m_metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["epoch"] for x in lines][-1] == 3


def test_planted_symlink_at_lock_file_is_refused(tmp_path):
    folder = tmp_path / "ck"
    folder.mkdir()
    target = tmp_path / "victim"
    target.write_bytes(b"precious")
    os.symlink(target, folder / "m.lock")
    with pytest.raises(CheckpointError, match="lock file is a symlink"):
        _train(folder)
    assert target.read_bytes() == b"precious"


# ------------------------------------------------------------------ subprocesses
def _env():
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT / "src") + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _spawn(out, *extra, epochs=2):
    return subprocess.Popen([sys.executable, str(WORKER), str(out), "--epochs", str(epochs),
                             *extra], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                            text=True, env=_env())


def _final(out):
    return torch.load(out / "final.pt", weights_only=True)


@pytest.fixture(scope="module")
def worker_reference(tmp_path_factory):
    out = tmp_path_factory.mktemp("ref")
    p = _spawn(out, "--every", "0")
    assert p.wait(timeout=120) == 0
    return _final(out)


#: The worker with weight averaging on: an EMA validation runs on, SWA with a BatchNorm layer.
AVERAGED = ("--ema", "--swa")


@pytest.fixture(scope="module")
def averaged_reference(tmp_path_factory):
    out = tmp_path_factory.mktemp("ref_averaged")
    p = _spawn(out, "--every", "0", *AVERAGED)
    assert p.wait(timeout=120) == 0
    return _final(out), torch.load(out / "averaged.pt", weights_only=True)


def _assert_final_equal(out, reference):
    got = _final(out)
    assert got.keys() == reference.keys()
    for k in reference:
        assert torch.equal(got[k], reference[k]), k


def _assert_averages_equal(out, reference):
    got = torch.load(out / "averaged.pt", weights_only=True)
    assert got.keys() == reference.keys() == {"ema", "swa"}
    for kind in reference:
        assert got[kind].keys() == reference[kind].keys()
        for k in reference[kind]:
            assert torch.equal(got[kind][k], reference[kind][k]), (kind, k)


@pytest.mark.parametrize("flags", [(), AVERAGED], ids=["plain", "ema+swa"])
def test_sigkill_at_file_operations_then_resume_is_bit_exact(tmp_path, flags, request):
    """Kills land inside checkpoint writes and rotations (file operations drawn with a fixed
    seed); after each, the newest checkpoint is at w_last.pt (none newer elsewhere). With EMA
    and SWA on, the final averages (weights, BatchNorm statistics) are bit-exact too."""
    reference = request.getfixturevalue("averaged_reference" if flags else "worker_reference")
    worker_reference = reference[0] if flags else reference
    rng = random.Random(20)
    kills = left_temps = 0
    for _ in range(4):
        p = _spawn(tmp_path, "--kill-at-io", str(rng.randint(5, 300)), *flags)
        code = p.wait(timeout=120)
        if code == 0:
            break
        assert code == -signal.SIGKILL
        kills += 1
        left_temps += bool(temp_files(tmp_path))
        finals = [f for f in checkpoint_chain(tmp_path / "w_last.pt", 8) if f.exists()]
        if finals:  # the newest complete checkpoint sits at w_last.pt
            assert max(_position(f) for f in finals) == _position(tmp_path / "w_last.pt")
    assert kills >= 3 and left_temps >= 1  # some kills did land inside a write
    p = _spawn(tmp_path, *flags)
    assert p.wait(timeout=120) == 0
    assert temp_files(tmp_path) == []
    _assert_final_equal(tmp_path, worker_reference)
    if flags:
        _assert_averages_equal(tmp_path, reference[1])


def test_two_quick_sigterms_checkpoint_where_training_stopped(tmp_path, worker_reference):
    """Default options (no step checkpoints): the second SIGTERM, 50 ms after the first, lands
    during the checkpoint write (made slow) and waits for it; exit 143; resume continues from
    the step where training stopped, bit-exact."""
    p = _spawn(tmp_path, "--every", "0", "--sleep", "0.01", "--slow-write", "0.1")
    lines = []
    while len(lines) < 30:  # well into epoch 2 (24 training + 3 validation batches per epoch)
        lines.append(p.stdout.readline())
    p.send_signal(signal.SIGTERM)
    time.sleep(0.05)
    p.send_signal(signal.SIGTERM)
    rest, _ = p.communicate(timeout=60)
    assert p.returncode == 128 + signal.SIGTERM
    trained = sum(1 for x in "".join(lines + [rest]).splitlines() if x.endswith(" train"))
    epoch, step = _position(tmp_path / "w_last.pt")
    assert (epoch, step) == divmod(trained, 24) and step > 0  # not the last epoch end
    p = _spawn(tmp_path, "--every", "0")
    assert p.wait(timeout=120) == 0
    _assert_final_equal(tmp_path, worker_reference)


def test_third_sigterm_forces_exit(tmp_path):
    """The documented way out of a checkpoint that takes too long: a third signal."""
    p = _spawn(tmp_path, "--every", "0", "--slow-write", "2")
    for _ in range(3):
        p.stdout.readline()
    for _ in range(3):
        p.send_signal(signal.SIGTERM)
        time.sleep(0.1)
    assert p.wait(timeout=60) == -signal.SIGTERM
    assert not (tmp_path / "w_last.pt").exists()  # killed inside the preemption write


assert OPS  # the worker's --kill-at-io counts these operations


@pytest.mark.parametrize("name", ["lr_find.json", "best.yaml"])
def test_a_full_disk_leaves_a_commands_result_file_as_it_was(tmp_path, monkeypatch, name):
    """`advtrain lr-find`'s lr_find.json and `advtrain tune`'s best.yaml are written atomically:
    a write that fails (ENOSPC) leaves the earlier file whole and no temporary file."""
    from types import SimpleNamespace

    from advanced_training_utils.app import lrfind
    from advanced_training_utils.app.tune.outputs import write_best

    target = tmp_path / name
    target.write_text("earlier\n")
    FileFaults(tmp_path).fail("write", f".{name}.*.tmp").install(monkeypatch)
    with pytest.raises(OSError):
        if name == "best.yaml":
            write_best(target, SimpleNamespace(params={"learning_rate": 0.01}), {"epochs": 3},
                       ["header"])
        else:
            monkeypatch.setattr(lrfind, "_settings", lambda a: SimpleNamespace(
                min_lr=1e-7, max_lr=10.0, num_steps=10, repeats=1))
            monkeypatch.setattr(lrfind, "resolve_options", lambda a: ({}, {}))
            monkeypatch.setattr(lrfind, "task_name", lambda a: "notes")
            monkeypatch.setattr(lrfind, "audio_plan", lambda a: None)
            task = SimpleNamespace(model=None, train_loader=None, val_loader=None, criterion=None)
            monkeypatch.setattr(lrfind, "build_run_task", lambda *a, **k: (task, {}))
            result = SimpleNamespace(to_dict=lambda: {"suggestion": 0.01})
            monkeypatch.setattr(lrfind, "find_lr", lambda *a, **k: result)
            lrfind.main(SimpleNamespace(out=tmp_path, preset="stable"))
    assert target.read_text() == "earlier\n"
    assert temp_files(tmp_path) == []
