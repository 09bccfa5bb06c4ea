"""msrun worker for test_balanced_load_msrun: every case of CASES.json loaded on this rank of a
dp2 job twice, `balanced_load` off then on; the parameters (and, resuming, the optimizer state)
go to OUT/<case>_<on|off>_rank<r>.npz, and what the load did (mode, bytes read by the engine,
the exchange's account, /proc/self/io read_bytes, or the error) to OUT/rank_<r>.json."""
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)
TINY_YAML = os.path.join(ROOT, "configs", "llama2", "pretrain_llama2_tiny.yaml")

import numpy as np  # noqa: E402

from mindformers_st.checkpoint import exchange  # noqa: E402
from mindformers_st.checkpoint.loader import (LoadOptions, balanced_load,  # noqa: E402
                                              load_checkpoint)
from mindformers_st.checkpoint.derived import wait_background_builds  # noqa: E402
from mindformers_st.config import load_config  # noqa: E402
from mindformers_st.errors import MindformersSTError  # noqa: E402
from mindformers_st.layout.parallel_config import ParallelConfig  # noqa: E402
from mindformers_st.parallel.context import init_parallel  # noqa: E402
from tests.checkpoint.test_loader import make_model, make_optimizer, tiny_cfg  # noqa: E402


def io_read_bytes() -> int:
    """Bytes this process caused to be read from storage (not the page cache)."""
    with open("/proc/self/io") as fh:
        for line in fh:
            if line.startswith("read_bytes:"):
                return int(line.split()[1])
    return -1


def main(out):
    ctx = init_parallel(ParallelConfig(data_parallel=2), True, "CPU", seed=0)
    cfg = tiny_cfg()
    with open(os.path.join(out, "cases.json")) as fh:
        cases = json.load(fh)
    rec = {}
    for case in cases:
        for balanced in (False, True):
            key = f"{case['name']}_{'on' if balanced else 'off'}"
            model = make_model(cfg, ctx)
            opt = make_optimizer(model) if case["resume"] else None
            # the YAML keys as a run sets them (balanced_load: True / False)
            config = load_config(TINY_YAML, [
                ("load_checkpoint", case["path"]), ("load_ckpt_format", "safetensors"),
                ("use_parallel", True), ("auto_trans_ckpt", case["auto_trans_ckpt"]),
                ("direct_reshard", case["direct_reshard"]), ("balanced_load", balanced),
                ("output_dir", os.path.join(out, "output", key))])
            opts = LoadOptions.from_config(config)
            # the whole job is one dp group here: its streams go through AllGather; the
            # "direct" case forces the AllReduce every sub-group uses
            exchange.WORLD_GATHER = case["name"] != "direct"
            before = io_read_bytes()
            try:
                report = load_checkpoint(opts, model, opt, ctx, resume=case["resume"])
            except MindformersSTError as exc:
                rec[key] = {"error": f"{type(exc).__name__}: {exc}"}
                continue
            arrays = {n: np.asarray(v) for n, v in model.get_local_params().items()}
            if opt is not None:
                arrays.update(opt.get_state_arrays())
            np.savez(os.path.join(out, f"{key}_rank{ctx.rank}.npz"), **arrays)
            rec[key] = {"mode": report.mode, "read_bytes": report.read_bytes,
                        "exchange": report.exchange, "io_read_bytes": io_read_bytes() - before,
                        "background": report.background}
    # the default (balanced_load unset): both ranks share this machine, so they read alone
    config = load_config(TINY_YAML, [("load_checkpoint", cases[0]["path"]), ("use_parallel", True)])
    rec["default_on_one_host"] = balanced_load(LoadOptions.from_config(config), ctx)
    wait_background_builds(announce=False)   # ms_safetensors of the HF case, as a run does
    ctx.barrier()
    with open(os.path.join(out, f"rank_{ctx.rank}.json"), "w") as fh:
        json.dump(rec, fh)


if __name__ == "__main__":
    main(sys.argv[1])
