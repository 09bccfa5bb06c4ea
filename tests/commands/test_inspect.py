"""`mindformers-st inspect`: tables and JSON for files, complete and distributed folders;
every malformed header is refused with a message naming the file, exit code non-zero."""
import json
import os

import numpy as np
import pytest

from mindformers_st.cli import main
from mindformers_st.layout.owners import assign_owners, owned_by
from mindformers_st.layout.param_table import ParamSpec, ParamTable
from mindformers_st.layout.parallel_config import ParallelConfig, plan_layouts
from mindformers_st.storage.index import write_index
from mindformers_st.storage.writer import save_tensors

TABLE = ParamTable((
    ParamSpec("model.layers.0.attention.wq.weight", (4, 4), split_dim=0, layer=0),
    ParamSpec("model.layers.0.attention.wo.weight", (4, 4), split_dim=1, layer=0),
    ParamSpec("model.norm_out.weight", (4,), layer=1),
), 1)


def globals_():
    rng = np.random.default_rng(1)
    return {p.name: rng.standard_normal(p.shape).astype(np.float32) for p in TABLE}


def save_distributed(folder, pc=ParallelConfig(2, 2), dedup=False, step=5, skip=()):
    """rank_{r}/ files with our __metadata__ (slices, step...) as CheckpointMonitor writes them."""
    layouts = plan_layouts(TABLE, pc)
    values = globals_()
    owners = assign_owners(layouts, {p.name: p.dtype for p in TABLE}) if dedup else None
    for r in range(pc.world_size):
        share = (owned_by(owners, r) if dedup else
                 {n: l.slice_for(r) for n, l in layouts.items() if r in l.ranks()})
        share = {n: b for n, b in share.items() if (r, n) not in skip}
        tensors = {n: values[n][b.index()] for n, b in share.items()}
        tensors["global_step"] = np.array([step], np.int64)
        ours = {"version": 1, "rank": r, "world_size": pc.world_size,
                "parallel_config": pc.to_json(), "remove_redundancy": dedup, "epoch": 1,
                "step": step, "slices": {n: b.to_json() for n, b in share.items()}}
        meta = {"format": "ms", "remove_redundancy": str(dedup), "mindformers_st": json.dumps(ours)}
        os.makedirs(f"{folder}/rank_{r}", exist_ok=True)
        save_tensors(f"{folder}/rank_{r}/checkpoint_rank_{r}-1_{step}.safetensors", tensors, meta)
    return layouts, values


def broken_files(tmp_path):
    """Small malformed files, one per kind of header damage."""
    def raw(name, header, data=b"", length=None):
        body = header if isinstance(header, bytes) else json.dumps(header).encode()
        n = len(body) if length is None else length
        p = tmp_path / name
        p.write_bytes(n.to_bytes(8, "little") + body + data)
        return str(p)
    t = {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}
    return {
        "empty": raw("empty.safetensors", b"", length=0),
        "not_json": raw("notjson.safetensors", b"{not json"),
        "length_past_end": raw("past.safetensors", b"{}", length=1 << 40),
        "bad_dtype": raw("dtype.safetensors", {"w": dict(t, dtype="F33")}, b"\0" * 8),
        "bad_span": raw("span.safetensors", {"w": dict(t, shape=[3])}, b"\0" * 8),
        "overlap": raw("overlap.safetensors", {"a": t, "b": t}, b"\0" * 8),
        "truncated": raw("trunc.safetensors", {"w": t}, b"\0" * 4),
        "bad_metadata": raw("meta.safetensors", {"__metadata__": {"k": 1}, "w": t}, b"\0" * 8),
    }


