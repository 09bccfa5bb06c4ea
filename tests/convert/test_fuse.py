"""Fused layouts against MindSpore Transformers' reshape-and-concat definitions."""
import numpy as np
import pytest

from mindformers_st.convert.fuse import (check_cover, ffn_blocks, fuse_rows, qkv_blocks,
                                         split_rows)
from mindformers_st.errors import ConversionError


def mindformers_qkv_hf2mg(q, k, v, num_heads, n_kv_heads):
    """The layout of mindformers/utils/convert_utils.py::qkv_concat_hf2mg, restated:
    reshape each of q, k, v to [n_kv_heads, rows per group, cols] and concatenate on axis 1."""
    cols = q.shape[1:] or (1,)
    qr = q.reshape((n_kv_heads, -1) + tuple(cols))
    kr = k.reshape((n_kv_heads, -1) + tuple(cols))
    vr = v.reshape((n_kv_heads, -1) + tuple(cols))
    out = np.concatenate([qr, kr, vr], axis=1)
    return out.reshape((q.shape[0] + k.shape[0] + v.shape[0],) + q.shape[1:])


def mindformers_ffn_hf2mg(w1, w3):
    """ffn_concat_hf2mg: [inter, 1, h] of gate and of up, concatenated on axis 1."""
    inter = w1.shape[0]
    out = np.concatenate([w1.reshape(inter, 1, -1), w3.reshape(inter, 1, -1)], axis=1)
    return out.reshape(2 * inter, -1)


@pytest.mark.parametrize("heads,kv,hd", [(4, 4, 2), (4, 2, 3), (8, 1, 2), (6, 3, 4)])
@pytest.mark.parametrize("bias", [False, True])
def test_qkv_blocks_match_mindformers_layout(heads, kv, hd, bias):
    rng = np.random.default_rng(heads * 10 + kv)
    cols = () if bias else (5,)
    q = rng.standard_normal((heads * hd,) + cols)
    k = rng.standard_normal((kv * hd,) + cols)
    v = rng.standard_normal((kv * hd,) + cols)
    blocks = qkv_blocks(heads, kv, hd)
    assert len(blocks) == 3 * kv
    fused = fuse_rows([q, k, v], blocks)
    np.testing.assert_array_equal(fused, mindformers_qkv_hf2mg(q, k, v, heads, kv))
    parts = split_rows(fused, [q.shape[0], k.shape[0], v.shape[0]], blocks)
    for a, b in zip(parts, (q, k, v)):
        np.testing.assert_array_equal(a, b)


def test_qkv_group_order_is_q_heads_then_k_then_v_per_group():
    # heads=4, kv=2, head_dim=1: rows are q0 q1 k0 v0 q2 q3 k1 v1
    q, k, v = np.array([[0], [1], [2], [3]]), np.array([[10], [11]]), np.array([[20], [21]])
    fused = fuse_rows([q, k, v], qkv_blocks(4, 2, 1))
    assert fused[:, 0].tolist() == [0, 1, 10, 20, 2, 3, 11, 21]


@pytest.mark.parametrize("inter", [1, 3, 8])
def test_ffn_blocks_interleave_rows_like_mindformers(inter):
    rng = np.random.default_rng(inter)
    w1, w3 = rng.standard_normal((inter, 4)), rng.standard_normal((inter, 4))
    fused = fuse_rows([w1, w3], ffn_blocks(inter))
    np.testing.assert_array_equal(fused, mindformers_ffn_hf2mg(w1, w3))
    np.testing.assert_array_equal(fused[0::2], w1)
    back = split_rows(fused, [inter, inter], ffn_blocks(inter))
    np.testing.assert_array_equal(back[1], w3)


def test_bad_head_counts_are_refused():
    with pytest.raises(ConversionError, match="divisible"):
        qkv_blocks(6, 4, 2)
    with pytest.raises(ConversionError, match="exactly once"):
        check_cover(qkv_blocks(4, 2, 2), [8, 4, 2])
