"""Train, finetune or predict with a MindSpore Transformers-style YAML config.

    python run_mindformer.py --config configs/llama2/pretrain_llama2_tiny.yaml \
        --train_dataset_dir data/wiki.mindrecord --run_mode train
    bash scripts/msrun_launcher.sh "run_mindformer.py --config ... --use_parallel True" 2

Flags are MindSpore Transformers' (see docs/runtime.md); any `--a.b.c value` overrides that
YAML key. Exit code 0 on success (also after a graceful exit, see docs/runtime.md), 1 on a
configuration, checkpoint or file-system error, 143 on SIGTERM, 130 on SIGINT: always one
`error:` line on stderr naming the key or path.
"""
from __future__ import annotations

import importlib.util
import logging
import os
import sys
from typing import List, Optional

ROOT = os.path.dirname(os.path.abspath(__file__))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from mindformers_st.errors import ConfigError  # noqa: E402

logger = logging.getLogger("run_mindformer")


def import_register_path(path: str) -> None:
    """Import the package at `path` (its __init__.py), so the models it registers can be named
    in the YAML. Its parent folder goes on sys.path, as MindSpore Transformers does."""
    folder = os.path.abspath(path)
    init = os.path.join(folder, "__init__.py")
    if not os.path.isfile(init):
        raise ConfigError(f"--register_path {path!r} must be a folder with an __init__.py that "
                          f"registers models (e.g. research/qwen2)")
    parent, name = os.path.dirname(folder), os.path.basename(folder)
    if parent not in sys.path:
        sys.path.insert(0, parent)
    spec = importlib.util.spec_from_file_location(name, init, submodule_search_locations=[folder])
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    logger.info("registered models from %s", folder)


def _rank_from_env() -> int:
    return int(os.environ.get("RANK_ID", os.environ.get("MS_NODE_ID", "0")) or 0)


def main(argv: Optional[List[str]] = None) -> int:
    """Run the job described by argv; returns the process exit code."""
    from mindformers_st.cli import run_reporting
    from mindformers_st.config import load_config, parse_run_args

    rank = _rank_from_env()
    logging.basicConfig(level=logging.INFO,
                        format=f"%(asctime)s [rank {rank}] %(levelname)s %(name)s: %(message)s")

    def job() -> int:
        args = parse_run_args(sys.argv[1:] if argv is None else argv)
        if args.register_path:
            import_register_path(args.register_path)
        cfg = load_config(args.config, args.overrides)
        return run(cfg, rank)

    # One error line per failure, as the offline tools report them (mindformers_st/cli.py).
    return run_reporting("run_mindformer", job,
                         "saves committed before stay valid (use_graceful_exit: True saves the "
                         "current step first)")


def run(cfg, rank: int = 0) -> int:
    """Plan, then train/finetune/predict (or only write strategy files) per `cfg`."""
    from mindformers_st.trainer.resolve import (describe_plan, parallel_config_of, plural,
                                               resolve_model, write_strategy)

    if os.path.exists(cfg.output_dir) and not os.path.isdir(cfg.output_dir):
        raise ConfigError(f"config key 'output_dir' (--output_dir): {cfg.output_dir} is a file, "
                          f"not a folder; name a folder (it is created when absent)")
    resolved = resolve_model(cfg)
    if cfg.only_save_strategy:
        if rank == 0:
            print(describe_plan(cfg, resolved), flush=True)
            paths = write_strategy(cfg, resolved)
            print(f"only_save_strategy: wrote {plural(len(paths), 'strategy file')} to "
                  f"{os.path.dirname(paths[0])}", flush=True)
        return 0
    if rank == 0:
        print(describe_plan(cfg, resolved), flush=True)

    from mindformers_st.parallel.context import init_parallel

    ctx = init_parallel(parallel_config_of(cfg), cfg.use_parallel, cfg.context.device_target,
                        cfg.seed)
    if cfg.run_mode in ("train", "finetune"):
        from mindformers_st.trainer.train import run_train
        run_train(cfg, resolved, ctx)
    else:
        from mindformers_st.trainer.predict import run_predict
        run_predict(cfg, resolved, ctx)
    # the folders the load hook promised (ms_safetensors, unified_checkpoint) are there on exit
    from mindformers_st.checkpoint.derived import wait_background_builds
    wait_background_builds()
    return 0


if __name__ == "__main__":
    sys.exit(main())