def run_cli(capsys, *argv):
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_inspect_single_file_table_and_json(tmp_path, capsys):
    path = save_tensors(tmp_path / "m.safetensors", globals_(), {"format": "ms"})
    code, out, _ = run_cli(capsys, "inspect", path)
    assert code == 0
    assert "model.layers.0.attention.wq.weight" in out and "F32" in out and "(4, 4)" in out
    assert "total: 1 files, 3 stored tensors" in out
    code, out, _ = run_cli(capsys, "inspect", path, "--json")
    obj = json.loads(out)
    assert obj["kind"] == "file" and obj["totals"]["bytes"] == (16 + 16 + 4) * 4
    assert {r["name"] for r in obj["tensors"]} == set(globals_())


def test_inspect_complete_folder_with_ms_index_and_hyper(tmp_path, capsys):
    values = globals_()
    names = sorted(values)
    save_tensors(tmp_path / "part0.safetensors", {n: values[n] for n in names[:2]})
    save_tensors(tmp_path / "part1.safetensors", {n: values[n] for n in names[2:]})
    save_tensors(tmp_path / "hyper_param.safetensors",
                 {"global_step": np.array([42], np.int64), "epoch_num": np.array([3], np.int64)})
    write_index(tmp_path, "ms", {n: ("part0.safetensors" if n in names[:2] else "part1.safetensors")
                                 for n in names}, sum(v.nbytes for v in values.values()))
    code, out, _ = run_cli(capsys, "inspect", str(tmp_path), "--json")
    obj = json.loads(out)
    assert code == 0 and obj["kind"] == "complete" and obj["index"]["kind"] == "ms"
    assert obj["step"] == 42 and obj["epoch"] == 3
    assert obj["totals"]["files"] == 3


def test_inspect_distributed_shows_per_rank_slices(tmp_path, capsys):
    save_distributed(tmp_path)
    code, out, _ = run_cli(capsys, "inspect", str(tmp_path))
    assert code == 0
    assert "[0:4, 2:4] of (4, 4)" in out       # wo on rank 1: columns 2..4
    assert "step: 5" in out
    code, out, _ = run_cli(capsys, "inspect", str(tmp_path), "--json")
    obj = json.loads(out)
    wq = [r for r in obj["tensors"] if r["name"].endswith("wq.weight") and r["rank"] == 3]
    assert wq[0]["offsets"] == [2, 0] and wq[0]["global_shape"] == [4, 4]
    assert obj["parallel_config"]["model_parallel"] == 2 and obj["missing_ranks"] == []


def test_inspect_uses_a_strategy_when_files_have_no_metadata(tmp_path, capsys):
    from mindformers_st.layout.strategy import write_strategy_file
    pc = ParallelConfig(1, 2)
    layouts = plan_layouts(TABLE, pc)
    values = globals_()
    for r in range(2):
        os.makedirs(tmp_path / f"rank_{r}")
        save_tensors(tmp_path / f"rank_{r}" / "net.safetensors",
                     {n: values[n][l.slice_for(r).index()] for n, l in layouts.items()},
                     {"format": "ms"})
    write_strategy_file(tmp_path / "strategy.ckpt", layouts)
    code, out, _ = run_cli(capsys, "inspect", str(tmp_path), "--json", "--strategy",
                           str(tmp_path / "strategy.ckpt"))
    rows = json.loads(out)["tensors"]
    assert code == 0 and all("offsets" in r for r in rows)


@pytest.mark.parametrize("kind", ["empty", "not_json", "length_past_end", "bad_dtype",
                                  "bad_span", "overlap", "truncated", "bad_metadata"])
def test_inspect_refuses_malformed_headers(tmp_path, capsys, kind):
    path = broken_files(tmp_path)[kind]
    code, out, err = run_cli(capsys, "inspect", path)
    assert code != 0 and os.path.basename(path) in err and "error:" in err
    # inside a folder too
    folder = tmp_path / "folder"
    folder.mkdir()
    os.replace(path, folder / "model.safetensors")
    code, _, err = run_cli(capsys, "inspect", str(folder))
    assert code != 0 and "model.safetensors" in err


def test_inspect_missing_path_fails(tmp_path, capsys):
    code, _, err = run_cli(capsys, "inspect", str(tmp_path / "nope"))
    assert code == 1 and "no such file or folder" in err
