"""ParallelConfig x ParamTable -> per-rank layouts (MindSpore Transformers' Llama cut)."""
from types import SimpleNamespace

import numpy as np
import pytest

from mindformers_st.errors import LayoutError
from mindformers_st.layout.param_table import ParamSpec, ParamTable
from mindformers_st.layout.parallel_config import (ParallelConfig, plan_layouts, rank_coords,
                                                   stage_of)
from mindformers_st.models.param_table import llama_param_table


def tiny_llama(**kw):
    cfg = dict(vocab_size=64, hidden_size=16, num_layers=4, num_heads=4, n_kv_heads=None,
               intermediate_size=32, qkv_has_bias=False, tie_word_embeddings=False,
               param_init_type="float32")
    cfg.update(kw)
    return llama_param_table(SimpleNamespace(**cfg))


def test_rank_coords_order():
    pc = ParallelConfig(data_parallel=2, model_parallel=3, pipeline_stage=2)
    assert rank_coords(0, pc) == (0, 0, 0)
    assert rank_coords(4, pc) == (0, 1, 1)
    assert rank_coords(7, pc) == (1, 0, 1)
    with pytest.raises(LayoutError):
        rank_coords(12, pc)


def test_column_row_and_replicated_params_dp2_mp2():
    pc = ParallelConfig(data_parallel=2, model_parallel=2)
    lay = plan_layouts(tiny_llama(), pc)
    wq = lay["model.layers.0.attention.wq.weight"]
    assert (wq.dev_matrix, wq.tensor_map) == ((2, 2), (0, -1))
    wo = lay["model.layers.0.attention.wo.weight"]
    assert wo.tensor_map == (-1, 0)
    assert wo.slice_for(3).offsets == (0, 8) and wo.replica_group(1) == (1, 3)
    assert lay["model.norm_out.weight"].tensor_map == (-1,)
    # vocab_emb_dp=True (default): embedding and lm_head stay whole on every mp rank
    assert lay["model.tok_embeddings.embedding_weight"].slice_for(1).is_whole
    split = plan_layouts(tiny_llama(), ParallelConfig(2, 2, vocab_emb_dp=False))
    assert split["lm_head.weight"].slice_for(1).sizes == (32, 16)


def test_pipeline_stages_from_layers():
    table = tiny_llama()
    pc = ParallelConfig(data_parallel=1, model_parallel=2, pipeline_stage=2)
    lay = plan_layouts(table, pc)
    assert lay["model.tok_embeddings.embedding_weight"].stage == 0
    assert lay["model.layers.1.ffn_norm.weight"].stage == 0
    assert lay["model.layers.2.ffn_norm.weight"].stage == 1
    assert lay["lm_head.weight"].stage == 1 and list(lay["lm_head.weight"].ranks()) == [2, 3]
    assert stage_of(ParamSpec("x", (1,), layer=7), 8, 4) == 3


def test_optimizer_shard_and_moments_follow_parameter():
    table = tiny_llama().with_optimizer_states()
    pc = ParallelConfig(data_parallel=2, model_parallel=2, optimizer_shard=True)
    lay = plan_layouts(table, pc)
    for name in ("model.layers.0.attention.wq.weight", "model.layers.0.attention.wo.weight",
                 "model.norm_out.weight"):
        for prefix in ("adam_m.", "adam_v."):
            assert lay[prefix + name] == lay[name]
    wq = lay["model.layers.0.attention.wq.weight"]          # (16,16) dim0 over mp, then dp
    assert (wq.opt_weight_shard_step, wq.opt_weight_shard_size) == (2, 2)
    assert wq.slice_for(2).offsets == (4, 0) and wq.local_shape == (4, 16)
    norm = lay["model.norm_out.weight"]                     # replicated: whole group of 4
    assert norm.opt_shard_count == 4 and norm.local_shape == (4,)


def test_optimizer_shard_skipped_when_dim0_not_divisible():
    table = ParamTable((ParamSpec("odd", (3, 4), split_dim=1, layer=0),), 1)
    lay = plan_layouts(table, ParallelConfig(data_parallel=2, model_parallel=2,
                                             optimizer_shard=True))["odd"]
    assert lay.opt_shard_count == 1 and lay.replica_group(0) == (0, 2)


def test_every_rank_covers_each_tensor_dp2_mp2_pp2():
    table = tiny_llama()
    pc = ParallelConfig(2, 2, 2, optimizer_shard=True)
    lay = plan_layouts(table, pc)
    for spec in table:
        count = np.zeros(spec.shape, dtype=int)
        for block in lay[spec.name].distinct_slices():
            count[block.index()] += 1
        assert (count == 1).all(), spec.name


@pytest.mark.parametrize("pc, table, message", [
    (ParallelConfig(model_parallel=3), None, r"wq.weight: dim 0 .* not divisible by model_parallel 3"),
    (ParallelConfig(pipeline_stage=3), None, "num_layers 4 is not divisible by pipeline_stage 3"),
])
def test_bad_configs_name_parameter_and_numbers(pc, table, message):
    with pytest.raises(LayoutError, match=message):
        plan_layouts(table or tiny_llama(), pc)


def test_world_size_check_and_bad_values():
    pc = ParallelConfig(2, 2, 2)
    pc.check_world_size(8)
    with pytest.raises(LayoutError, match="= 8, but the world size is 4"):
        pc.check_world_size(4)
    with pytest.raises(LayoutError, match="data_parallel must be a positive integer"):
        ParallelConfig(data_parallel=0)
    assert ParallelConfig.from_json(pc.to_json()) == pc
