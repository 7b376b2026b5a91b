import os

import pytest
import torch

from advanced_training_utils import CheckpointError, load_checkpoint, save_checkpoint
from advanced_training_utils.checkpoint import (
    CHECKSUM_KEY,
    FORMAT_KEY,
    MODEL_KEY,
    capture_rng,
    restore_rng,
)


def _payload():
    m = torch.nn.Linear(4, 3)
    return {MODEL_KEY: m.state_dict(), "epoch": 3, "history": [{"loss": 1.0}]}


def test_round_trip_and_plain_weights_only_load(tmp_path):
    p = save_checkpoint(tmp_path / "a.pt", _payload())
    obj = load_checkpoint(p)
    assert obj["epoch"] == 3 and obj[FORMAT_KEY] == 1
    assert obj[CHECKSUM_KEY].startswith("crc32:") and len(obj[CHECKSUM_KEY]) == 14
    raw = torch.load(p, weights_only=True)
    assert torch.equal(raw[MODEL_KEY]["weight"], obj[MODEL_KEY]["weight"])
    assert not [f for f in os.listdir(tmp_path) if f.endswith(".tmp")]


def test_truncated_file_detected(tmp_path):
    p = save_checkpoint(tmp_path / "a.pt", _payload())
    data = p.read_bytes()
    p.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"a\.pt: unreadable, truncated or corrupted"):
        load_checkpoint(p)


def test_zero_length_file_detected(tmp_path):
    p = tmp_path / "a.pt"
    p.write_bytes(b"")
    with pytest.raises(CheckpointError, match="file is empty"):
        load_checkpoint(p)


def test_bit_flip_in_tensor_data_detected(tmp_path):
    p = save_checkpoint(tmp_path / "a.pt", _payload())
    ref = load_checkpoint(p)
    data = bytearray(p.read_bytes())
    # Flip a bit inside the stored weight bytes (found by searching for them).
    w = ref[MODEL_KEY]["weight"].numpy().tobytes()
    at = bytes(data).find(w)
    assert at > 0
    data[at + 5] ^= 0x10
    p.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="checksum mismatch|unreadable"):
        load_checkpoint(p)


def test_missing_file(tmp_path):
    with pytest.raises(CheckpointError, match="no such file"):
        load_checkpoint(tmp_path / "nope.pt")


class _Evil:
    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        return (os.system, (f"touch {self.target}",))


def test_malicious_checkpoint_is_refused_and_runs_nothing(tmp_path):
    target = tmp_path / "pwned"
    p = tmp_path / "evil.pt"
    torch.save({"model": _Evil(target)}, p)
    with pytest.raises(CheckpointError, match="refused unsafe content"):
        load_checkpoint(p)
    assert not target.exists()


