"""`balanced_load` without msrun: when it is in force, and the byte carrier of the exchange —
three bytes per float32 integer, so a float sum with zeros gives back every byte (the CPU
AllReduce takes float16/float32 only). The exchange itself runs in
test_balanced_load_msrun.py."""
import logging
import os

import numpy as np
import pytest

from mindformers_st.checkpoint.loader import LoadOptions, balanced_load
from mindformers_st.config import load_config
from mindformers_st.layout.parallel_config import ParallelConfig
from mindformers_st.parallel.comm import (bytes_to_floats, floats_to_bytes, gather_bytes,
                                          share_bytes)
from mindformers_st.parallel.context import ParallelContext

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY_YAML = os.path.join(ROOT, "configs", "llama2", "pretrain_llama2_tiny.yaml")


@pytest.mark.parametrize("size", [0, 1, 2, 3, 4, 5, 1000, 4099])
def test_bytes_survive_a_float32_sum_with_zeros(size):
    raw = np.random.default_rng(size).integers(0, 256, size, dtype=np.uint8)
    floats = bytes_to_floats(raw)
    assert floats.dtype == np.float32 and floats.size == -(-size // 3)
    assert np.all(floats == np.floor(floats)) and (floats.size == 0 or floats.max() < 2 ** 24)
    total = floats + np.zeros_like(floats) + np.zeros_like(floats)   # what the other ranks add
    assert floats_to_bytes(total, size).tobytes() == raw.tobytes()


def test_negative_zero_nan_payloads_and_subnormals_keep_their_bits():
    bits = np.array([0x80000000, 0x7FC01234, 0xFF800001, 0x00000001, 0x7F7FFFFF], "<u4")
    raw = bits.view(np.uint8)
    # carried as floats directly, -0.0 + 0.0 would give +0.0: the byte carrier keeps it
    assert (np.float32(-0.0) + np.float32(0.0)).tobytes() != raw[:4].tobytes()
    back = floats_to_bytes(bytes_to_floats(raw) + np.float32(0), raw.size)
    assert back.view("<u4").tolist() == bits.tolist()


def test_a_sum_that_is_not_one_ranks_bytes_is_refused():
    with pytest.raises(ValueError, match="altered"):
        floats_to_bytes(np.array([2.0 ** 24 + 2], np.float32), 3)
    with pytest.raises(ValueError, match="altered"):
        floats_to_bytes(np.array([1.5], np.float32), 3)


def test_share_bytes_without_a_group_is_a_copy():
    raw = np.arange(7, dtype=np.uint8)
    out = share_bytes(raw, None)
    assert out.tobytes() == raw.tobytes() and out is not raw


def test_gather_bytes_refuses_a_width_that_is_not_whole_words_or_too_small():
    with pytest.raises(ValueError, match="multiple of 4"):
        gather_bytes(np.zeros(3, np.uint8), 6, "world")
    with pytest.raises(ValueError, match="do not fit"):
        gather_bytes(np.zeros(9, np.uint8), 8, "world")


def _ctx(world, group="world"):
    return ParallelContext(rank=0, world_size=world, config=ParallelConfig(data_parallel=world),
                           world_group=group, use_parallel=world > 1)


def test_balanced_load_is_on_by_default_when_the_ranks_span_several_machines(caplog):
    auto = LoadOptions("x", use_parallel=True)
    assert auto.balanced_load is None
    assert balanced_load(auto, _ctx(2), one_host=False)
    assert not balanced_load(auto, _ctx(2), one_host=True)   # one page cache reads once already
    assert balanced_load(LoadOptions("x", use_parallel=True, balanced_load=True), _ctx(2),
                         one_host=True)
    assert not balanced_load(auto, _ctx(2, group=None), one_host=False)   # no communication
    assert not balanced_load(auto, _ctx(1), one_host=False)
    assert not balanced_load(LoadOptions("x", use_parallel=True, balanced_load=False), _ctx(2),
                             one_host=False)
    with caplog.at_level(logging.WARNING):
        assert not balanced_load(LoadOptions("x", use_parallel=False, balanced_load=True), _ctx(1))
    assert "balanced_load: True has no effect" in caplog.text


@pytest.mark.parametrize("value, want", [(None, None), ("False", False), ("True", True)])
def test_the_yaml_key_reaches_the_load_options(value, want):
    overrides = [("load_checkpoint", "/nowhere"), ("use_parallel", True)]
    if value is not None:
        overrides.append(("balanced_load", value))
    assert LoadOptions.from_config(load_config(TINY_YAML, overrides)).balanced_load is want


def test_one_rank_is_on_one_host():
    from mindformers_st.parallel.agree import host_identity, on_one_host
    assert on_one_host(None) and on_one_host(_ctx(1)) and host_identity().count("/") >= 1
