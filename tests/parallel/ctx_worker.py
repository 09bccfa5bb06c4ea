"""Worker for test_context: init_parallel under msrun with 4 ranks (dp2 x mp2), checks groups.

Writes OUT/rank_<r>.json with what each rank saw: a wrong dp*mp error, its coordinates, sums
over its dp and mp groups, a gathered vocab shard, and f/g gradients."""
import json
import os
import sys

import numpy as np
import mindspore as ms
from mindspore import Tensor, nn

from mindformers_st.errors import LayoutError
from mindformers_st.layout.parallel_config import ParallelConfig
from mindformers_st.parallel.comm import (CopyToModelParallel, ReduceFromModelParallel,
                                          all_reduce_sum, gather_last_dim)
from mindformers_st.parallel.context import init_parallel


def main(out):
    rec = {}
    try:
        init_parallel(ParallelConfig(data_parallel=3), True, "CPU")
        rec["mismatch_error"] = None
    except LayoutError as e:
        rec["mismatch_error"] = str(e)
    ctx = init_parallel(ParallelConfig(data_parallel=2, model_parallel=2), True, "CPU", seed=1)
    r = ctx.rank
    rec.update(rank=r, world=ctx.world_size, dp_rank=ctx.dp_rank, mp_rank=ctx.mp_rank,
               is_main=ctx.is_main, dp_group=ctx.dp_group, mp_group=ctx.mp_group)
    x = Tensor(np.array([float(r + 1)], np.float32))
    rec["dp_sum"] = float(all_reduce_sum(x, ctx.dp_group).asnumpy()[0])
    rec["mp_sum"] = float(all_reduce_sum(x, ctx.mp_group).asnumpy()[0])
    shard = Tensor(np.full((1, 3), float(10 * ctx.dp_rank + ctx.mp_rank), np.float32))
    rec["gathered"] = gather_last_dim(shard, ctx.mp_group, ctx.mp_rank, 2).asnumpy().tolist()
    rec["batch"] = ctx.local_batch(list(range(8)))

    class Pair(nn.Cell):        # y = g(f(x) * w_r): d/dx = sum_r w_r, d/dw_r = x
        def __init__(self):
            super().__init__()
            self.f, self.g = CopyToModelParallel(ctx.mp_group), ReduceFromModelParallel(ctx.mp_group)

        def construct(self, x, w):
            return self.g(self.f(x) * w).sum()

    w = Tensor(np.array([float(ctx.mp_rank + 2)], np.float32))
    gx, gw = ms.grad(Pair(), (0, 1))(Tensor(np.array([3.0], np.float32)), w)
    rec["grad_x"], rec["grad_w"] = float(gx.asnumpy()[0]), float(gw.asnumpy()[0])
    ctx.barrier()
    with open(os.path.join(out, f"rank_{r}.json"), "w") as f:
        json.dump(rec, f)


if __name__ == "__main__":
    main(sys.argv[1])
