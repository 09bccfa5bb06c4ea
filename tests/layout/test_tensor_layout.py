"""TensorLayout: MindSpore's dev_matrix / tensor_map / optimizer-shard semantics on tiny tensors."""
import numpy as np
import pytest

from mindformers_st.errors import LayoutError
from mindformers_st.layout.tensor_layout import TensorLayout, layouts_equivalent


def blocks(layout):
    """{rank: global array block} for an arange tensor, to compare against hand-cut numpy."""
    g = np.arange(int(np.prod(layout.global_shape))).reshape(layout.global_shape)
    return {r: g[layout.slice_for(r).index()] for r in layout.ranks()}, g


def test_tensor_map_value_counts_axes_from_the_right():
    # dev_matrix [dp=2, mp=4]: value 0 is the mp axis (last), value 1 the dp axis.
    lay = TensorLayout((8, 6), (2, 4), (0, -1))
    got, g = blocks(lay)
    for r in range(8):
        mp_idx = r % 4          # rank = dp_idx * mp + mp_idx
        np.testing.assert_array_equal(got[r], g[2 * mp_idx:2 * mp_idx + 2])
    lay1 = TensorLayout((8, 6), (2, 4), (1, -1))
    got1, _ = blocks(lay1)
    for r in range(8):
        np.testing.assert_array_equal(got1[r], g[4 * (r // 4):4 * (r // 4) + 4])


def test_two_dims_split_and_replica_groups():
    lay = TensorLayout((4, 6), (2, 3), (1, 0))
    got, g = blocks(lay)
    for r in range(6):
        dp, mp = divmod(r, 3)
        np.testing.assert_array_equal(got[r], g[2 * dp:2 * dp + 2, 2 * mp:2 * mp + 2])
        assert lay.replica_group(r) == (r,)
    rep = TensorLayout((4, 6), (2, 3), (-1, 0))
    assert rep.replica_group(4) == (1, 4)
    assert len(rep.distinct_slices()) == 3


def test_multi_axis_dim_first_axis_most_significant():
    # dim 0 split over (dp, mp) = 2*2 parts: part index = dp_idx * 2 + mp_idx
    lay = TensorLayout((8, 2), (2, 2), ((1, 0), -1))
    got, g = blocks(lay)
    for r in range(4):
        np.testing.assert_array_equal(got[r], g[2 * r:2 * r + 2])
    rev = TensorLayout((8, 2), (2, 2), ((0, 1), -1))
    got, g = blocks(rev)
    for r in range(4):
        dp, mp = divmod(r, 2)
        k = mp * 2 + dp
        np.testing.assert_array_equal(got[r], g[2 * k:2 * k + 2])


def test_optimizer_shard_splits_mp_slice_dim0_over_replicas():
    # w (8, 4) split on dim 1 over mp=2, opt shard over dp=2: dim 0 halves by dp_idx.
    lay = TensorLayout((8, 4), (2, 2), (-1, 0), opt_weight_shard_step=2, opt_weight_shard_size=2)
    got, g = blocks(lay)
    for r in range(4):
        dp, mp = divmod(r, 2)
        np.testing.assert_array_equal(got[r], g[4 * dp:4 * dp + 4, 2 * mp:2 * mp + 2])
    assert lay.replica_group(0) == (0,)
    # dim 0 split by mp first, then each mp chunk halves by dp
    lay0 = TensorLayout((8, 4), (2, 2), (0, -1), 2, 2)
    got, g = blocks(lay0)
    for r in range(4):
        dp, mp = divmod(r, 2)
        np.testing.assert_array_equal(got[r], g[4 * mp + 2 * dp:4 * mp + 2 * dp + 2])


def test_optimizer_shard_smaller_than_group_uses_replica_index_mod_size():
    # dp=4, opt size 2: replicas 0,2 hold part 0 and 1,3 part 1 (MindSpore's i::size groups).
    lay = TensorLayout((4, 2), (4, 1), (-1, 0), 1, 2)
    assert lay.replica_group(0) == (0, 2)
    assert lay.replica_group(1) == (1, 3)
    assert lay.slice_for(1).offsets == (2, 0)
    whole = TensorLayout((4, 2), (4, 1), (-1, 0), 1, -1)
    assert whole.opt_shard_count == 4 and whole.local_shape == (1, 2)
    assert layouts_equivalent(whole, TensorLayout((4, 2), (4, 1), (-1, 0), 1, 4))


def test_zero_step_or_size_means_no_optimizer_shard():
    assert TensorLayout((4,), (2,), (-1,), 0, 2).opt_shard_count == 1
    assert TensorLayout((4,), (2,), (-1,), 1, 0).opt_shard_count == 1


def test_pipeline_stage_offsets_ranks():
    lay = TensorLayout((4, 4), (2, 2), (0, -1), stage=1)
    assert list(lay.ranks()) == [4, 5, 6, 7]
    assert lay.slice_for(5).offsets == (2, 0)
    assert lay.replica_group(5) == (5, 7)
    with pytest.raises(LayoutError, match="rank 1 is not in pipeline stage 1"):
        lay.slice_for(1)


def test_scalar_is_whole_everywhere():
    lay = TensorLayout((), (2, 2), ())
    assert lay.slice_for(3).is_whole and lay.replica_group(0) == (0, 1, 2, 3)


@pytest.mark.parametrize("kwargs, message", [
    (dict(global_shape=(5, 4), dev_matrix=(2,), tensor_map=(0, -1)), "not divisible"),
    (dict(global_shape=(4, 4), dev_matrix=(2,), tensor_map=(1, -1)), "names no axis"),
    (dict(global_shape=(4, 4), dev_matrix=(2, 2), tensor_map=(0, 0)), "twice"),
    (dict(global_shape=(4,), dev_matrix=(2,), tensor_map=(0, -1)), "has 2 entries"),
    (dict(global_shape=(2, 4), dev_matrix=(4, 1), tensor_map=(-1, 0),
          opt_weight_shard_step=1, opt_weight_shard_size=4), "not divisible by the optimizer"),
    (dict(global_shape=(12, 4), dev_matrix=(4, 1), tensor_map=(-1, 0),
          opt_weight_shard_step=1, opt_weight_shard_size=3), "does not divide the replica"),
    (dict(global_shape=(12, 4), dev_matrix=(2, 3), tensor_map=(-1, -1),
          opt_weight_shard_step=1, opt_weight_shard_size=2), "cannot be laid over"),
    (dict(global_shape=(4,), dev_matrix=(0,), tensor_map=(-1,)), "positive"),
])
def test_impossible_layouts_raise_layout_error(kwargs, message):
    with pytest.raises(LayoutError, match=message):
        TensorLayout(**kwargs)


def test_layout_without_shape_completes_from_local_shape():
    lay = TensorLayout(None, (2, 2), (0, -1), 2, 2)
    with pytest.raises(LayoutError, match="no global shape"):
        lay.slice_for(0)
    full = lay.with_local_shape((3, 5))
    assert full.global_shape == (12, 5) and full.local_shape == (3, 5)
