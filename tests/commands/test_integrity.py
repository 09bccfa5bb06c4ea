"""What is written is checked when read: a flipped bit, a truncated file, a missing rank and a
stale uncommitted save, through every offline command (merge, reshard, split, export-hf, inspect,
verify). Failing commands exit 1 with one message naming the file and the tensor, and leave
nothing at the destination."""
import json
import os

import numpy as np
import pytest
import yaml

from mindformers_st.cli import main
from mindformers_st.layout.parallel_config import ParallelConfig
from mindformers_st.models.config import LlamaConfig
from mindformers_st.models.param_table import llama_param_table
from mindformers_st.records import names
from mindformers_st.records.commit import CommittedSave, add_committed
from mindformers_st.storage.checksum import decode_checksums
from mindformers_st.storage.reader import read_header
from mindformers_st.transform.verify import keys_to_verify
from tests.transform.helpers import assert_bit_exact, load_folder_tensors, make_globals, save_distributed

MODEL = dict(vocab_size=64, hidden_size=16, num_layers=2, num_heads=4, intermediate_size=32,
             seq_length=16)
TENSOR = "model.layers.1.attention.wq.weight"


def flip_bit(path, tensor=TENSOR, byte=5):
    """Flip one bit inside `tensor`'s stored bytes; returns the recorded digest."""
    tensors, metadata, start = read_header(path)
    e = tensors[tensor]
    with open(path, "r+b") as fh:
        fh.seek(start + e.begin + byte)
        b = fh.read(1)
        fh.seek(start + e.begin + byte)
        fh.write(bytes([b[0] ^ 0x10]))
    return decode_checksums(metadata)[tensor]


@pytest.fixture
def run(tmp_path):
    """A committed mp2 training folder: step 1_2 (committed) and 1_4 (committed, newest)."""
    cfg = {"model": {"model_config": MODEL}}
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    table = llama_param_table(LlamaConfig.from_dict(dict(MODEL)))
    pc = ParallelConfig(model_parallel=2)
    values = {}
    for step, seed in ((2, 1), (4, 2)):
        values[step] = make_globals(table, seed)
        save_distributed(str(tmp_path / "ckpt"), values[step], table, pc, prefix="llama",
                         suffix=f"1_{step}")
        files = {r: f"rank_{r}/{names.ckpt_file_name('llama', r, 1, step)}" for r in range(2)}
        add_committed(str(tmp_path / "ckpt"), 2, CommittedSave(1, step, step, files))
    return tmp_path, values


def _err(capsys):
    return capsys.readouterr().err


def _leftovers(parent):
    return [n for n in os.listdir(parent) if n.startswith(".")]


def test_flipped_bit_fails_merge_and_reshard_and_nothing_is_written(run, capsys):
    tmp, values = run
    rank1 = tmp / "ckpt" / "rank_1" / "llama_rank_1-1_4.safetensors"
    recorded = flip_bit(str(rank1))
    assert main(["merge", str(tmp / "ckpt"), str(tmp / "out"), "--no-progress"]) == 1
    err = _err(capsys)
    assert str(rank1) in err and TENSOR in err and recorded in err and "computed" in err
    assert not (tmp / "out").exists() and not _leftovers(tmp)
    assert main(["reshard", str(tmp / "ckpt"), str(tmp / "re"), "--no-progress",
                 "--config", str(tmp / "cfg.yaml"), "--dp", "2", "--mp", "1", "--pp", "1"]) == 1
    assert recorded in _err(capsys) and not (tmp / "re").exists() and not _leftovers(tmp)
    # an older committed save is still there to use, and opting out reads the damaged bytes
    assert main(["merge", str(tmp / "ckpt"), str(tmp / "old"), "--no-progress", "--step", "1_2"]) == 0
    got = load_folder_tensors(str(tmp / "old"))
    assert_bit_exact(got[TENSOR], values[2][TENSOR])
    assert main(["merge", str(tmp / "ckpt"), str(tmp / "raw"), "--no-progress", "--no-verify"]) == 0
    assert not np.array_equal(load_folder_tensors(str(tmp / "raw"))[TENSOR], values[4][TENSOR])


def test_flipped_bit_in_complete_weights_fails_split_and_export(run, capsys):
    tmp, _ = run
    assert main(["merge", str(tmp / "ckpt"), str(tmp / "full"), "--no-progress"]) == 0
    shard = [f for f in os.listdir(tmp / "full") if f.startswith("model-")][0]
    recorded = flip_bit(str(tmp / "full" / shard))
    assert main(["split", str(tmp / "full"), str(tmp / "s"), "--no-progress",
                 "--config", str(tmp / "cfg.yaml"), "--dp", "2", "--mp", "1", "--pp", "1"]) == 1
    assert recorded in _err(capsys) and not (tmp / "s").exists()
    assert main(["export-hf", str(tmp / "full"), str(tmp / "hf"), "--no-progress",
                 "--config", str(tmp / "cfg.yaml")]) == 1
    assert recorded in _err(capsys) and not (tmp / "hf").exists() and not _leftovers(tmp)
    assert main(["verify", str(tmp / "full")]) == 1


