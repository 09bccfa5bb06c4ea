"""init_parallel: one card without communication; under msrun, dp/mp groups and collectives."""
import json
import os
import sys

import pytest

from mindformers_st.errors import ConfigError
from mindformers_st.layout.parallel_config import ParallelConfig
from mindformers_st.parallel.context import init_parallel

HERE = os.path.dirname(os.path.abspath(__file__))


def test_single_card_has_no_groups_and_ignores_parallel_config(caplog):
    ctx = init_parallel(ParallelConfig(data_parallel=2, model_parallel=4, vocab_emb_dp=False),
                        use_parallel=False, device_target="CPU", seed=5)
    assert (ctx.rank, ctx.world_size, ctx.dp_group, ctx.mp_group) == (0, 1, None, None)
    assert ctx.config == ParallelConfig(vocab_emb_dp=False)
    assert ctx.is_main and ctx.dp_rank == 0 and ctx.mp_rank == 0
    assert "ignoring parallel_config" in caplog.text
    ctx.barrier()
    assert ctx.local_batch([1, 2, 3]) == [1, 2, 3]


def test_device_target_must_be_a_name():
    with pytest.raises(ConfigError, match="device_target"):
        init_parallel(ParallelConfig(), False, "")


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_groups_and_collectives_under_msrun(tmp_path):
    sys.path.insert(0, os.path.join(HERE, "..", "models"))
    from msrun_util import run_msrun
    rc, logs = run_msrun(os.path.join(HERE, "ctx_worker.py"), [tmp_path], 4, tmp_path / "logs",
                         timeout=400)
    assert rc == 0, logs
    recs = []
    for r in range(4):
        with open(tmp_path / f"rank_{r}.json") as f:
            recs.append(json.load(f))
    for r, rec in enumerate(recs):
        assert "x model_parallel(1) x pipeline_stage(1) = 3" in rec["mismatch_error"]
        assert (rec["rank"], rec["world"]) == (r, 4)
        assert (rec["dp_rank"], rec["mp_rank"]) == (r // 2, r % 2)   # MindSpore rank order
        assert rec["is_main"] == (r == 0)
        # dp group = same mp index, mp group = same dp index
        assert rec["dp_sum"] == sum(q + 1 for q in range(4) if q % 2 == r % 2)
        assert rec["mp_sum"] == sum(q + 1 for q in range(4) if q // 2 == r // 2)
        dp = r // 2
        assert rec["gathered"] == [[10 * dp] * 3 + [10 * dp + 1] * 3]
        assert rec["batch"] == list(range(4 * dp, 4 * dp + 4))
        assert rec["grad_x"] == 2.0 + 3.0          # f's backward sums over mp
        assert rec["grad_w"] == 3.0                # g's backward is the identity
