"""The engine reads what the plan names: after evicting a source file from the page cache, a run
leaves resident only the pages of the copies' byte ranges (counted with mincore)."""
import mmap
import os
import sys

import numpy as np
import pytest

from mindformers_st.storage.reader import open_safetensors
from mindformers_st.storage.writer import save_tensors
from mindformers_st.transform import execute, execute_to_memory
from mindformers_st.transform.execute import coalesce
from mindformers_st.transform.plan import CopyOp, Plan, TargetFile, TargetTensor
from tests.storage.test_block_io import _evict, _resident_bytes

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"),
                                reason="mincore/posix_fadvise are Linux")

ROWS, COLS = 256, 16384          # 16 MiB of F32, 64 KiB rows: far larger than any read-ahead
PAGE = mmap.PAGESIZE


@pytest.fixture
def source(tmp_path):
    """A file with the tensor `w` between two neighbours, written, synced and evicted."""
    rng = np.random.default_rng(0)
    w = rng.standard_normal((ROWS, COLS)).astype(np.float32)
    path = save_tensors(str(tmp_path / "src.safetensors"),
                        {"a_before": np.ones((64, COLS), np.float32), "w": w,
                         "z_after": np.ones((64, COLS), np.float32)})
    size = os.path.getsize(path)
    _evict(path)
    if _resident_bytes(path, 0, size) > size // 16:
        pytest.skip("this filesystem keeps file pages resident (tmpfs?); cannot measure")
    return path, w


def _pages(ranges):
    """Bytes of the distinct pages holding byte `ranges`, counted independently of the engine."""
    pages = set()
    for start, length in ranges:
        pages.update(range(start // PAGE, (start + length - 1) // PAGE + 1))
    return len(pages) * PAGE


# (source offsets, sizes): a 1/8 column slice starting mid-page (each 8 KiB run spans 3 pages),
# and a block of whole rows (one run, written straight from the mapping)
CASES = {"columns": ((0, 1000), (ROWS, COLS // 8)), "rows": ((37, 0), (150, COLS))}


@pytest.mark.parametrize("how", ["execute", "execute_to_memory"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_a_run_faults_in_only_the_pages_the_plan_names(source, tmp_path, case, how):
    path, w = source
    offsets, sizes = CASES[case]
    op = CopyOp(path, "w", offsets, (0, 0), sizes)
    plan = Plan("split", (TargetFile("part.safetensors",
                                     (TargetTensor("w", "F32", sizes, (op,)),)),))
    with open_safetensors(path) as f:
        ranges = f.byte_ranges("w", offsets, sizes)
        w_start, w_bytes = f.data_start + f.tensors["w"].begin, f.tensors["w"].nbytes
    plan_bytes = op.numel * 4
    assert sum(n for _, n in ranges) == plan_bytes
    named = _pages(ranges)
    assert named == sum(n for _, n in coalesce(ranges))

    if how == "execute":
        out = execute(plan, str(tmp_path / "out"), workers=2, progress=False)
        with open_safetensors(out[0]) as g:
            got = g.read("w")
    else:
        got = execute_to_memory(plan, workers=2)["w"]
    want = w[tuple(slice(o, o + s) for o, s in zip(offsets, sizes))]
    np.testing.assert_array_equal(got, want)

    size = os.path.getsize(path)
    in_w = _resident_bytes(path, w_start, w_bytes)
    elsewhere = _resident_bytes(path, 0, size) - in_w
    assert plan_bytes <= in_w <= named, (
        f"{case}: {in_w / 2**20:.2f} MiB of the tensor resident for a plan naming "
        f"{plan_bytes / 2**20:.2f} MiB ({named / 2**20:.2f} MiB in whole pages)")
    # outside the tensor: the header and what reading it pulled in, none of the neighbours
    assert elsewhere <= 64 << 10, f"{case}: {elsewhere >> 10} KiB read outside the tensor"


def test_coalesce_merges_ranges_whose_pages_touch_and_keeps_page_gaps():
    assert coalesce([]) == []
    assert coalesce([(10, 5)]) == [(0, PAGE)]
    # 100 bytes every 1000: pages touch, one sequential run; sorted whatever the order given
    assert coalesce([(1000 * i, 100) for i in (3, 0, 2, 1)]) == [(0, PAGE)]
    # a gap of a whole page stays unread; an empty range names nothing
    assert coalesce([(0, PAGE), (2 * PAGE, 1), (5 * PAGE, 0)]) == [(0, PAGE), (2 * PAGE, PAGE)]
    arr = np.array([(i * 3 * PAGE + 7, PAGE) for i in range(40)], dtype=np.int64)
    assert coalesce(arr) == coalesce(arr.tolist()) == [(i * 3 * PAGE, 2 * PAGE) for i in range(40)]


def test_the_engine_reads_the_pages_of_the_readers_byte_ranges(tmp_path):
    """`_Source.runs` (what the engine prefetches) names the same pages as the reader's
    `byte_ranges`, for random blocks of tensors of several ranks and row sizes."""
    from mindformers_st.transform.execute import _Source
    rng = np.random.default_rng(1)
    arrs = {"a": np.zeros((5, 6, 7), np.float32), "b": np.zeros((9,), np.int16),
            "c": np.zeros((4, 1, 3), np.float64), "wide": np.zeros((40, 3000), np.float32),
            "d3": np.zeros((6, 30, 200), np.float32)}
    src = _Source(save_tensors(str(tmp_path / "x.safetensors"), arrs))
    try:
        for name, a in arrs.items():
            for _ in range(200):
                sizes = tuple(int(rng.integers(1, g + 1)) for g in a.shape)
                offs = tuple(int(rng.integers(0, g - s + 1)) for g, s in zip(a.shape, sizes))
                runs = src.runs(name, offs, sizes)
                got = coalesce([runs] if isinstance(runs, tuple) else runs)
                assert got == coalesce(src.byte_ranges(name, offs, sizes)), (name, offs, sizes)
    finally:
        src.close()