def test_split_for_model_parallel_checks_only_with_verify_full(run, capsys):
    """Cutting mp2 blocks out of complete weights reads part of each matrix: the default checks
    the tensors it reads whole; --verify full reads and checks every tensor it touches."""
    tmp, _ = run
    assert main(["merge", str(tmp / "ckpt"), str(tmp / "full"), "--no-progress"]) == 0
    shard = [f for f in os.listdir(tmp / "full") if f.startswith("model-")][0]
    recorded = flip_bit(str(tmp / "full" / shard))
    args = ["split", str(tmp / "full"), str(tmp / "s"), "--no-progress", "--config",
            str(tmp / "cfg.yaml"), "--mp", "2", "--dp", "1", "--pp", "1"]
    assert main(args + ["--verify", "full"]) == 1 and recorded in _err(capsys)
    # both mp ranks' blocks together read the whole tensor: the default check catches it too
    assert main(args) == 1 and recorded in _err(capsys)


def test_partial_reads_are_checked_only_in_full_mode(run):
    from mindformers_st.transform import describe_complete, plan_rank_slices
    from mindformers_st.layout.parallel_config import plan_layouts
    tmp, _ = run
    assert main(["merge", str(tmp / "ckpt"), str(tmp / "full"), "--no-progress"]) == 0
    src = describe_complete(str(tmp / "full"))
    table = llama_param_table(LlamaConfig.from_dict(dict(MODEL)))
    plan = plan_rank_slices(src, plan_layouts(table, ParallelConfig(model_parallel=2)), 0)
    from mindformers_st.transform.execute import read_source_shapes
    shapes = read_source_shapes(plan)
    read = {n for _, n in keys_to_verify(plan, shapes, "read")}
    full = {n for _, n in keys_to_verify(plan, shapes, "full")}
    assert TENSOR not in read and TENSOR in full            # rank 0 reads half of wq
    assert "model.norm_out.weight" in read                  # replicated: read whole
    assert keys_to_verify(plan, shapes, "off") == set()


def test_truncated_and_missing_rank_files_are_named(run, capsys):
    tmp, _ = run
    rank0 = tmp / "ckpt" / "rank_0" / "llama_rank_0-1_4.safetensors"
    with open(rank0, "r+b") as fh:
        fh.truncate(os.path.getsize(rank0) - 100)
    for cmd in (["merge", str(tmp / "ckpt"), str(tmp / "o"), "--no-progress"],
                ["inspect", str(tmp / "ckpt")], ["verify", str(tmp / "ckpt")]):
        assert main(cmd) == 1
        out = capsys.readouterr()
        assert str(rank0) in out.err + out.out and "--step" in out.err + out.out
    os.remove(rank0)
    assert main(["merge", str(tmp / "ckpt"), str(tmp / "o"), "--no-progress"]) == 1
    assert "missing" in _err(capsys) and not (tmp / "o").exists()


def test_a_stale_uncommitted_higher_step_is_never_merged(run, capsys):
    """A restarted run committed step 1_2 after an old run left step 1_4 on disk: the record
    (not the highest number) says what the checkpoint is."""
    tmp, values = run
    files = {r: f"rank_{r}/llama_rank_{r}-1_2.safetensors" for r in range(2)}
    (tmp / "ckpt" / "committed.json").unlink()
    add_committed(str(tmp / "ckpt"), 2, CommittedSave(1, 2, 2, files))
    assert main(["merge", str(tmp / "ckpt"), str(tmp / "out"), "--no-progress"]) == 0
    assert_bit_exact(load_folder_tensors(str(tmp / "out"))[TENSOR], values[2][TENSOR])
    assert main(["inspect", str(tmp / "ckpt")]) == 0
    out = capsys.readouterr().out
    assert "save: 1_2 (committed)" in out and "uncommitted" in out and "1_4" in out


@pytest.mark.parametrize("qkv_concat", [False, True])
def test_export_hf_straight_from_rank_files_equals_export_of_the_merged_folder(tmp_path, qkv_concat):
    """export-hf reads a rank_x/ folder in one pass (each HF tensor assembled from the rank
    files' slices, fused w_qkv/w_gate_hidden split back), with the same bytes as merging first."""
    from mindformers_st.layout.parallel_config import ParallelConfig
    from mindformers_st.records.commit import CommittedSave, add_committed
    cfg = dict(MODEL, n_kv_heads=2, qkv_concat=qkv_concat)
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump({"model": {"model_config": cfg}}))
    table = llama_param_table(LlamaConfig.from_dict(dict(cfg)))
    values = make_globals(table.with_optimizer_states(), 3)
    save_distributed(str(tmp_path / "ckpt"), values, table.with_optimizer_states(),
                     ParallelConfig(data_parallel=2, model_parallel=2), remove_redundancy=True,
                     prefix="llama", suffix="1_4")
    add_committed(str(tmp_path / "ckpt"), 4, CommittedSave(
        1, 4, 4, {r: f"rank_{r}/llama_rank_{r}-1_4.safetensors" for r in range(4)}))
    assert main(["export-hf", str(tmp_path / "ckpt"), str(tmp_path / "direct"), "--no-progress",
                 "--config", str(tmp_path / "cfg.yaml")]) == 0
    assert main(["merge", str(tmp_path / "ckpt"), str(tmp_path / "merged"), "--no-progress"]) == 0
    assert main(["export-hf", str(tmp_path / "merged"), str(tmp_path / "via"), "--no-progress",
                 "--config", str(tmp_path / "cfg.yaml")]) == 0
    direct, via = load_folder_tensors(str(tmp_path / "direct")), load_folder_tensors(str(tmp_path / "via"))
    assert sorted(direct) == sorted(via) and "model.layers.0.self_attn.q_proj.weight" in direct
    for name in via:
        assert_bit_exact(direct[name], via[name], name)
    assert json.load(open(tmp_path / "direct" / "config.json")) == \
        json.load(open(tmp_path / "via" / "config.json"))


