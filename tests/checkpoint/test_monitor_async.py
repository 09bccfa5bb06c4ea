"""async_save with a real tiny Llama: the snapshot buffers are allocated once and reused, the
commit record, pruning and meta.json run on the background writer (never on the training
thread) and still prune the right files, and a save still in flight at the next save step is
waited for, the wait counted as time the loop was blocked."""
import logging
import os
import threading

import numpy as np
import pytest

from mindformers_st.checkpoint import monitor as monitor_mod
from mindformers_st.checkpoint.background import BackgroundWriter
from mindformers_st.checkpoint.monitor import CheckpointMonitor
from mindformers_st.records import commit as cm
from mindformers_st.storage.reader import open_safetensors

from .monitor_worker import build_run, train

pytestmark = pytest.mark.slow      # three short real trainings (~4 s each on a quiet machine)

PER_EPOCH, BATCH = 3, 4


@pytest.fixture(scope="module")
def run():
    return build_run()


def _truth(model, opt):
    arrays = dict(model.get_local_params())   # copies
    arrays.update(opt.get_state_arrays())     # copies
    return arrays


class _Probe:
    """A callback beside the monitor: `before(step)` / `after(step)` run at each step end."""

    def __init__(self, before=None, after=None, begin=None):
        self.before, self.after, self.begin = before, after, begin

    def on_train_begin(self, run_context):
        if self.begin:
            self.begin()

    def on_train_step_end(self, run_context):
        fn = self.before or self.after
        if fn:
            fn(run_context.original_args()["mfst_state"].global_step)

    def on_train_end(self, run_context):
        pass


def _assert_file_holds(path, truth):
    with open_safetensors(path) as f:
        for name, value in truth.items():
            np.testing.assert_array_equal(f.read(name), value, err_msg=f"{path}: {name}")


def test_snapshot_buffers_are_allocated_once_and_reused(run, tmp_path, caplog):
    model, opt, step, ctx = run
    out = str(tmp_path)
    mon = CheckpointMonitor(checkpoint_format="safetensors", save_checkpoint_steps=2,
                            keep_checkpoint_max=5, async_save=True, output_dir=out)
    seen, truth, same = {}, {}, []

    def begin():
        seen.update({n: (b, b.ctypes.data) for n, b in mon._buffers.items()})

    def after(gs):
        same.append(all(mon._buffers[n] is b and b.ctypes.data == addr
                        for n, (b, addr) in seen.items()) and len(mon._buffers) == len(seen))
        if gs % 2 == 0:
            truth[gs] = _truth(model, opt)

    with caplog.at_level(logging.WARNING, logger="mindformers_st.checkpoint.state"):
        train(model, opt, step, ctx, [mon, _Probe(after=after, begin=begin)], 4, out, PER_EPOCH, BATCH)
    assert "allocating one now" not in caplog.text
    # one buffer per sliced tensor of the save (weights and moments), from train begin on
    assert set(seen) == {n for n in truth[2] if n != "global_step"}
    assert same == [True] * 4
    saves = cm.committed_saves(os.path.join(out, "checkpoint"))
    assert [s.global_step for s in saves] == [2, 4]
    # the second save reused the buffers only after the first one's file was written
    for save in saves:
        _assert_file_holds(save.path(0), truth[save.global_step])


def test_commit_record_pruning_and_meta_run_on_the_writer_and_prune_the_right_files(
        run, tmp_path, monkeypatch):
    model, opt, step, ctx = run
    out = str(tmp_path)
    calls = []

    def spy(name, real):
        def wrapper(*args, **kwargs):
            calls.append((name, threading.current_thread().name, args))
            return real(*args, **kwargs)
        return wrapper

    for name in ("write_committed", "write_rank_meta", "remove_files"):
        monkeypatch.setattr(monitor_mod.cm, name, spy(name, getattr(cm, name)))
    mon = CheckpointMonitor(checkpoint_format="safetensors", save_checkpoint_steps=1,
                            keep_checkpoint_max=2, async_save=True, output_dir=out)
    train(model, opt, step, ctx, [mon], 4, out, PER_EPOCH, BATCH)

    rank_dir = os.path.join(out, "checkpoint", "rank_0")
    assert sorted(os.listdir(rank_dir)) == ["CKP_rank_0-1_3.safetensors", "CKP_rank_0-2_1.safetensors",
                                            "meta.json"]
    assert [s.global_step for s in cm.committed_saves(os.path.join(out, "checkpoint"))] == [3, 4]
    assert cm.read_rank_meta(rank_dir).committed == ("CKP_rank_0-1_3.safetensors",
                                                     "CKP_rank_0-2_1.safetensors")
    # on the loop's thread only the start-up: the empty record claiming the fresh folder and
    # an empty leftover sweep
    on_main = [(n, a) for n, t, a in calls if t == threading.main_thread().name]
    assert sorted(n for n, _ in on_main) == ["remove_files", "write_committed"]
    assert all(list(a[2] if n == "write_committed" else a[0]) == [] for n, a in on_main)
    done = [(n, t) for n, t, _ in calls if t != threading.main_thread().name]
    assert {t for _, t in done} == {"ckpt-save-0"}
    assert [n for n, _ in done] == ["write_committed", "write_rank_meta"] * 2 + \
        ["write_committed", "remove_files", "write_rank_meta"] * 2
    removed = [os.path.basename(p) for n, _, a in calls if n == "remove_files" for p in a[0]
               if os.path.dirname(p) == rank_dir]
    assert removed == ["CKP_rank_0-1_1.safetensors", "CKP_rank_0-1_2.safetensors"]


def test_a_save_in_flight_at_the_next_save_step_is_waited_for_and_counted(run, tmp_path, caplog):
    model, opt, step, ctx = run
    out = str(tmp_path)
    mon = CheckpointMonitor(checkpoint_format="safetensors", save_checkpoint_steps=1,
                            keep_checkpoint_max=5, async_save=True, output_dir=out)
    gate = threading.Event()
    truth, in_flight = {}, []

    def begin():   # the writer's first task holds every later one back until the gate opens
        mon._writer = BackgroundWriter("ckpt-save-0")
        mon._writer.submit(gate.wait, "gate")

    def before(gs):   # runs just before the monitor's own step end
        truth[gs] = _truth(model, opt)
        if gs == 2:
            in_flight.append(mon._pending is not None and not mon._pending.written)
            threading.Timer(0.5, gate.set).start()

    with caplog.at_level(logging.INFO, logger="mindformers_st.checkpoint.monitor"):
        train(model, opt, step, ctx, [_Probe(begin=begin), _Probe(before=before), mon], 3, out,
              PER_EPOCH, BATCH)
    assert in_flight == [True]
    first = mon.stats[0]
    assert first.global_step == 1 and first.wait_time >= 0.4
    assert first.total_blocked >= first.wait_time + first.blocked
    assert "step 1: waited" in caplog.text
    saves = cm.committed_saves(os.path.join(out, "checkpoint"))
    assert [s.global_step for s in saves] == [1, 2, 3]
    for save in saves:   # each file holds its own step's values though the buffers are shared
        _assert_file_holds(save.path(0), truth[save.global_step])
