"""Our layouts and strategy files against MindSpore's own tools (run in subprocesses).

Rank files cut by our layouts and described by our strategy files must be merged by
`mindspore.unified_safetensors` into exactly the original arrays; MindSpore's strategy readers
and `get_parameter_redundancy` must agree with what our layouts compute. MindSpore runs in a
child process with a timeout: unified_safetensors can hang (it waits while system memory is
above 50 %) and it resets CPU affinity.
"""
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from mindformers_st.layout.owners import assign_owners, owned_by
from mindformers_st.layout.param_table import ParamSpec, ParamTable
from mindformers_st.layout.parallel_config import ParallelConfig, plan_layouts
from mindformers_st.layout.strategy import (read_strategy, write_rank_strategy_files)
from mindformers_st.layout.tensor_layout import layouts_equivalent
from mindformers_st.storage.reader import open_safetensors
from mindformers_st.storage.writer import save_tensors

pytestmark = pytest.mark.slow

TABLE = ParamTable((
    ParamSpec("model.tok_embeddings.embedding_weight", (16, 8), split_dim=0, vocab_parallel=True,
              layer=-1),
    ParamSpec("model.layers.0.attention.wq.weight", (8, 8), split_dim=0, layer=0),
    ParamSpec("model.layers.0.attention.wo.weight", (8, 8), split_dim=1, layer=0),
    ParamSpec("model.layers.0.attention_norm.weight", (8,), layer=0),
    ParamSpec("model.layers.1.feed_forward.w1.weight", (12, 8), split_dim=0, layer=1),
    ParamSpec("model.layers.1.feed_forward.w2.weight", (8, 12), split_dim=1, layer=1),
    ParamSpec("model.norm_out.weight", (8,), layer=2),
    ParamSpec("lm_head.weight", (16, 8), split_dim=0, vocab_parallel=True, layer=2),
), 2)


# MindSpore's unified_safetensors sleeps after each part while the WHOLE machine's memory use
# is above 50 % (shared/reference/mindspore-builtin.md, B2), so on a busy machine it never
# returns although its output is written. These merges take a few MiB: the child reports the
# machine's memory use as this job's own share, so the throttle sees what the merge itself uses.
_OWN_MEMORY_ONLY = """
import os, psutil
_real = psutil.virtual_memory
def _own_share():
    m = _real()
    rss = psutil.Process(os.getpid()).memory_info().rss
    return m._replace(percent=100.0 * rss / m.total)
psutil.virtual_memory = _own_share
"""


