"""safeio: unique temporary names, no symlink followed, no partial file, stale temps removed."""

import errno
import os
import stat

import pytest
import torch

from advanced_training_utils import safeio
from advanced_training_utils.checkpoint import rotate_and_save, save_checkpoint
from faults import FileFaults, temp_files


@pytest.fixture
def outside(tmp_path):
    """A file outside the folder we write in, that a planted symlink points at."""
    d = tmp_path / "outside"
    d.mkdir()
    target = d / "victim"
    target.write_bytes(b"precious")
    return target


@pytest.fixture
def folder(tmp_path):
    d = tmp_path / "ck"
    d.mkdir()
    return d


def test_atomic_write_replaces_a_symlink_at_the_final_name(folder, outside):
    os.symlink(outside, folder / "a.pt")
    safeio.atomic_write(folder / "a.pt", lambda f: f.write(b"new"))
    assert outside.read_bytes() == b"precious"
    assert not os.path.islink(folder / "a.pt") and (folder / "a.pt").read_bytes() == b"new"
    assert temp_files(folder) == []


def test_temp_name_taken_by_a_symlink_is_never_written_through(folder, outside, monkeypatch):
    """O_EXCL | O_NOFOLLOW: a symlink planted at the drawn temporary name makes that open fail;
    the next name is drawn."""
    tokens = iter(["aaaaaaaaaaaa", "bbbbbbbbbbbb"])
    monkeypatch.setattr(safeio.secrets, "token_hex", lambda n: next(tokens))
    dangling = outside.with_name("created-through-link")  # O_CREAT alone would create it
    os.symlink(dangling, folder / ".a.pt.aaaaaaaaaaaa.tmp")
    safeio.atomic_write(folder / "a.pt", lambda f: f.write(b"new"))
    assert outside.read_bytes() == b"precious" and not dangling.exists()
    assert (folder / "a.pt").read_bytes() == b"new"
    assert os.path.islink(folder / ".a.pt.aaaaaaaaaaaa.tmp")  # not ours: left alone


@pytest.mark.parametrize("err", [errno.ENOSPC, errno.EIO])
@pytest.mark.parametrize("nth", [1, 2])
def test_failed_torch_save_raises_oserror_and_leaves_nothing(folder, monkeypatch, err, nth):
    """torch.save turns some write errors into RuntimeError('unexpected pos'); the caller
    gets the OSError with its errno, the previous file is kept, no temporary file is left."""
    safeio.atomic_write(folder / "a.pt", lambda f: f.write(b"old"))
    FileFaults(folder).fail("write", ".a.pt.*.tmp", err, nth=nth).install(monkeypatch)
    obj = {"w": torch.randn(100, 1000), "b": torch.randn(10)}  # > the 64 KiB buffer: 2 writes
    with pytest.raises(OSError) as e:
        safeio.atomic_write(folder / "a.pt", lambda f: torch.save(obj, f))
    assert e.value.errno == err
    assert (folder / "a.pt").read_bytes() == b"old" and temp_files(folder) == []


