"""The async save's background writer runs tasks one after another in submission order, keeps a
failing task's exception for the main thread and goes on with the next task."""
import threading

from mindformers_st.checkpoint.background import BackgroundWriter


def test_tasks_run_in_order_on_one_thread_and_errors_are_kept():
    writer = BackgroundWriter("test-writer")
    gate = threading.Event()
    seen = []

    def fail():
        raise OSError("disk full")

    first = writer.submit(gate.wait, "gate")
    a = writer.submit(lambda: seen.append(("a", threading.current_thread().name)), "a")
    bad = writer.submit(fail, "fail")
    b = writer.submit(lambda: seen.append(("b", threading.current_thread().name)), "b")
    assert not (first.done or a.done or b.done)   # queued behind the gate, nothing ran early
    gate.set()
    writer.drain()
    assert all(t.done for t in (first, a, bad, b))
    assert seen == [("a", "test-writer"), ("b", "test-writer")]
    assert isinstance(bad.error, OSError) and a.error is None and b.error is None
    writer.close()
    again = writer.submit(lambda: seen.append(("c", threading.current_thread().name)), "c")
    writer.close()                                  # close runs what is queued before stopping
    assert again.done and seen[-1] == ("c", "test-writer")