def run_mindspore(code: str, timeout: int = 180) -> str:
    """Run `code` in a fresh interpreter that imports mindspore; return its stdout."""
    proc = subprocess.run([sys.executable, "-c", _OWN_MEMORY_ONLY + textwrap.dedent(code)],
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def originals(table):
    rng = np.random.default_rng(0)
    return {p.name: rng.standard_normal(p.shape).astype(np.float32) for p in table}


def write_rank_files(root, layouts, arrays, world, owners=None):
    for rank in range(world):
        names = (owned_by(owners, rank) if owners is not None else
                 {n: l.slice_for(rank) for n, l in layouts.items() if rank in l.ranks()})
        tensors = {n: arrays[n][block.index()] for n, block in names.items()}
        if rank == 0:
            tensors["global_step"] = np.array([7], dtype=np.int64)
        meta = {"format": "ms", "remove_redundancy": str(owners is not None)}
        os.makedirs(f"{root}/src/rank_{rank}", exist_ok=True)
        save_tensors(f"{root}/src/rank_{rank}/net_rank_{rank}.safetensors", tensors, meta)


def unify_and_compare(root, strategy, arrays):
    run_mindspore(f"""
        import mindspore as ms
        ms.unified_safetensors({root + '/src'!r}, {strategy!r}, {root + '/merged'!r},
                               max_process_num=1)
        """)
    name_map = json.load(open(f"{root}/merged/param_name_map.json"))["weight_map"]
    for name, want in arrays.items():
        with open_safetensors(f"{root}/merged/{name_map[name]}") as f:
            np.testing.assert_array_equal(f.read(name), want, err_msg=name)


@pytest.mark.parametrize("dedup", [False, True])
def test_unified_safetensors_merges_our_dp2_mp2_optimizer_shard_slices(tmp_path, dedup):
    pc = ParallelConfig(2, 2, optimizer_shard=True, vocab_emb_dp=False)
    layouts = plan_layouts(TABLE, pc)
    assert layouts["model.layers.0.attention.wo.weight"].opt_shard_count == 2
    arrays = originals(TABLE)
    owners = assign_owners(layouts, {p.name: p.dtype for p in TABLE}) if dedup else None
    write_rank_files(tmp_path, layouts, arrays, pc.world_size, owners)
    write_rank_strategy_files(tmp_path / "strategy", layouts, pc)
    unify_and_compare(str(tmp_path), str(tmp_path / "strategy" / "ckpt_strategy_rank_0.ckpt"),
                      arrays)


def test_unified_safetensors_merges_pp2_mp2_after_merge_pipeline_strategys(tmp_path):
    pc = ParallelConfig(data_parallel=2, model_parallel=2, pipeline_stage=2,
                        optimizer_shard=True)
    layouts = plan_layouts(TABLE, pc)
    assert layouts["lm_head.weight"].stage == 1
    arrays = originals(TABLE)
    write_rank_files(tmp_path, layouts, arrays, pc.world_size)
    write_rank_strategy_files(tmp_path / "strategy", layouts, pc)
    merged = str(tmp_path / "merged_strategy.ckpt")
    run_mindspore(f"""
        import mindspore as ms
        ms.merge_pipeline_strategys({str(tmp_path / 'strategy')!r}, {merged!r})
        """)
    # the file MindSpore wrote parses into exactly our layouts
    shapes = {p.name: p.shape for p in TABLE}
    assert read_strategy(merged, global_shapes=shapes) == layouts
    unify_and_compare(str(tmp_path), merged, arrays)


def test_mindspore_readers_agree_with_our_layouts(tmp_path):
    pc = ParallelConfig(2, 2, optimizer_shard=True)
    layouts = plan_layouts(TABLE, pc)
    paths = write_rank_strategy_files(tmp_path, layouts, pc)
    json_path = str(tmp_path / "strategy.json")
    from mindformers_st.layout.strategy import write_strategy_file
    write_strategy_file(json_path, layouts)
    out = run_mindspore(f"""
        import json
        import mindspore as ms
        from mindspore.train._utils import get_parameter_redundancy
        res = {{}}
        for key, path in (("pb", {paths[0]!r}), ("json", {json_path!r})):
            s = ms.build_searched_strategy(path)
            res[key] = {{n: [list(l.dev_matrix[0].dim), list(l.tensor_map[0].dim),
                            l.opt_weight_shard_step, l.opt_weight_shard_size] for n, l in s.items()}}
        red = get_parameter_redundancy({paths[0]!r}, initial_rank=0)
        res["redundancy"] = {{n: [list(g) for g in groups] for n, groups in red.items()}}
        print(json.dumps(res))
        """)
    res = json.loads(out.strip().splitlines()[-1])
    for name, lay in layouts.items():
        fields = [list(lay.dev_matrix), list(lay.tensor_map), lay.opt_weight_shard_step,
                  lay.opt_weight_shard_size]
        assert res["pb"][name] == fields and res["json"][name] == fields
        ours = sorted(sorted(g) for g in lay.distinct_slices().values())
        assert sorted(sorted(g) for g in res["redundancy"][name]) == ours, name
    assert layouts_equivalent(layouts["model.norm_out.weight"],
                              read_strategy(json_path, local_shapes={"model.norm_out.weight": (2,)})
                              ["model.norm_out.weight"])
