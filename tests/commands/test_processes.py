"""`--processes N` (MindSpore Transformers' transform_process_num offline): the output files are
divided over N worker processes; the result is byte for byte what one process writes, and a
failure in a child is the same one-line error with nothing left behind."""
import filecmp
import os
import subprocess
import sys

import pytest
import yaml

from mindformers_st.cli import main
from mindformers_st.errors import ChecksumError
from mindformers_st.layout.parallel_config import ParallelConfig
from mindformers_st.models.config import LlamaConfig
from mindformers_st.models.param_table import llama_param_table
from mindformers_st.storage.reader import read_header
from mindformers_st.transform import describe_source, plan_merge
from mindformers_st.transform.execute import execute_in_processes
from tests.transform.helpers import make_globals, save_distributed

MODEL = dict(vocab_size=64, hidden_size=16, num_layers=2, num_heads=4, intermediate_size=32,
             seq_length=16, param_init_type="bfloat16")
BIN = os.path.join(os.path.dirname(sys.executable), "mindformers-st")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("procs")
    (tmp / "cfg.yaml").write_text(yaml.safe_dump({"model": {"model_config": MODEL}}))
    table = llama_param_table(LlamaConfig.from_dict(dict(MODEL)))
    save_distributed(str(tmp / "src"), make_globals(table, seed=3), table,
                     ParallelConfig(model_parallel=4))
    return tmp


def _same_tree(a, b):
    files = sorted(os.path.relpath(os.path.join(r, f), a) for r, _, fs in os.walk(a) for f in fs)
    assert files and files == sorted(os.path.relpath(os.path.join(r, f), b)
                                     for r, _, fs in os.walk(b) for f in fs)
    _, mismatch, errors = filecmp.cmpfiles(a, b, files, shallow=False)
    assert not mismatch and not errors, (mismatch, errors)


@pytest.mark.parametrize("cmd, src, extra", [
    ("merge", "src", ["--max-shard-size", "4KB"]),
    ("reshard", "src", ["--config", "cfg.yaml", "--dp", "1", "--mp", "2", "--pp", "1"]),
    ("split", "full", ["--config", "cfg.yaml", "--dp", "2", "--mp", "2", "--pp", "1"]),
])
def test_two_processes_write_the_same_bytes_as_one(tiny, cmd, src, extra):
    if src == "full" and not (tiny / "full").exists():
        assert main(["merge", str(tiny / "src"), str(tiny / "full"), "--no-progress"]) == 0
    extra = [str(tiny / e) if e.endswith(".yaml") else e for e in extra]
    outs = []
    for n in (1, 2):
        out = tiny / f"{cmd}_{n}"
        assert main([cmd, str(tiny / src), str(out), "--no-progress", "--processes", str(n)]
                    + extra) == 0
        outs.append(str(out))
    _same_tree(*outs)


def test_processes_must_be_a_whole_number_of_at_least_one(tiny, capsys):
    with pytest.raises(SystemExit):
        main(["merge", str(tiny / "src"), str(tiny / "x"), "--processes", "0"])
    assert "--processes" in capsys.readouterr().err


def _corrupt_copy(tiny, dst):
    """A copy of the source whose rank 3 file has one flipped byte in its block of a sliced
    tensor (replicated ones are read from rank 0)."""
    import shutil
    shutil.copytree(tiny / "src", dst)
    rank3 = [os.path.join(r, f) for r, _, fs in os.walk(dst / "rank_3") for f in fs
             if f.endswith(".safetensors")][0]
    tensors, _, data_start = read_header(rank3)
    entry = tensors["model.layers.1.attention.wq.weight"]
    pos = data_start + entry.begin + 1
    with open(rank3, "r+b") as fh:
        fh.seek(pos)
        b = fh.read(1)
        fh.seek(pos)
        fh.write(bytes([b[0] ^ 0x10]))
    return rank3


def test_a_checksum_error_in_a_child_is_raised_as_the_same_error(tiny, tmp_path):
    rank3 = _corrupt_copy(tiny, tmp_path / "bad")
    plan = plan_merge(describe_source(str(tmp_path / "bad")), max_shard_size=4096)
    os.mkdir(tmp_path / "out")
    with pytest.raises(ChecksumError, match="is corrupt") as info:
        execute_in_processes(plan, str(tmp_path / "out"), 2, progress=False)
    assert rank3 in str(info.value)


def test_a_child_failure_through_the_cli_is_one_line_and_leaves_nothing(tiny, tmp_path):
    _corrupt_copy(tiny, tmp_path / "bad")
    done = subprocess.run([BIN, "merge", str(tmp_path / "bad"), str(tmp_path / "out"),
                           "--no-progress", "--processes", "2", "--max-shard-size", "4KB"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 1
    lines = [l for l in done.stderr.splitlines() if l.startswith("error:")]
    assert len(lines) == 1 and "is corrupt" in lines[0] and "Traceback" not in done.stderr
    assert not (tmp_path / "out").exists()
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".out.tmp-")]


def test_a_file_system_error_in_a_child_is_the_same_oserror_as_in_one_process(tiny, tmp_path):
    from mindformers_st.layout.parallel_config import plan_layouts
    from mindformers_st.transform import plan_distributed
    from mindformers_st.transform.execute import execute_files
    table = llama_param_table(LlamaConfig.from_dict(dict(MODEL)))
    pc = ParallelConfig(model_parallel=2)
    plan = plan_distributed(describe_source(str(tiny / "src")), plan_layouts(table, pc), pc)
    errors = []
    for run in (lambda d: execute_files(plan, d, progress=False),
                lambda d: execute_in_processes(plan, d, 2, progress=False)):
        folder = tmp_path / f"out{len(errors)}"
        folder.mkdir()
        (folder / "rank_1").write_text("a file where the rank folder should go")
        with pytest.raises(OSError) as info:
            run(str(folder))
        errors.append((type(info.value), info.value.errno,
                       os.path.relpath(info.value.filename, folder)))
    assert errors[0] == errors[1]
