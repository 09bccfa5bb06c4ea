"""A tiny real training run with CheckpointMonitor callbacks: helpers for tests, and a worker script.

As a script (under msrun or alone):
    python monitor_worker.py OUT_DIR --dp 2 --mp 1 --steps 4 --save-steps 2 \
        --monitor 'directory=ckpt_plain' --monitor 'directory=ckpt_dedup,remove_redundancy=1' ...
Each --monitor is a comma list of CheckpointMonitor options (format defaults to safetensors;
`directory` is relative to OUT_DIR). After training every rank writes its trained local slices
to OUT_DIR/truth/rank_{r}.npz (plain numpy, not through our code) so tests can rebuild the
global weights independently.
"""
import argparse
import json
import os
import sys

import numpy as np

TINY = dict(vocab_size=128, hidden_size=64, num_layers=2, num_heads=4, n_kv_heads=2,
            intermediate_size=96, seq_length=16)


class _Cfg:
    """The few run-config fields the monitor reads."""

    def __init__(self, output_dir, seed=0):
        self.output_dir, self.seed = output_dir, seed


def build_run(dp=1, mp=1, use_parallel=False, seed=0, model_kwargs=None):
    """(model, optimizer, train_step, ctx) for a tiny Llama, real MindSpore."""
    from mindformers_st.layout.parallel_config import ParallelConfig
    from mindformers_st.models.config import LlamaConfig
    from mindformers_st.models.llama import LlamaForCausalLM
    from mindformers_st.parallel.context import init_parallel
    from mindformers_st.trainer.lr import build_lr_schedule
    from mindformers_st.trainer.optim import build_optimizer
    from mindformers_st.trainer.step import TrainStep

    ctx = init_parallel(ParallelConfig(data_parallel=dp, model_parallel=mp), use_parallel, "CPU", seed)
    cfg = LlamaConfig.from_dict(dict(TINY, **(model_kwargs or {})))
    model = LlamaForCausalLM(cfg, ctx)
    lr = build_lr_schedule({"type": "ConstantWarmUpLR", "learning_rate": 1e-3, "warmup_steps": 0}, 100)
    opt = build_optimizer(model, {"type": "AdamW", "weight_decay": 0.01}, lr)
    return model, opt, TrainStep(model, opt, ctx), ctx


def train(model, opt, step, ctx, callbacks, steps, out_dir, steps_per_epoch=3, batch=4, seed=0):
    """Run `steps` optimizer steps on deterministic random tokens, calling the callbacks."""
    from mindformers_st.trainer.callbacks import TrainState, run_context_of

    cfg = model.cfg
    state = TrainState(config=_Cfg(out_dir, seed), model=model, optimizer=opt, ctx=ctx, train_step=step,
                       steps_per_epoch=steps_per_epoch, total_steps=steps, global_batch_size=batch)
    for cb in callbacks:
        cb.on_train_begin(run_context_of(state))
    rng = np.random.default_rng(seed)
    for i in range(steps):
        ids = rng.integers(1, cfg.vocab_size, size=(batch, cfg.seq_length + 1))
        loss = step(ctx.local_batch(ids))
        state.global_step += 1
        state.epoch, state.step_in_epoch = divmod(state.global_step - 1, steps_per_epoch)
        state.step_in_epoch += 1
        state.loss, state.lr, state.grad_norm = loss, step.last_lr, step.last_grad_norm
        state.losses.append(loss)
        for cb in callbacks:
            cb.on_train_step_end(run_context_of(state))
    for cb in callbacks:
        cb.on_train_end(run_context_of(state))
    return state


def dump_truth(model, opt, ctx, out_dir):
    """Every local slice (params and moments) with its global offsets, in plain numpy."""
    from mindformers_st.checkpoint.network import ModelState

    layouts = ModelState(model, opt, ctx).layouts
    arrays = dict(model.get_local_params())
    arrays.update(opt.get_state_arrays())
    os.makedirs(os.path.join(out_dir, "truth"), exist_ok=True)
    meta = {n: layouts[n].slice_for(ctx.rank).to_json() for n in arrays if n in layouts}
    np.savez(os.path.join(out_dir, "truth", f"rank_{ctx.rank}.npz"), **arrays)
    with open(os.path.join(out_dir, "truth", f"rank_{ctx.rank}.json"), "w") as fh:
        json.dump(meta, fh)


class _PrintSteps:
    """Tells a parent process how far training got (the crash test times its kill from it)."""

    def on_train_begin(self, run_context):
        print("begin", flush=True)

    def on_train_step_end(self, run_context):
        print(f"step {run_context.original_args()['cur_step_num']}", flush=True)

    def on_train_end(self, run_context):
        pass


def parse_monitor(spec, out_dir):
    opts = {"checkpoint_format": "safetensors", "output_dir": out_dir}
    for part in filter(None, spec.split(",")):
        key, value = part.split("=", 1)
        if key == "directory":
            value = os.path.join(out_dir, value)
        elif value.isdigit():
            value = int(value) if key.endswith(("steps", "max")) else bool(int(value))
        opts[key] = value
    return opts


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("out_dir")
    ap.add_argument("--dp", type=int, default=1)
    ap.add_argument("--mp", type=int, default=1)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--monitor", action="append", default=[])
    ap.add_argument("--hidden", type=int, default=None)
    ap.add_argument("--vocab", type=int, default=None)
    ap.add_argument("--print-steps", action="store_true", help="print 'step N' after every step")
    args = ap.parse_args(argv)
    from mindformers_st.checkpoint.monitor import CheckpointMonitor

    use_parallel = args.dp * args.mp > 1
    kw = {}
    if args.hidden:
        kw.update(hidden_size=args.hidden, intermediate_size=args.hidden * 2)
    if args.vocab:
        kw["vocab_size"] = args.vocab
    model, opt, step, ctx = build_run(args.dp, args.mp, use_parallel, model_kwargs=kw)
    callbacks = [CheckpointMonitor(**parse_monitor(s, args.out_dir)) for s in args.monitor]
    if args.print_steps:
        callbacks.append(_PrintSteps())
    train(model, opt, step, ctx, callbacks, args.steps, args.out_dir)
    dump_truth(model, opt, ctx, args.out_dir)
    print(f"rank {ctx.rank} done", flush=True)
    return 0


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    sys.exit(main())
