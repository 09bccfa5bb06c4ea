"""Planning pauses CPython's cyclic collector and gives the caller back the state it had."""
import gc

import pytest

from mindformers_st.transform.gc_pause import gc_paused, without_gc


@pytest.fixture(autouse=True)
def _restore_gc():
    was = gc.isenabled()
    yield
    (gc.enable if was else gc.disable)()


def test_paused_inside_and_restored_after_even_on_error():
    gc.enable()
    with pytest.raises(RuntimeError):
        with gc_paused():
            assert not gc.isenabled()
            with gc_paused():   # nested: the inner exit must not re-enable it early
                pass
            assert not gc.isenabled()
            raise RuntimeError("boom")
    assert gc.isenabled()


def test_a_caller_that_disabled_gc_keeps_it_disabled():
    gc.disable()

    @without_gc
    def build():
        assert not gc.isenabled()
        return 7
    assert build() == 7
    assert not gc.isenabled()


def _collections_of_a_load(folder: str, layers: int) -> int:
    from mindformers_st.layout.parallel_config import ParallelConfig
    from mindformers_st.transform import describe_distributed, plan_merge, plan_rank_slices
    from mindformers_st.transform.execute import prepare_read
    from tests.transform.helpers import make_globals, save_distributed, tiny_table
    table = tiny_table(layers=layers)
    layouts = save_distributed(folder, make_globals(table), table,
                               ParallelConfig(data_parallel=1, model_parallel=2))
    runs = []

    def count(phase, info):
        if phase == "start":
            runs.append(info["generation"])
    threshold = gc.get_threshold()
    gc.enable()
    gc.collect()
    gc.callbacks.append(count)
    try:
        gc.set_threshold(1)   # a collection at every allocation the collector tracks
        src = describe_distributed(folder)
        plan_merge(src)
        prepare_read(plan_rank_slices(src, layouts, 1)).close()
    finally:
        gc.set_threshold(*threshold)
        gc.callbacks.remove(count)
    return len(runs)


def test_describing_planning_and_preparing_a_load_do_not_run_the_collector_per_tensor(tmp_path):
    """With the collector set to run at every allocation, describe -> plan -> prepare of a
    5-tensor-per-layer model collects about as often at 40 layers as at 2 (only at the
    boundaries of the paused calls); unpaused it collected over ten times more."""
    few = _collections_of_a_load(str(tmp_path / "few"), 2)
    many = _collections_of_a_load(str(tmp_path / "many"), 40)
    # a collection or two at the boundaries may come and go with what the pauses leave
    # counted; unpaused, 40 layers collected 26682 times against 1886
    assert many <= few + 5, (few, many)


def test_overlapping_pauses_on_two_threads_keep_it_paused_until_the_last_ends():
    """gc.disable() is process-wide: a thread ending its pause must not enable the collector
    while another thread is still paused, and the last one out restores it."""
    gc.enable()
    import threading
    inside, release = threading.Event(), threading.Event()

    def other():
        with gc_paused():
            inside.set()
            release.wait(30)
    t = threading.Thread(target=other)
    with gc_paused():
        t.start()
        assert inside.wait(30)
    try:
        assert not gc.isenabled()   # the other thread is still within its pause
    finally:
        release.set()
        t.join(30)
    assert gc.isenabled()


def test_pauses_hammered_from_threads_leave_the_collector_enabled():
    """Each call saving and restoring the flag alone left it disabled for good when a thread
    read "disabled" during another's pause and disabled it after that one enabled it again."""
    import sys
    import threading
    import time
    gc.enable()
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)   # switch threads between almost every bytecode
    stop = time.monotonic() + 0.5

    def work():
        while time.monotonic() < stop:
            with gc_paused():
                pass
    threads = [threading.Thread(target=work) for _ in range(3)]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        sys.setswitchinterval(interval)
    assert gc.isenabled()