def test_append_follows_no_symlink_and_undoes_a_partial_line(folder, outside, monkeypatch):
    log = folder / "m.jsonl"
    os.symlink(outside, log)
    safeio.append_bytes(log, b"line 1\n")
    assert outside.read_bytes() == b"precious"
    assert not os.path.islink(log) and log.read_bytes() == b"line 1\n"

    real_write = os.write

    def half_then_full(fd, data):  # writes half the bytes, then the disk is full
        real_write(fd, bytes(data)[: len(data) // 2])
        monkeypatch.setattr(os, "write", full)
        return len(data) // 2

    def full(fd, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "write", half_then_full)
    with pytest.raises(OSError, match="No space left"):
        safeio.append_bytes(log, b"line 2 is long enough\n")
    monkeypatch.undo()
    assert log.read_bytes() == b"line 1\n"  # no half line


def test_append_refuses_a_fifo_instead_of_blocking(folder):
    os.mkfifo(folder / "m.jsonl")
    with pytest.raises(OSError):
        safeio.append_bytes(folder / "m.jsonl", b"x\n")


def test_remove_stale_temps_removes_only_ours(folder, outside):
    ours = [".m_last.pt.0123456789ab.tmp", ".m_best.pt.abcdefgh.tmp", ".m_last.1.pt.link.tmp",
            ".m_metrics.jsonl.00000000abcd.tmp"]
    others = [".other_last.pt.0123456789ab.tmp", ".m_x_last.pt.0123456789ab.tmp", "notes.tmp",
              ".m_last.pt.tmp", "m_last.pt", ".m_last.pt.0123456789ab.tmp.bak"]
    for name in ours + others:
        (folder / name).write_bytes(b"x" * 1000)
    os.symlink(outside, folder / ".m_last.pt.ffffffffffff.tmp")  # a link named like ours
    (folder / ".m_best.pt.eeeeeeeeeeee.tmp").mkdir()                # a folder named like ours
    wanted = {"m_last.pt", "m_best.pt", "m_last.1.pt", "m_metrics.jsonl"}
    freed = safeio.remove_stale_temps(folder, wanted)
    assert freed == 4000
    left = sorted(p.name for p in folder.iterdir())
    assert left == sorted(others + [".m_last.pt.ffffffffffff.tmp",
                                    ".m_best.pt.eeeeeeeeeeee.tmp"])
    assert outside.read_bytes() == b"precious"


def test_new_files_are_regular_and_follow_the_umask(folder):
    old = os.umask(0o027)
    try:
        safeio.atomic_write(folder / "a.pt", lambda f: f.write(b"x"))
    finally:
        os.umask(old)
    mode = os.lstat(folder / "a.pt").st_mode
    assert stat.S_ISREG(mode) and stat.S_IMODE(mode) == 0o640


_WRITERS = {
    "atomic_write": lambda final: safeio.atomic_write(final, lambda f: f.write(b"new")),
    "save_checkpoint": lambda final: save_checkpoint(final, {"epoch": 2}),
    "rotate_and_save": lambda final: rotate_and_save(final, {"epoch": 2}, keep_last=3),
}


@pytest.mark.parametrize("write", list(_WRITERS))
def test_data_synced_before_the_rename_and_the_folder_after(folder, monkeypatch, write):
    """Durable writes (a power cut after the call leaves the new file, complete, at its final
    name): the temporary file is fsynced before it is renamed over the final name, and the
    folder (which holds the renames) is fsynced after the last rename."""
    final = folder / "a.pt"
    rotate_and_save(final, {"epoch": 1}, keep_last=3)  # a previous file to replace / rotate
    faults = FileFaults().install(monkeypatch)  # records every file operation, anywhere
    _WRITERS[write](final)
    monkeypatch.undo()
    ours = os.path.realpath(folder)
    events = [(op, os.path.realpath(p)) for op, p in faults.seen if op in ("fsync", "replace")
              and (os.path.realpath(p) == ours or os.path.dirname(os.path.realpath(p)) == ours)]
    data = [i for i, (op, p) in enumerate(events)
            if op == "fsync" and os.path.basename(p).startswith(".a.pt.")]
    into_final = [i for i, e in enumerate(events) if e == ("replace", str(final.resolve()))]
    renames = [i for i, (op, _) in enumerate(events) if op == "replace"]
    folder_syncs = [i for i, e in enumerate(events) if e == ("fsync", ours)]
    assert data and len(into_final) == 1, events
    assert data[0] < into_final[0], events
    assert folder_syncs and folder_syncs[-1] > renames[-1], events
    assert final.read_bytes() and temp_files(folder) == []


def test_append_is_synced_and_a_failed_sync_leaves_no_partial_line(tmp_path, monkeypatch):
    import os

    f = tmp_path / "log.jsonl"
    synced = []
    real = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(fd), real(fd)))
    safeio.append_bytes(f, b"one\n")
    assert synced and f.read_bytes() == b"one\n"

    def fail(fd):
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(os, "fsync", fail)
    with pytest.raises(OSError):
        safeio.append_bytes(f, b"two\n")
    assert f.read_bytes() == b"one\n"


@pytest.mark.parametrize("umask,want", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_checkpoints_follow_the_users_umask(tmp_path, umask, want):
    old = os.umask(umask)
    try:
        path = save_checkpoint(tmp_path / "c.pt", {"model": {"w": torch.zeros(2)}})
        safeio.append_bytes(tmp_path / "log.jsonl", b"x\n")
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(path).st_mode) == want
    assert stat.S_IMODE(os.stat(tmp_path / "log.jsonl").st_mode) == want