def test_failed_write_keeps_previous_file(tmp_path, monkeypatch):
    p = save_checkpoint(tmp_path / "a.pt", _payload())
    before = p.read_bytes()

    def boom(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", boom)
    with pytest.raises(OSError, match="No space left"):
        save_checkpoint(p, {**_payload(), "epoch": 4})
    monkeypatch.undo()
    assert p.read_bytes() == before
    assert load_checkpoint(p)["epoch"] == 3
    assert not [f for f in os.listdir(tmp_path) if f.endswith(".tmp")]


def test_rng_round_trip(tmp_path):
    import random

    import numpy as np

    state = capture_rng()
    save_checkpoint(tmp_path / "r.pt", {"rng": state})
    a = (random.random(), np.random.rand(), torch.rand(1).item())
    restore_rng(load_checkpoint(tmp_path / "r.pt")["rng"])
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == a


# ------------------------------------------------------------------ rotation (issues 9, 10)
def _chain_state(folder):
    """Epochs of the files at final names (what a kill at this instant leaves); asserts that
    each is intact and that no two of them share a file."""
    from advanced_training_utils.checkpoint import checkpoint_chain

    out, inodes = {}, set()
    for p in checkpoint_chain(folder / "m_last.pt", 8) + [folder / "m_best.pt"]:
        if p.exists():
            out[p.name] = load_checkpoint(p)["epoch"]
            assert os.stat(p).st_ino not in inodes, f"{p.name} shares a file with another name"
            inodes.add(os.stat(p).st_ino)
    return out


@pytest.mark.parametrize("keep_last", [1, 2, 3, 4])
@pytest.mark.parametrize("best", [False, True])
def test_kill_at_any_file_operation_of_a_rotation_leaves_newest_at_last(tmp_path, monkeypatch,
                                                                        keep_last, best):
    """Before every file operation of ``rotate_and_save`` (the instants a kill can find): the
    newest complete checkpoint is at ``_last.pt``, every file at a final name is intact and
    its own, and at least ``keep_last - 1`` checkpoints are at final names."""
    from advanced_training_utils.checkpoint import rotate_and_save
    from faults import OPS, FileFaults

    last = tmp_path / "m_last.pt"
    for epoch in (1, 2, 3):
        rotate_and_save(last, {"epoch": epoch}, keep_last)
    seen = []

    def check(op, path):
        seen.append((op, os.path.basename(path)))
        state = _chain_state(tmp_path)
        state.pop("m_best.pt", None)
        assert state["m_last.pt"] == max(state.values()), (seen, state)
        assert len(set(state.values())) >= max(1, keep_last - 1), (seen, state)

    FileFaults(tmp_path).on(OPS, "*", check, always=True).install(monkeypatch)
    rotate_and_save(last, {"epoch": 4}, keep_last, copy_to=tmp_path / "m_best.pt" if best
                    else None)
    monkeypatch.undo()
    assert len(seen) >= 4  # the check ran at every operation
    after = _chain_state(tmp_path)
    names = ["m_last.pt", "m_last.1.pt", "m_last.2.pt", "m_last.3.pt"][:keep_last]
    assert [after.get(p) for p in names] == [4, 3, 2, 1][:keep_last]
    assert not [f for f in os.listdir(tmp_path) if f.endswith(".tmp")]


def test_best_and_last_are_independent_files(tmp_path):
    """_best.pt is a copy, not a hard link: truncating one in place leaves the other intact."""
    from advanced_training_utils.checkpoint import rotate_and_save

    last, best = tmp_path / "m_last.pt", tmp_path / "m_best.pt"
    rotate_and_save(last, _payload(), 2, copy_to=best)
    rotate_and_save(last, _payload(), 2, copy_to=best)
    assert best.read_bytes() == last.read_bytes()
    inodes = {os.stat(p).st_ino for p in (last, best, tmp_path / "m_last.1.pt")}
    assert len(inodes) == 3
    with open(best, "r+b") as f:
        f.truncate(100)
    assert load_checkpoint(last)["epoch"] == 3


def test_find_resumable_tries_every_candidate_newest_first(tmp_path, caplog):
    from advanced_training_utils.checkpoint import find_resumable, rotate_and_save

    last, best = tmp_path / "m_last.pt", tmp_path / "m_best.pt"
    for epoch in (1, 2, 3):
        rotate_and_save(last, {"epoch": epoch, "step_in_epoch": 0}, 3,
                        copy_to=best if epoch == 2 else None)
    last.write_bytes(b"")                                  # newest damaged
    path, obj = find_resumable(last, 3, best=best)         # best (epoch 2) ties with .1
    assert path.name == "m_last.1.pt" and obj["epoch"] == 2
    (tmp_path / "m_last.1.pt").unlink()
    path, obj = find_resumable(last, 3, best=best)         # best (2) is newer than .2 (1)
    assert path == best and obj["epoch"] == 2
    assert "falling back to the newest intact checkpoint" in caplog.text
    best.write_bytes(b"x")
    path, obj = find_resumable(last, 3, best=best)
    assert path.name == "m_last.2.pt" and obj["epoch"] == 1
    (tmp_path / "m_last.2.pt").unlink()
    with pytest.raises(CheckpointError, match="no intact checkpoint.*m_best.pt"):
        find_resumable(last, 3, best=best)
