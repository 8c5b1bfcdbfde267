"""LocalBlobStore: atomic writes, and uploads staged on its own filesystem
that are stored by a hard link instead of a second copy."""

from __future__ import annotations

import errno
import gc
import io
import os
import subprocess
import sys
from pathlib import Path

import pytest

from db.blobstore import STAGE_IN_MEMORY, LocalBlobStore, StagedFile, TooLarge

pytestmark = pytest.mark.skipif(not hasattr(os, "O_TMPFILE"), reason="O_TMPFILE is Linux's")

DATA = bytes(range(256)) * 12_000  # 3 MB, past any buffer


def files_under(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if not p.is_dir())


def staged(store: LocalBlobStore, data: bytes = DATA) -> StagedFile:
    """A staged upload past the in-memory threshold: an unnamed file in the store."""
    f = store.staging_file()
    if f is not None:
        f.write(data)
        f.seek(0)
    if f is None or f.unnamed_fd is None:
        pytest.skip(f"{store.root}'s filesystem has no O_TMPFILE (overlayfs before Linux 6.6, NFS)")
    return f


def open_handles() -> int:
    gc.collect()  # a leftover file object of an earlier test closed now, not between two counts
    return len(os.listdir("/proc/self/fd"))


def test_a_staged_upload_is_stored_by_a_link_not_a_copy(tmp_path):
    store = LocalBlobStore(tmp_path)
    with staged(store) as f:
        assert files_under(tmp_path) == [], "a staged file has no name until it is stored"
        assert store.put_stream("t/j/i/source", f, max_bytes=len(DATA)) == len(DATA)
        stored = tmp_path / "t/j/i/source"
        assert os.stat(stored).st_ino == os.fstat(f.fileno()).st_ino, "the upload's own inode, not a copy"
    assert store.get_bytes("t/j/i/source") == DATA
    assert files_under(tmp_path) == ["t/j/i/source"], "no temporary names left beside it"
    assert os.stat(stored).st_nlink == 1


def test_small_uploads_stay_in_memory_as_werkzeug_kept_them(tmp_path):
    """No file handle per small part (a job may have 10,000), stored by a copy."""
    store = LocalBlobStore(tmp_path)
    before = open_handles()
    small = [store.staging_file() for _ in range(50)]
    for i, f in enumerate(small):
        f.write(DATA[: STAGE_IN_MEMORY - i])
        f.seek(0)
    assert open_handles() == before and all(f.unnamed_fd is None for f in small)
    assert store.put_stream("k/source", small[0]) == STAGE_IN_MEMORY
    assert store.get_bytes("k/source") == DATA[:STAGE_IN_MEMORY]
    for f in small:
        f.close()
    with staged(store) as big:
        assert open_handles() == before + 1, "one handle once past the threshold"
    assert files_under(tmp_path) == ["k/source"]


def test_a_staged_upload_over_the_limit_stores_nothing(tmp_path):
    store = LocalBlobStore(tmp_path)
    with staged(store) as f, pytest.raises(TooLarge):
        store.put_stream("t/j/i/source", f, max_bytes=len(DATA) - 1)
    assert files_under(tmp_path) == []


def test_a_staged_upload_never_stored_leaves_nothing(tmp_path):
    store = LocalBlobStore(tmp_path)
    staged(store).close()
    code = (
        "import sys, os; from db.blobstore import LocalBlobStore\n"
        "f = LocalBlobStore(sys.argv[1]).staging_file(); f.write(b'x' * 2_000_000); f.flush()\n"
        "os._exit(3 if f.unnamed_fd is None else 0)  # no close, no cleanup: as a killed API process\n"
    )
    staged_there = subprocess.run([sys.executable, "-c", code, str(tmp_path)], cwd=Path(__file__).parents[2])
    if staged_there.returncode == 3:
        pytest.skip(f"{tmp_path}'s filesystem has no O_TMPFILE")
    assert staged_there.returncode == 0
    assert files_under(tmp_path) == []


def test_rewriting_a_key_with_a_staged_upload_replaces_it_whole(tmp_path):
    store = LocalBlobStore(tmp_path)
    store.put_bytes("k/source", b"old")
    with staged(store) as f:
        store.put_stream("k/source", f)
    assert store.get_bytes("k/source") == DATA and files_under(tmp_path) == ["k/source"]


def test_streams_that_cannot_be_linked_are_copied(tmp_path, monkeypatch):
    store, other = LocalBlobStore(tmp_path / "a"), LocalBlobStore(tmp_path / "b")
    with staged(other) as f:  # another store's staged file: copied
        store.put_stream("x/source", f)
        assert os.stat(store.root / "x/source").st_ino != os.fstat(f.fileno()).st_ino
    with staged(store) as f:  # not at its start: the rest of it, as for any stream
        f.seek(10)
        store.put_stream("y/source", f)
    assert store.get_bytes("x/source") == DATA and store.get_bytes("y/source") == DATA[10:]

    def no_link(*args, **kwargs):
        raise OSError(errno.ENOENT, "no /proc")

    monkeypatch.setattr(os, "link", no_link)
    with staged(store) as f:
        assert store.put_stream("z/source", f) == len(DATA)
    assert store.get_bytes("z/source") == DATA
    assert files_under(store.root) == ["x/source", "y/source", "z/source"]


def test_a_filesystem_without_o_tmpfile_falls_back_to_copies(tmp_path, monkeypatch):
    real_open, calls = os.open, []

    def nfs_open(path, flags, *args, **kwargs):
        if flags & os.O_TMPFILE == os.O_TMPFILE:
            calls.append(path)
            raise OSError(errno.EOPNOTSUPP, "Operation not supported")
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", nfs_open)
    store = LocalBlobStore(tmp_path)
    with store.staging_file() as f:
        f.write(DATA)  # past the threshold: spooled under TMPDIR instead, as werkzeug does
        f.seek(0)
        assert f.unnamed_fd is None
        assert store.put_stream("k/source", f) == len(DATA)
    assert store.get_bytes("k/source") == DATA and files_under(tmp_path) == ["k/source"]
    asked = [c for c in calls if Path(c) == store.root]  # (Python's TemporaryFile tries O_TMPFILE in TMPDIR too)
    assert store.staging_file() is None and len(asked) == 1, "asked once per store, not once per upload"
    assert store.put_stream("j/source", io.BytesIO(DATA)) == len(DATA)


def test_a_passing_failure_to_stage_does_not_turn_staging_off(tmp_path, monkeypatch):
    real_open, fail = os.open, [errno.EMFILE]

    def short_of_handles(path, flags, *args, **kwargs):
        if flags & os.O_TMPFILE == os.O_TMPFILE and fail:
            raise OSError(fail.pop(), "Too many open files")
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", short_of_handles)
    store = LocalBlobStore(tmp_path)
    with store.staging_file() as f:
        f.write(DATA)
        f.seek(0)
        assert f.unnamed_fd is None, "this upload goes the ordinary way"
        store.put_stream("k/source", f)
    with staged(store) as f:
        assert f.unnamed_fd is not None, "and the next is staged again"
    assert store.get_bytes("k/source") == DATA
