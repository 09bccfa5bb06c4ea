"""Derived folders written in the background (checkpoint/derived.py): shares of several builder
ranks commit the folder once, equal to the folder written in one go; a failure is a warning,
leaves nothing behind, and the load it served is unaffected."""
import logging
import os

import pytest

from mindformers_st.checkpoint.derived import (FINGERPRINT_FILE, BackgroundBuild,
                                               read_fingerprint, start_background_build,
                                               wait_background_builds)
from mindformers_st.transform import describe_source, execute, plan_merge

from ..transform.helpers import load_folder_tensors, make_globals, save_distributed, tiny_table


def _source(tmp_path):
    from mindformers_st.layout.parallel_config import ParallelConfig
    table = tiny_table()
    values = make_globals(table)
    folder = str(tmp_path / "dist")
    save_distributed(folder, values, table, ParallelConfig(model_parallel=2))
    return describe_source(folder)


def test_shares_of_two_builders_commit_once_and_equal_a_one_go_merge(tmp_path):
    plan = plan_merge(_source(tmp_path), max_shard_size=2000)
    assert len(plan.files) >= 3
    out, staging = str(tmp_path / "unified"), str(tmp_path / "unified.building")
    os.makedirs(staging)
    fp = {"version": 1, "test": "two builders"}
    builds = [BackgroundBuild(out, staging, fp, plan, "merge", "read", i, 2) for i in (0, 1)]
    for b in builds:
        b.start()
    assert [b for b in wait_background_builds() if b.out_dir == out] == builds
    assert [b.error for b in builds] == [None, None]
    assert sorted(b.committed for b in builds) == [False, True]   # exactly one commits
    assert not os.path.exists(staging) and read_fingerprint(out) == fp
    ref = str(tmp_path / "ref")
    execute(plan, ref, progress=False)
    assert sorted(os.listdir(out)) == sorted(os.listdir(ref) + [FINGERPRINT_FILE])
    got, want = load_folder_tensors(out), load_folder_tensors(ref)
    assert got.keys() == want.keys()
    assert all(got[n].tobytes() == want[n].tobytes() for n in want)


def test_a_failed_background_write_is_one_warning_and_leaves_nothing(tmp_path, caplog):
    src = _source(tmp_path)
    plan = plan_merge(src)
    os.remove(src.files[-1])   # a source file vanishes after planning
    out = str(tmp_path / "output" / "unified_checkpoint")
    os.makedirs(os.path.dirname(out))
    with caplog.at_level(logging.WARNING):
        build = start_background_build(out, {"v": 1}, plan, None, "online merge")
        assert build is not None and not build.wait()
    assert src.files[-1] in build.error and "no such safetensors file" in build.error
    assert not os.path.exists(out) and not os.path.exists(out + ".building")
    [rec] = [r for r in caplog.records if "in the background failed" in r.getMessage()]
    assert out in rec.getMessage() and "the parameters are loaded" in rec.getMessage()


def test_a_rank_outside_the_builders_writes_nothing(tmp_path):
    class OneOfTwo:   # rank 1 of 2 with transform_process_num 1: rank 0 builds
        rank, world_size = 1, 2

        def barrier(self):
            pass
    out = str(tmp_path / "u")
    os.makedirs(out + ".building")
    assert start_background_build(out, {}, plan_merge(_source(tmp_path)), OneOfTwo(), "m") is None
    with pytest.raises(FileNotFoundError):
        os.listdir(out)


def test_a_background_build_runs_below_the_training_s_priority():
    """The build thread lowers its own nice value (not the process's), and the worker threads
    it starts inherit it: busy cores go to the training first."""
    import os
    import threading
    from mindformers_st.checkpoint.derived import BACKGROUND_NICE, _yield_cpu
    main = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    seen = {}

    def worker():
        seen["worker"] = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())

    def build():
        _yield_cpu()
        seen["build"] = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
        t = threading.Thread(target=worker)
        t.start()
        t.join()
    t = threading.Thread(target=build)
    t.start()
    t.join()
    assert seen["build"] == seen["worker"] == min(19, main + BACKGROUND_NICE)
    assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) == main


def test_a_build_held_by_after_writes_nothing_until_it_is_set(tmp_path):
    import threading
    import time
    src = _source(tmp_path)
    out = str(tmp_path / "output" / "unified_checkpoint")
    os.makedirs(os.path.dirname(out))
    after = threading.Event()
    build = start_background_build(out, {"v": 1}, plan_merge(src), None, "online merge",
                                   after=after)
    time.sleep(0.3)
    assert build.running and os.listdir(out + ".building") == []   # held: nothing written
    assert not build.wait(0.1)
    after.set()
    assert build.wait() and build.committed and read_fingerprint(out) == {"v": 1}


def test_a_process_that_exits_without_waiting_still_writes_the_folder(tmp_path):
    """A script that loads (the merged copy written in the background) and simply ends: the
    interpreter's shutdown waits for the build while it can still write, and the folder is
    committed (it failed with "cannot schedule new futures after interpreter shutdown")."""
    import subprocess
    import sys
    import textwrap
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    script = textwrap.dedent(f"""
        import pathlib, sys
        sys.path.insert(0, {root!r})
        from tests.checkpoint.test_loader import (tiny_cfg, global_values, write_distributed,
                                                  make_ctx, make_model, opts)
        from mindformers_st.layout.parallel_config import ParallelConfig
        from mindformers_st.checkpoint.loader import load_checkpoint
        tmp = pathlib.Path({str(tmp_path)!r})
        cfg = tiny_cfg()
        folder = write_distributed(tmp / "dist", cfg, global_values(cfg),
                                   ParallelConfig(data_parallel=2, model_parallel=2), False)
        ctx = make_ctx()
        report = load_checkpoint(opts(folder, tmp, auto_trans_ckpt=True), make_model(cfg, ctx),
                                 None, ctx)
        assert report.background
        print("loaded; ending without waiting", flush=True)
    """)
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         timeout=300, env=dict(os.environ, PYTHONPATH=root))
    assert run.returncode == 0, run.stderr[-2000:]
    out = tmp_path / "output" / "unified_checkpoint"
    assert (out / FINGERPRINT_FILE).is_file() and (out / "param_name_map.json").is_file()
    assert not (tmp_path / "output" / "unified_checkpoint.building").exists()
    assert "wrote" in run.stdout and "cannot schedule" not in run.stderr
