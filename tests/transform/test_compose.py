"""Reading a conversion plan's output before it is written (transform/compose.py): each rank's
blocks read straight from the Hugging Face files equal those cut from the written folder."""
import numpy as np
import pytest

from mindformers_st.convert import convert_hf_folder, plan_hf_folder
from mindformers_st.errors import PlanError
from mindformers_st.layout.slices import TensorSlice
from mindformers_st.layout.tensor_layout import TensorLayout
from mindformers_st.transform.compose import (plan_planned_slices, planned_source, restrict)
from mindformers_st.transform.execute import execute_to_memory
from mindformers_st.transform.plan import CopyOp, TargetTensor
from mindformers_st.transform.planner import plan_rank_slices
from mindformers_st.transform.sources import describe_complete

from ..convert.helpers import BF16, hf_config, hf_tensors, write_hf_folder


def test_restrict_cuts_each_copy_to_the_block_in_local_coordinates():
    # a 4x6 tensor filled by two row copies from different sources
    t = TargetTensor("w", "F32", (4, 6), (CopyOp("a", "x", (0, 0), (0, 0), (2, 6)),
                                         CopyOp("b", "y", (5, 1), (2, 0), (2, 6))))
    got = restrict(t, TensorSlice((4, 6), (1, 3), (3, 2)))
    assert got.shape == (3, 2) and got.global_slice == TensorSlice((4, 6), (1, 3), (3, 2))
    assert got.ops == (CopyOp("a", "x", (1, 3), (0, 0), (1, 2)),
                       CopyOp("b", "y", (5, 4), (1, 0), (2, 2)))
    assert restrict(t, TensorSlice((4, 6), (0, 0), (2, 6))).ops == (t.ops[0],)
    with pytest.raises(PlanError, match="block of a"):
        restrict(t, TensorSlice((4, 7), (0, 0), (4, 7)))


def _mp2(shape, dim):
    tm = [-1] * len(shape)
    if dim is not None:
        tm[dim] = 0
    return TensorLayout(tuple(shape), (2,), tuple(tm))


@pytest.mark.parametrize("fused,dtype", [(False, np.float32), (True, BF16)])
def test_rank_blocks_read_through_the_plan_equal_blocks_of_the_written_folder(tmp_path, fused,
                                                                              dtype):
    cfg = hf_config("qwen2", heads=4, kv_heads=2, dtype="bfloat16" if dtype is BF16 else "float32")
    tensors = hf_tensors(heads=4, kv_heads=2, bias=True, dtype=dtype)
    hf = write_hf_folder(str(tmp_path / "hf"), tensors, shards=3, config=cfg)
    plan = plan_hf_folder(hf, qkv_concat=fused).plan
    virtual = planned_source(plan, str(tmp_path / "ms"))
    convert_hf_folder(hf, str(tmp_path / "ms"), qkv_concat=fused, progress=False)
    written = describe_complete(str(tmp_path / "ms"))
    assert virtual.global_shapes == written.global_shapes and virtual.dtypes == written.dtypes
    # every matrix cut by rows on one rank pair, by columns on another, vectors whole
    layouts = {n: _mp2(s, (0 if i % 2 else 1) if len(s) == 2 else None)
               for i, (n, s) in enumerate(written.global_shapes.items())}
    for rank in (0, 1):
        direct = execute_to_memory(plan_planned_slices(plan, layouts, rank, hf))
        cut = execute_to_memory(plan_rank_slices(written, layouts, rank, include_hyper=False))
        assert set(direct) == set(cut) == set(layouts)
        for n in cut:
            assert direct[n].dtype == cut[n].dtype and direct[n].shape == cut[n].shape, n
            assert direct[n].tobytes() == cut[n].tobytes(), n


def test_a_tensor_the_plan_does_not_make_or_a_wrong_shape_is_a_plan_error(tmp_path):
    hf = write_hf_folder(str(tmp_path / "hf"), hf_tensors(), shards=1,
                         config=hf_config("llama", heads=4, kv_heads=2))
    plan = plan_hf_folder(hf).plan
    with pytest.raises(PlanError, match="in no source file"):
        plan_planned_slices(plan, {"model.nope.weight": _mp2((4, 4), 0)}, 0, hf)
    with pytest.raises(PlanError, match="global shape"):
        plan_planned_slices(plan, {"model.norm_out.weight": _mp2((99,), None)}, 0, hf)