def _rewrite_header(path, edit):
    """Rewrite the JSON header of `path` through `edit(obj)` keeping its length (space-padded)."""
    with open(path, "r+b") as fh:
        n = int.from_bytes(fh.read(8), "little")
        obj = json.loads(fh.read(n))
        edit(obj)
        raw = json.dumps(obj, separators=(",", ":")).encode()
        assert len(raw) <= n
        fh.seek(8)
        fh.write(raw + b" " * (n - len(raw)))


def test_a_flip_in_one_data_parallel_copy_is_caught_when_the_copies_are_read_in_parts(tmp_path, capsys):
    """dp2 -> mp2: each target rank reads half of wq, from a different replica; together the
    reads cover the tensor, so every copy touched is checked whole (found by a hostile probe)."""
    cfg = {"model": {"model_config": MODEL}}
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    table = llama_param_table(LlamaConfig.from_dict(dict(MODEL)))
    save_distributed(str(tmp_path / "dp"), make_globals(table, 1), table,
                     ParallelConfig(data_parallel=2), prefix="llama", suffix="1_4")
    for rank in (0, 1):
        src = tmp_path / f"dp{rank}"
        import shutil
        shutil.copytree(tmp_path / "dp", src)
        recorded = flip_bit(str(src / f"rank_{rank}" / f"llama_rank_{rank}-1_4.safetensors"),
                            byte=3 if rank == 0 else 1000)
        assert main(["reshard", str(src), str(tmp_path / f"out{rank}"), "--no-progress",
                     "--config", str(tmp_path / "cfg.yaml"), "--mp", "2", "--dp", "1", "--pp", "1"]) == 1
        assert recorded in _err(capsys) and not (tmp_path / f"out{rank}").exists()


def test_a_checksum_record_missing_or_incomplete_in_our_files_is_an_error(run, capsys):
    tmp, _ = run
    path = str(tmp / "ckpt" / "rank_0" / "llama_rank_0-1_4.safetensors")
    _rewrite_header(path, lambda o: o["__metadata__"].__setitem__(
        "checksums", json.dumps({"algo": "xxh3_64", "tensors": {
            k: v for k, v in json.loads(o["__metadata__"]["checksums"])["tensors"].items()
            if k != TENSOR}})))
    assert main(["verify", str(tmp / "ckpt")]) == 1
    assert "no recorded checksum" in capsys.readouterr().out
    assert main(["merge", str(tmp / "ckpt"), str(tmp / "o"), "--no-progress"]) == 1
    assert "no recorded checksum" in _err(capsys)
    # one flipped bit in the key name switches the whole record off: refused too
    _rewrite_header(path, lambda o: o["__metadata__"].__setitem__(
        "chdcksums", o["__metadata__"].pop("checksums")))
    assert main(["merge", str(tmp / "ckpt"), str(tmp / "o"), "--no-progress", "--verify", "full"]) == 1
    assert "records no checksums" in _err(capsys)
    assert main(["verify", str(tmp / "ckpt")]) == 1
    assert main(["merge", str(tmp / "ckpt"), str(tmp / "o"), "--no-progress", "--no-verify"]) == 0


def test_an_output_folder_holding_the_source_is_refused_even_with_overwrite(run, capsys):
    tmp, _ = run
    ckpt = tmp / "ckpt"
    before = sorted(str(p) for p in ckpt.rglob("*"))
    for dst in (ckpt, tmp, ckpt / "rank_0"):
        assert main(["merge", str(ckpt), str(dst), "--no-progress", "--overwrite"]) == 1
        assert "holds the source" in _err(capsys)
    assert sorted(str(p) for p in ckpt.rglob("*")) == before and (tmp / "cfg.yaml").exists()


def test_a_destination_the_file_system_refuses_is_one_error_line(run, capsys):
    tmp, _ = run
    (tmp / "afile").write_text("x")
    assert main(["merge", str(tmp / "ckpt"), str(tmp / "afile" / "out"), "--no-progress"]) == 1
    err = _err(capsys)
    assert err.startswith("error: ") and "Traceback" not in err and len(err.splitlines()) == 1
