"""remove_redundancy owners: each distinct slice written once, by a holder, balanced by bytes."""
from types import SimpleNamespace

import numpy as np
from hypothesis import given, settings, strategies as st

from mindformers_st.layout.owners import assign_owners, bytes_per_rank, owned_by
from mindformers_st.layout.param_table import ParamSpec, ParamTable
from mindformers_st.layout.parallel_config import ParallelConfig, plan_layouts
from mindformers_st.models.param_table import llama_param_table

LLAMA2_7B = SimpleNamespace(vocab_size=32000, hidden_size=4096, num_layers=32, num_heads=32,
                            n_kv_heads=None, intermediate_size=11008, qkv_has_bias=False,
                            tie_word_embeddings=False, param_init_type="bfloat16")


def _balance(table, pc):
    layouts = plan_layouts(table, pc)
    dtypes = {p.name: p.dtype for p in table}
    owners = assign_owners(layouts, dtypes)
    load = bytes_per_rank(owners, dtypes)
    assert set(load) == set(range(pc.world_size))
    assert sum(load.values()) == table.total_bytes  # every byte once (no opt shard, mp=1)
    return max(load.values()) / min(load.values())


def test_llama2_7b_dp8_is_balanced_within_20_percent():
    table = llama_param_table(LLAMA2_7B)
    assert _balance(table, ParallelConfig(data_parallel=8)) <= 1.2


def test_llama2_7b_dp8_with_optimizer_states_is_balanced():
    table = llama_param_table(LLAMA2_7B).with_optimizer_states()
    assert _balance(table, ParallelConfig(data_parallel=8)) <= 1.2


def test_owners_are_deterministic_and_owned_by_lists_a_ranks_share():
    table = ParamTable((ParamSpec("a", (4, 4), split_dim=0), ParamSpec("b", (4,))), 1)
    layouts = plan_layouts(table, ParallelConfig(2, 2))
    dtypes = {"a": "F32", "b": "F16"}
    owners = assign_owners(layouts, dtypes)
    assert owners == assign_owners(dict(reversed(list(layouts.items()))), dtypes)
    shares = [owned_by(owners, r) for r in range(4)]
    assert sum(len(s) for s in shares) == 3   # a: two mp halves, b: one whole
    for (name, block), rank in owners.items():
        assert layouts[name].slice_for(rank) == block


@st.composite
def configs_and_tables(draw):
    dp, mp, pp = (draw(st.integers(1, 3)) for _ in range(3))
    pc = ParallelConfig(dp, mp, pp, optimizer_shard=draw(st.booleans()),
                        vocab_emb_dp=draw(st.booleans()))
    num_layers = pp * draw(st.integers(1, 2))
    params = []
    for i in range(draw(st.integers(1, 5))):
        ndim = draw(st.integers(0, 3))
        split_dim = draw(st.none() | st.integers(0, max(ndim - 1, 0))) if ndim else None
        # sizes: a small factor, times mp on the split dim, sometimes times dp on dim 0
        shape = [draw(st.integers(1, 3)) for _ in range(ndim)]
        if split_dim is not None:
            shape[split_dim] *= mp
        if ndim and draw(st.booleans()):
            shape[0] *= dp * mp
        params.append(ParamSpec(f"p{i}", tuple(shape), draw(st.sampled_from(["F32", "BF16"])),
                                split_dim=split_dim, vocab_parallel=draw(st.booleans()),
                                layer=draw(st.integers(-1, num_layers))))
    return pc, ParamTable(tuple(params), num_layers)


@settings(max_examples=60, deadline=None)
@given(configs_and_tables())
def test_each_slice_owned_once_by_a_holder_and_tensors_covered_exactly(case):
    pc, table = case
    layouts = plan_layouts(table, pc)
    owners = assign_owners(layouts, {p.name: p.dtype for p in table})
    per_tensor = {p.name: np.zeros(p.shape, dtype=int) for p in table}
    for (name, block), rank in owners.items():
        assert rank in layouts[name].distinct_slices()[block]
        assert layouts[name].slice_for(rank) == block
        per_tensor[name][block.index()] += 1
    for p in table:
        assert (per_tensor[p.name] == 1).all(), p.name
        assert per_tensor[p.name].sum() == p.numel
    seen = [key for r in range(pc.world_size) for key in owned_by(owners, r).items()]
    assert len(seen) == len(owners) == len(set(seen))
