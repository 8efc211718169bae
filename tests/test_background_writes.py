"""The fit's background chunk writer: what lands in the files, in place, and its failures."""

from __future__ import annotations

import mmap
import os
import threading

import numpy as np
import pytest

from pipeline.errors import PipelineError
from pipeline.store.background_writes import (
    ALIGN,
    BackgroundWriter,
    _write_direct,
    background_writer,
)

SIZES = [0, 1, 5, ALIGN - 4, ALIGN, ALIGN + 4, 3 * ALIGN + 12, 1 << 20]


def _payload(n: int, seed: int) -> bytes:
    return np.random.default_rng(seed).integers(0, 256, n, dtype=np.uint8).tobytes()


@pytest.mark.parametrize("direct", [True, False])
def test_files_hold_exactly_what_was_submitted_over_longer_shorter_and_no_old_file(tmp_path,
                                                                                   direct):
    w = BackgroundWriter(direct=direct)
    for i, n in enumerate(SIZES):
        for old in (None, n + 3 * ALIGN + 7, max(0, n // 2)):  # none, longer, shorter
            p = tmp_path / f"c.{i}.{old}"
            if old is not None:
                p.write_bytes(_payload(old, 99))
            w.submit(p, _payload(n, i))
    w.wait()
    for i, n in enumerate(SIZES):
        for old in (None, n + 3 * ALIGN + 7, max(0, n // 2)):
            assert (tmp_path / f"c.{i}.{old}").read_bytes() == _payload(n, i), (n, old)


def test_direct_write_with_an_unaligned_tail(tmp_path):
    buf = mmap.mmap(-1, 4 * ALIGN)
    data = _payload(3 * ALIGN + 100, 1)
    memoryview(buf)[: len(data)] = data
    p = tmp_path / "x"
    p.write_bytes(b"\xff" * (8 * ALIGN))
    if not _write_direct(p, memoryview(buf), len(data)):
        pytest.skip(f"{tmp_path}'s file system refuses O_DIRECT (the writer falls back)")
    assert p.read_bytes() == data


def test_a_chunk_is_copied_before_submit_returns_and_rewritten_in_place(tmp_path):
    """The fit reuses its result buffers right away; a refit keeps the file (same inode)."""
    w = BackgroundWriter(slots=2)
    arr = np.arange(50_000, dtype="<f4")
    p = tmp_path / "c.0.0"
    for k in range(6):
        arr[:] = k
        w.submit(p, arr.data)
        arr[:] = -1  # the caller's next piece overwrites its buffer at once
    w.wait()
    assert (np.frombuffer(p.read_bytes(), "<f4") == 5).all()
    ino = p.stat().st_ino
    arr[:] = 7
    w.submit(p, arr.data)
    w.wait()
    assert p.stat().st_ino == ino and (np.frombuffer(p.read_bytes(), "<f4") == 7).all()


@pytest.mark.parametrize("direct", [True, False])
def test_a_symlink_is_refused_and_the_error_comes_back_once_from_wait(tmp_path, direct):
    victim = tmp_path / "victim"
    victim.write_bytes(b"keep")
    (tmp_path / "c.0").symlink_to(victim)
    w = BackgroundWriter(direct=direct)
    w.submit(tmp_path / "c.0", b"evil" * 2000)
    w.submit(tmp_path / "c.1", b"skipped after the failure")
    with pytest.raises(PipelineError, match=r"c\.0: is a symlink; refusing to write through it"):
        w.wait()
    assert victim.read_bytes() == b"keep"
    assert not (tmp_path / "c.1").exists()
    w.wait()  # reported once
    w.submit(tmp_path / "c.2", b"fine")
    w.wait()
    assert (tmp_path / "c.2").read_bytes() == b"fine"


def test_a_missing_folder_fails_at_wait_and_discard_drops_it(tmp_path):
    w = BackgroundWriter()
    w.submit(tmp_path / "no" / "c.0", b"x")
    with pytest.raises(FileNotFoundError):
        w.wait()
    w.submit(tmp_path / "no" / "c.0", b"x")
    w.wait(discard=True)  # a failing task's own error wins (fit_task)
    w.wait()


def test_one_writer_per_thread():
    mine = background_writer()
    assert background_writer() is mine
    other: list[BackgroundWriter] = []
    t = threading.Thread(target=lambda: other.append(background_writer()))
    t.start()
    t.join()
    assert other[0] is not mine and mine.pid == os.getpid()


def test_the_thread_ends_with_its_writer(tmp_path):
    """A task thread that ends leaves no writer thread (nor its staging buffers) behind."""
    import gc

    w = BackgroundWriter()
    w.submit(tmp_path / "c.0", b"last words")
    thread = w.thread
    del w
    gc.collect()
    thread.join(timeout=10)
    assert not thread.is_alive()
    assert (tmp_path / "c.0").read_bytes() == b"last words"  # what was queued is written


@pytest.mark.parametrize("direct", [True, False])
def test_a_hard_linked_chunk_is_replaced_not_written_through(tmp_path, direct):
    """A ``cp -al`` snapshot of a fit keeps its bytes when the fit is written again."""
    p = tmp_path / "c.0"
    p.write_bytes(b"old" * 3000)
    os.link(p, tmp_path / "snapshot")
    w = BackgroundWriter(direct=direct)
    w.submit(p, b"new" * 3000)
    w.wait()
    assert p.read_bytes() == b"new" * 3000
    assert (tmp_path / "snapshot").read_bytes() == b"old" * 3000


def test_chunk_files_get_the_umask_like_every_other_file(tmp_path):
    old = os.umask(0o002)  # a group-writable fit folder
    try:
        w = BackgroundWriter()
        w.submit(tmp_path / "c.0", b"x" * 10_000)
        w.wait()
        (tmp_path / "zarr.json").write_bytes(b"{}")
    finally:
        os.umask(old)
    assert (tmp_path / "c.0").stat().st_mode & 0o777 == 0o664
    assert (tmp_path / "zarr.json").stat().st_mode & 0o777 == 0o664


def test_a_failed_submit_gives_its_staging_buffer_back(tmp_path, monkeypatch):
    """No memory for a larger buffer (or an interrupt) must not use the slots up for good."""
    import pipeline.store.background_writes as bw

    w = BackgroundWriter(slots=2)
    real = bw.mmap.mmap

    def no_memory(*args, **kwargs):
        raise MemoryError

    monkeypatch.setattr(bw.mmap, "mmap", no_memory)
    for _ in range(3):
        with pytest.raises(MemoryError):
            w.submit(tmp_path / "big", b"x" * (1 << 20))
    monkeypatch.setattr(bw.mmap, "mmap", real)
    done = threading.Event()

    def more() -> None:
        for i in range(4):
            w.submit(tmp_path / f"c.{i}", b"y" * (1 << 20))
        w.wait()
        done.set()

    threading.Thread(target=more, daemon=True).start()
    assert done.wait(30), "submit hung: staging buffers were lost"
    assert all((tmp_path / f"c.{i}").read_bytes() == b"y" * (1 << 20) for i in range(4))
