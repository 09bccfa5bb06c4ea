"""async_save with a real tiny Llama: the snapshot buffers are allocated once and reused; the
copy into them runs during the next step's forward/backward and the optimizer update waits for
it, so the file holds the save step's values; the commit record, pruning and meta.json run on
the background writer (never on the training thread) and still prune the right files; and a
save still in flight at the next save step is waited for, the wait counted as time the loop
was blocked."""
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

pytestmark = pytest.mark.slow      # two short real trainings

PER_EPOCH, BATCH = 3, 4


@pytest.fixture(scope="module")
def run():
    return build_run()


@pytest.fixture(autouse=True)
def _no_hook_left(run):
    """A test that fails mid-training leaves its monitor's hook on the shared TrainStep."""
    yield
    run[2].before_update[:] = []


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


def test_buffers_reused_and_commit_records_pruning_meta_on_the_writer(run, tmp_path, monkeypatch,
                                                                      caplog):
    """Saves every step, keep 2: the buffers allocated at train begin are the ones every save
    copies into, each kept file still holds its own step's values, and committed.json, the
    deletion of the pruned saves and meta.json are written by the writer thread, in order."""
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
    seen, truth, same = {}, {}, []

    def begin():
        seen.update({n: (b, b.ctypes.data) for n, b in mon._buffers.items()})

    def after(gs):
        same.append(all(mon._buffers[n] is b and b.ctypes.data == addr
                        for n, (b, addr) in seen.items()) and len(mon._buffers) == len(seen))
        truth[gs] = _truth(model, opt)

    with caplog.at_level(logging.WARNING, logger="mindformers_st.checkpoint.state"):
        train(model, opt, step, ctx, [mon, _Probe(after=after, begin=begin)], 4, out, PER_EPOCH, BATCH)
    assert "allocating one now" not in caplog.text
    # one buffer per sliced tensor of the save (weights and moments), from train begin on
    assert set(seen) == {n for n in truth[1] if n != "global_step"}
    assert same == [True] * 4

    ckpt = os.path.join(out, "checkpoint")
    rank_dir = os.path.join(ckpt, "rank_0")
    assert sorted(os.listdir(rank_dir)) == ["CKP_rank_0-1_3.safetensors", "CKP_rank_0-2_1.safetensors",
                                            "meta.json"]
    saves = cm.committed_saves(ckpt)
    assert [s.global_step for s in saves] == [3, 4]
    for save in saves:   # the next snapshot reused the buffers only once this file was written
        _assert_file_holds(save.path(0), truth[save.global_step])
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
        # the save step's copy is taken at once (as under Model.train), not during the next
        # step: here the write, not the copy, is what is still running at the next save step
        step.before_update.remove(mon._before_update)
        mon._fenced = None

    def before(gs):   # runs just before the monitor's own step end
        truth[gs] = _truth(model, opt)
        if gs == 2:
            in_flight.append(mon._pending is not None and not mon._pending.written)
            threading.Timer(0.5, gate.set).start()

    with caplog.at_level(logging.INFO, logger="mindformers_st.checkpoint.monitor"):
        train(model, opt, step, ctx, [_Probe(before=before), mon, _Probe(begin=begin)], 3, out,
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


def test_the_next_update_waits_for_the_deferred_copy_so_the_file_holds_the_save_step(run, tmp_path):
    """The copy of the step-2 save is held back (a gate on the writer) until the step-3 update
    has asked to run: TrainStep must wait for it, or the file would hold step-3 values."""
    model, opt, step, ctx = run
    out = str(tmp_path)
    mon = CheckpointMonitor(checkpoint_format="safetensors", save_checkpoint_steps=2,
                            keep_checkpoint_max=5, async_save=True, output_dir=out)
    gate = threading.Event()
    truth, not_yet_copied = {}, []

    def at_update():   # runs first among TrainStep's before_update hooks, then the monitor's
        if mon._pending is not None and not gate.is_set():
            not_yet_copied.append(not mon._pending.copied.is_set())
            threading.Timer(0.3, gate.set).start()

    def begin():
        assert mon._fenced is step and step.before_update == [mon._before_update]
        step.before_update.insert(0, at_update)

    def before(gs):   # just before the monitor's step end: the gate goes in ahead of the write
        if gs == 2:
            mon._writer = mon._writer or BackgroundWriter("ckpt-save-0")
            mon._writer.submit(gate.wait, "gate")

    def after(gs):
        truth[gs] = _truth(model, opt)

    try:
        train(model, opt, step, ctx, [_Probe(before=before), mon, _Probe(after=after, begin=begin)],
              3, out, PER_EPOCH, BATCH)
    finally:
        step.before_update[:] = []
    assert not_yet_copied == [True]
    assert any(not np.array_equal(truth[2][n], truth[3][n]) for n in truth[2])   # step 3 changed them
    saves = cm.committed_saves(os.path.join(out, "checkpoint"))
    assert [s.global_step for s in saves] == [2]
    _assert_file_holds(saves[0].path(0), truth[2])
    first = mon.stats[0]   # the update's wait is counted as time the save blocked the loop
    assert first.global_step == 2 and first.copy_wait >= 0.2
    assert first.total_blocked >= first.copy_wait + first.blocked
