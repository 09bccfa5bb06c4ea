"""Block reads touch about the block's share of a tensor, measured in the page cache with mincore."""
import ctypes
import mmap
import os
import sys

import numpy as np
import pytest

from mindformers_st.storage import open_safetensors, save_tensors
from mindformers_st.storage.reader import SafetensorsFile

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="mincore/posix_fadvise are Linux")


def _resident_bytes(path, start, length):
    """Bytes of [start, start+length) of `path` that are in the page cache."""
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(path, os.O_RDONLY)
    try:
        mm = mmap.mmap(fd, os.fstat(fd).st_size, access=mmap.ACCESS_READ)
    finally:
        os.close(fd)
    try:
        lo = start // mmap.PAGESIZE * mmap.PAGESIZE
        view = np.frombuffer(mm, np.uint8)
        n = (start + length - lo + mmap.PAGESIZE - 1) // mmap.PAGESIZE
        vec = (ctypes.c_ubyte * n)()
        rc = libc.mincore(ctypes.c_void_p(view.ctypes.data + lo), ctypes.c_size_t(start + length - lo), vec)
        assert rc == 0, os.strerror(ctypes.get_errno())
        del view
        return sum(v & 1 for v in vec) * mmap.PAGESIZE
    finally:
        mm.close()


def _evict(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def test_a_one_eighth_column_block_faults_in_about_one_eighth_of_the_tensor(tmp_path):
    rows, cols = 256, 16384                                  # 16 MiB of F32, 64 KiB rows
    arr = np.arange(rows * cols, dtype=np.float32).reshape(rows, cols)
    path = save_tensors(tmp_path / "big.safetensors", {"w": arr}, checksums=False)
    with open_safetensors(path) as f:
        start, nbytes = f.data_start + f.tensors["w"].begin, f.tensors["w"].nbytes
    _evict(path)
    if _resident_bytes(path, start, nbytes) > nbytes // 16:
        pytest.skip("this filesystem keeps file pages resident (tmpfs?); cannot measure")
    with open_safetensors(path) as f:
        block = f.read("w", (0, 2 * cols // 8), (rows, cols // 8))
        assert sum(n for _, n in f.byte_ranges("w", (0, 2 * cols // 8), (rows, cols // 8))) == nbytes // 8
    np.testing.assert_array_equal(block, arr[:, 2 * cols // 8:3 * cols // 8])
    touched = _resident_bytes(path, start, nbytes)
    # 8 KiB runs start unaligned, so each spans 3 pages: 12/64 of a row at most, plus some slack.
    assert touched <= nbytes * 0.25, f"read {touched / nbytes:.0%} of the tensor for a 1/8 block"


def test_a_private_view_is_writable_copy_on_write_and_outlives_close(tmp_path):
    """`private=True` maps copy-on-write: `private_view` arrays are writable, a write changes
    this process's copy only (the file's bytes and a fresh reader see the stored values), the
    other views stay read-only, and close() leaves the mapping to the arrays still over it
    (unmapping it would make them point at nothing: a segfault on the next read)."""
    arr = np.arange(4096, dtype=np.float32).reshape(64, 64)
    path = save_tensors(tmp_path / "w.safetensors", {"w": arr, "b": arr[0].copy()})
    stored = open(path, "rb").read()
    f = SafetensorsFile(path, private=True)
    with pytest.raises(ValueError):
        f.view("w")[0, 0] = 1.0              # read-only views stay read-only
    w = f.private_view("w")
    assert w.flags.writeable
    with open_safetensors(path) as plain:   # a read-only file hands out no writable view
        with pytest.raises(Exception, match="private=True"):
            plain.private_view("w")
    w[3] = -1.0
    f.close()
    np.testing.assert_array_equal(w[3], -1.0)          # still mapped after close()
    np.testing.assert_array_equal(w[4], arr[4])
    assert open(path, "rb").read() == stored             # the file never changed
    with open_safetensors(path) as again:
        np.testing.assert_array_equal(again.read("w"), arr)
    _evict(path)
    np.testing.assert_array_equal(w[10:], arr[10:])      # unwritten pages come back from the file


@pytest.mark.parametrize("hint", ["read_ahead", "prefetch"])
def test_read_ahead_brings_a_whole_tensor_in_without_touching_it(tmp_path, hint):
    """`read_ahead` (a mapped tensor nothing has checked) and `prefetch` (rows of a tensor a
    load will read) start reading all of it: its pages become resident while nothing touches
    them, so the first step does not fault them in one by one from disk. (`prefetch` advised
    the whole range in one call, which the kernel cuts to its read-ahead window: it brought
    in one read-ahead window of the 40 MiB.)"""
    import time
    arr = np.arange(10 << 20, dtype=np.float32)   # 40 MiB: past any read-ahead window (8 MiB here)
    path = save_tensors(tmp_path / "w.safetensors", {"w": arr}, checksums=False)
    f = SafetensorsFile(path, private=True)
    start, nbytes = f.data_start + f.tensors["w"].begin, f.tensors["w"].nbytes
    _evict(path)
    if _resident_bytes(path, start, nbytes) > nbytes // 16:
        f.close()
        pytest.skip("this filesystem keeps file pages resident (tmpfs?); cannot measure")
    view = f.private_view("w")
    getattr(f, hint)("w")
    deadline = time.time() + 10
    while _resident_bytes(path, start, nbytes) < nbytes * 0.95 and time.time() < deadline:
        time.sleep(0.02)
    assert _resident_bytes(path, start, nbytes) >= nbytes * 0.95
    np.testing.assert_array_equal(view, arr)
    f.close()


@pytest.mark.parametrize("kernel_copy", [True, False])
def test_copy_rows_from_writes_the_same_file_as_write_block(tmp_path, monkeypatch, kernel_copy):
    """Rows copied inside the kernel (copy_file_range) or, where it cannot, through the
    process give byte for byte the file write_block gives, checksums included — from the file
    opened, also when its path names another file by then; a block that is not whole rows is
    refused."""
    import mindformers_st.storage.writer as writer_mod
    from mindformers_st.storage.writer import SafetensorsWriter
    monkeypatch.setattr(writer_mod, "_COPY_FILE_RANGE", kernel_copy)
    w = np.arange(64 * 48, dtype=np.float32).reshape(64, 48)
    src = save_tensors(tmp_path / "src.safetensors", {"a": np.ones(3, np.float32), "w": w})
    spec = [("w", "F32", (64, 48))]
    ref = SafetensorsWriter(tmp_path / "ref.safetensors", spec)
    ref.write("w", w)
    ref.commit()
    out = SafetensorsWriter(tmp_path / "out.safetensors", spec)
    f = SafetensorsFile(src, private=True)
    view = f.view("w")
    start = f.data_start + f.tensors["w"].begin
    # the path now names another file: the copy still reads the file mapped and checked
    other = save_tensors(tmp_path / "other.safetensors", {"a": np.zeros(3, np.float32),
                                                          "w": np.zeros_like(w)})
    os.replace(other, src)
    out.copy_rows_from("w", 0, f.fileno(), start, view[:40])
    out.copy_rows_from("w", 40, f.fileno(), start + 40 * 48 * 4, view[40:])
    with pytest.raises(Exception, match="whole"):
        out.copy_rows_from("w", 0, f.fileno(), start, view[:, :8])
    out.commit()
    del view
    f.close()
    assert open(tmp_path / "out.safetensors", "rb").read() == open(tmp_path / "ref.safetensors", "rb").read()
