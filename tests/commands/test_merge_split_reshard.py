"""The merge / split / reshard commands end to end on a tiny Llama saved as training saves it."""
import os

import pytest
import yaml

from mindformers_st.cli import main
from mindformers_st.layout.parallel_config import ParallelConfig, plan_layouts
from mindformers_st.layout.strategy import write_rank_strategy_files
from mindformers_st.models.config import LlamaConfig
from mindformers_st.models.param_table import llama_param_table
from tests.transform.helpers import (assert_rank_files_match, load_folder_tensors, make_globals,
                                     save_distributed, assert_bit_exact)

MODEL = dict(vocab_size=64, hidden_size=16, num_layers=2, num_heads=4, intermediate_size=32,
             seq_length=16, param_init_type="bfloat16")


@pytest.fixture
def tiny(tmp_path):
    cfg = {"model": {"model_config": MODEL}, "parallel_config": {"data_parallel": 1}}
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    table = llama_param_table(LlamaConfig.from_dict(dict(MODEL)))
    values = make_globals(table, seed=7)
    pc = ParallelConfig(model_parallel=4)
    layouts = save_distributed(str(tmp_path / "src"), values, table, pc)
    return tmp_path, table, values, layouts, pc


def test_merge_command_writes_complete_weights(tiny, capsys):
    tmp, table, values, _, _ = tiny
    assert main(["merge", str(tmp / "src"), str(tmp / "full"), "--no-progress",
                 "--max-shard-size", "4KB"]) == 0
    got = load_folder_tensors(str(tmp / "full"))
    for n, v in values.items():
        assert_bit_exact(got[n], v, n)
    assert len([f for f in os.listdir(tmp / "full") if f.startswith("model-")]) > 1


def test_merge_says_how_many_files_landed(tiny, capsys):
    tmp, *_ = tiny
    assert main(["merge", str(tmp / "src"), str(tmp / "full"), "--no-progress"]) == 0
    landed = sum(len(files) for _, _, files in os.walk(tmp / "full"))
    assert landed >= 3   # the shard(s), param_name_map.json, hyper_param.safetensors
    assert f"merge: wrote {landed} file(s) (" in capsys.readouterr().out


def test_dry_run_prints_costs_and_writes_nothing(tiny, capsys):
    tmp, table, *_ = tiny
    assert main(["merge", str(tmp / "src"), str(tmp / "full"), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "peak buffer" in out and "4 source file(s)" in out
    assert not (tmp / "full").exists()
    assert main(["reshard", str(tmp / "src"), str(tmp / "r"), "--dry-run",
                 "--config", str(tmp / "cfg.yaml"), "--dp", "1", "--mp", "2", "--pp", "1"]) == 0
    out = capsys.readouterr().out
    assert "rank_1/checkpoint_rank_1.safetensors" in out and not (tmp / "r").exists()
    assert ("target layout: data_parallel 1 x model_parallel 2 x pipeline_stage 1 = 2 rank(s), "
            "optimizer_shard False, vocab_emb_dp True") in out


def test_split_with_config_then_reshard_with_strategy_round_trips(tiny):
    tmp, table, values, _, _ = tiny
    assert main(["merge", str(tmp / "src"), str(tmp / "full"), "--no-progress"]) == 0
    assert main(["split", str(tmp / "full"), str(tmp / "split"), "--no-progress",
                 "--config", str(tmp / "cfg.yaml"), "--dp", "2", "--mp", "2", "--pp", "1",
                 "--optimizer-shard", "--remove-redundancy"]) == 0
    pc = ParallelConfig(data_parallel=2, model_parallel=2, optimizer_shard=True)
    layouts = plan_layouts(table, pc)
    assert_rank_files_match(str(tmp / "split"), values, layouts, 4, remove_redundancy=True)
    strategy = tmp / "split" / "strategy"
    assert len(os.listdir(strategy)) == 4
    # reshard back to mp4 by a MindSpore strategy, no complete copy in between
    dst_pc = ParallelConfig(model_parallel=4)
    write_rank_strategy_files(str(tmp / "s4"), plan_layouts(table, dst_pc), dst_pc)
    assert main(["reshard", str(tmp / "split"), str(tmp / "back"), "--no-progress",
                 "--dst-strategy", str(tmp / "s4")]) == 0
    assert_rank_files_match(str(tmp / "back"), values, plan_layouts(table, dst_pc), 4)


def test_reshard_with_source_strategy_and_pipeline_target(tiny):
    tmp, table, values, layouts, pc = tiny
    write_rank_strategy_files(str(tmp / "ssrc"), layouts, pc)
    assert main(["reshard", str(tmp / "src"), str(tmp / "pp"), "--no-progress",
                 "--src-strategy", str(tmp / "ssrc"), "--config", str(tmp / "cfg.yaml"),
                 "--pp", "2", "--mp", "2", "--dp", "1"]) == 0
    dst_pc = ParallelConfig(model_parallel=2, pipeline_stage=2)
    assert_rank_files_match(str(tmp / "pp"), values, plan_layouts(table, dst_pc), 4)


def test_bad_inputs_fail_before_writing_with_a_message(tiny, capsys):
    tmp, *_ = tiny
    assert main(["reshard", str(tmp / "src"), str(tmp / "x"), "--config", str(tmp / "cfg.yaml"),
                 "--dp", "1", "--mp", "3", "--pp", "1"]) == 1
    assert "not divisible" in capsys.readouterr().err
    assert main(["reshard", str(tmp / "src"), str(tmp / "x"), "--mp", "2"]) == 1
    assert "--dst-strategy" in capsys.readouterr().err
    # the target's shape is said in full: a YAML's data_parallel never joins --mp silently
    assert main(["reshard", str(tmp / "src"), str(tmp / "x"), "--config", str(tmp / "cfg.yaml"),
                 "--mp", "2"]) == 1
    assert "needs the target's --dp, --mp and --pp (missing --dp, --pp)" in capsys.readouterr().err
    os.rename(tmp / "src" / "rank_3", tmp / "moved")
    assert main(["merge", str(tmp / "src"), str(tmp / "x")]) == 1
    assert "rank_3/ is missing" in capsys.readouterr().err
    assert not (tmp / "x").exists()
