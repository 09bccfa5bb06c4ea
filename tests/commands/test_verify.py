"""`mindformers-st verify`: headers, checksums, and slice coverage of distributed checkpoints."""
import json
import os

import numpy as np
import pytest

from mindformers_st.layout.parallel_config import ParallelConfig
from mindformers_st.storage.writer import save_tensors
from tests.commands.test_inspect import broken_files, globals_, run_cli, save_distributed


def test_good_dedup_folder_passes(tmp_path, capsys):
    save_distributed(tmp_path, ParallelConfig(2, 2, optimizer_shard=True), dedup=True)
    code, out, _ = run_cli(capsys, "verify", str(tmp_path))
    assert code == 0, out
    assert out.startswith("OK: distributed checkpoint, 4 files")


def test_good_full_folder_with_replicas_passes(tmp_path, capsys):
    save_distributed(tmp_path, ParallelConfig(2, 2, pipeline_stage=1))
    code, out, _ = run_cli(capsys, "verify", str(tmp_path))
    assert code == 0, out


def test_missing_slice_fails_naming_it(tmp_path, capsys):
    name = "model.layers.0.attention.wo.weight"
    save_distributed(tmp_path, dedup=True, skip={(r, name) for r in range(4)
                                                  if r % 2 == 1})
    code, out, _ = run_cli(capsys, "verify", str(tmp_path))
    assert code == 1
    assert f"tensor '{name}': block" in out and "'offsets': [0, 2]" in out
    assert "a slice is missing" in out


def test_missing_rank_folder_fails(tmp_path, capsys):
    save_distributed(tmp_path)
    for f in os.listdir(tmp_path / "rank_2"):
        os.remove(tmp_path / "rank_2" / f)
    os.rmdir(tmp_path / "rank_2")
    code, out, _ = run_cli(capsys, "verify", str(tmp_path))
    assert code == 1 and "rank_2/ is missing" in out


def test_dedup_block_stored_twice_fails(tmp_path, capsys):
    save_distributed(tmp_path, ParallelConfig(2, 1), dedup=True)
    # rewrite rank 1 to also hold everything rank 0 owns
    from mindformers_st.commands.inspect import load_file
    import glob
    r0 = load_file(glob.glob(str(tmp_path / "rank_0" / "*.safetensors"))[0])
    r1p = glob.glob(str(tmp_path / "rank_1" / "*.safetensors"))[0]
    ours = json.loads(load_file(r1p).metadata["mindformers_st"])
    values = globals_()
    ours["slices"].update(json.loads(r0.metadata["mindformers_st"])["slices"])
    tensors = {n: values[n] for n in ours["slices"]}
    os.remove(r1p)
    save_tensors(r1p, tensors, {"format": "ms", "remove_redundancy": "True",
                                "mindformers_st": json.dumps(ours)})
    code, out, _ = run_cli(capsys, "verify", str(tmp_path))
    assert code == 1 and "is stored 2 times" in out


def test_corrupted_data_fails_checksum(tmp_path, capsys):
    path = save_tensors(tmp_path / "m.safetensors", globals_())
    size = os.path.getsize(path)
    with open(path, "r+b") as fh:
        fh.seek(size - 2)
        fh.write(b"\x7f\x7f")
    code, out, _ = run_cli(capsys, "verify", path)
    assert code == 1 and "model.norm_out.weight" in out


def test_replicas_with_different_checksums_fail(tmp_path, capsys):
    save_distributed(tmp_path, ParallelConfig(2, 1))
    import glob
    p = glob.glob(str(tmp_path / "rank_1" / "*.safetensors"))[0]
    from mindformers_st.commands.inspect import load_file
    meta = load_file(p).metadata
    values = {n: v + 1 for n, v in globals_().items()}
    values["global_step"] = np.array([5], np.int64)
    os.remove(p)
    save_tensors(p, values, {k: v for k, v in meta.items() if k != "checksums"})
    code, out, _ = run_cli(capsys, "verify", str(tmp_path))
    assert code == 1 and "different checksums" in out


@pytest.mark.parametrize("kind", ["empty", "not_json", "length_past_end", "bad_dtype",
                                  "bad_span", "overlap", "truncated", "bad_metadata"])
def test_verify_rejects_malformed_headers(tmp_path, capsys, kind):
    path = broken_files(tmp_path)[kind]
    code, out, _ = run_cli(capsys, "verify", path)
    assert code == 1 and os.path.basename(path) in out
    # a broken rank file inside a distributed folder
    save_distributed(tmp_path / "dist")
    import glob
    victim = glob.glob(str(tmp_path / "dist" / "rank_1" / "*.safetensors"))[0]
    os.replace(path, victim)
    code, out, _ = run_cli(capsys, "verify", str(tmp_path / "dist"))
    assert code == 1 and os.path.basename(victim) in out


def test_files_without_metadata_need_a_strategy(tmp_path, capsys):
    from mindformers_st.layout.parallel_config import plan_layouts
    from mindformers_st.layout.strategy import write_strategy_file
    from tests.commands.test_inspect import TABLE
    layouts = plan_layouts(TABLE, ParallelConfig(1, 2))
    values = globals_()
    for r in range(2):
        os.makedirs(tmp_path / f"rank_{r}")
        save_tensors(tmp_path / f"rank_{r}" / "net.safetensors",
                     {n: values[n][l.slice_for(r).index()] for n, l in layouts.items()},
                     {"format": "ms"})
    code, out, _ = run_cli(capsys, "verify", str(tmp_path))
    assert code == 1 and "pass --strategy" in out
    write_strategy_file(tmp_path / "s.ckpt", layouts)
    code, out, _ = run_cli(capsys, "verify", str(tmp_path), "--strategy", str(tmp_path / "s.ckpt"))
    assert code == 0, out


def test_a_strategy_for_another_world_size_is_one_problem_naming_both(tmp_path, capsys):
    from mindformers_st.layout.parallel_config import plan_layouts
    from mindformers_st.layout.strategy import write_rank_strategy_files
    from mindformers_st.transform.sources import describe_distributed
    from mindformers_st.errors import CheckpointError
    from tests.commands.test_inspect import TABLE
    save_distributed(tmp_path / "ckpt", ParallelConfig(2, 1))
    pc8 = ParallelConfig(8, 1)
    write_rank_strategy_files(tmp_path / "strategy", plan_layouts(TABLE, pc8), pc8)
    code, out, _ = run_cli(capsys, "verify", str(tmp_path / "ckpt"), "--strategy",
                           str(tmp_path / "strategy"))
    assert code == 1 and "1 problem(s)" in out, out
    assert "is for 8 rank(s) but the checkpoint" in out and "saved by 2 rank(s)" in out
    code, out, _ = run_cli(capsys, "inspect", str(tmp_path / "ckpt"), "--strategy",
                           str(tmp_path / "strategy"))
    assert code == 1 and "is for 8 rank(s)" in out + _
    with pytest.raises(CheckpointError, match=r"is for 8 rank\(s\) but the checkpoint .*ckpt was "
                                              r"saved by 2 rank\(s\)"):
        describe_distributed(str(tmp_path / "ckpt"), str(tmp_path / "strategy"))
