"""A plain MindSpore training script with mindformers-st's checkpointing — copy it as a start.

    python examples/model_train_checkpoint.py --output_dir out                  # one card
    msrun --worker_num 2 --local_worker_num 2 --master_port 8118 --join True \\
        examples/model_train_checkpoint.py --output_dir out                      # DATA_PARALLEL
    python examples/model_train_checkpoint.py --output_dir out --resume         # continue

What it shows: `mindformers_st.CheckpointMonitor` is an ordinary `mindspore.train.Callback` in
`Model.train` (any network, any MindSpore optimizer): per-rank safetensors files
`out/checkpoint/rank_r/net_rank_r-{epoch}_{step}.safetensors` with MindSpore's tensor names,
checksums and a commit record, de-duplicated across data-parallel ranks with
`--remove_redundancy`, written in the background with `--async_save`. `mindformers_st.
load_checkpoint(net, folder, optimizer=opt, resume=True)` restores weights, optimizer moments and
the step, and says which `initial_epoch` to continue from. `mindformers-st merge out/checkpoint
merged` then gives complete weights.
"""
import argparse
import os

import numpy as np

import mindspore as ms
import mindspore.dataset as ds
from mindspore import nn
from mindspore.train import Model

from mindformers_st import CheckpointMonitor, load_checkpoint


class MLP(nn.Cell):
    """A small classifier: any nn.Cell works the same way."""

    def __init__(self, width: int = 64):
        super().__init__()
        self.fc1 = nn.Dense(16, width)
        self.act = nn.ReLU()
        self.fc2 = nn.Dense(width, width)
        self.head = nn.Dense(width, 4)

    def construct(self, x):
        return self.head(self.act(self.fc2(self.act(self.fc1(x)))))


def dataset(rank: int, world: int, batch: int) -> ds.Dataset:
    """Deterministic data, sharded over the data-parallel ranks (no shuffling: reproducible)."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((256, 16)).astype(np.float32)
    y = (x[:, :4].argmax(axis=1)).astype(np.int32)
    data = ds.NumpySlicesDataset({"x": x, "y": y}, shuffle=False, num_shards=world, shard_id=rank)
    return data.batch(batch, drop_remainder=True)


class PrintLoss(ms.train.Callback):
    """One line per step on rank 0: `step N loss X` (the tests compare these)."""

    def __init__(self, rank: int):
        super().__init__()
        self.rank = rank

    def on_train_step_end(self, run_context):
        cb = run_context.original_args()
        loss = cb.net_outputs[0] if isinstance(cb.net_outputs, (tuple, list)) else cb.net_outputs
        if self.rank == 0:
            print(f"step {cb.cur_step_num} loss {float(loss.asnumpy()):.9f}", flush=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--output_dir", default="./output")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--batch", type=int, default=16, help="per-rank batch size")
    ap.add_argument("--save_steps", type=int, default=0, help="default: once per epoch")
    ap.add_argument("--remove_redundancy", action="store_true")
    ap.add_argument("--async_save", action="store_true")
    ap.add_argument("--resume", action="store_true", help="continue from output_dir/checkpoint")
    ap.add_argument("--optimizer", default="AdamWeightDecay",
                    choices=["AdamWeightDecay", "Adam", "Momentum", "SGD"])
    ap.add_argument("--graph", action="store_true", help="GRAPH_MODE instead of PyNative")
    ap.add_argument("--sink", action="store_true", help="dataset_sink_mode=True")
    ap.add_argument("--loss_scale", action="store_true", help="a loss-scale manager (1024)")
    args = ap.parse_args(argv)

    ms.set_context(mode=ms.GRAPH_MODE if args.graph else ms.PYNATIVE_MODE)
    ms.set_device("CPU")
    ms.set_seed(0)
    rank, world = 0, 1
    if "MS_WORKER_NUM" in os.environ:   # started by msrun: data parallel over the workers
        from mindspore.communication import get_group_size, get_rank, init
        init()
        rank, world = get_rank(), get_group_size()
        ms.set_auto_parallel_context(parallel_mode=ms.ParallelMode.DATA_PARALLEL,
                                     gradients_mean=True)
    data = dataset(rank, world, args.batch)
    steps_per_epoch = data.get_dataset_size()

    net = MLP()
    make = {"AdamWeightDecay": lambda p: nn.AdamWeightDecay(p, 1e-3, weight_decay=0.01),
            "Adam": lambda p: nn.Adam(p, 1e-3),
            "Momentum": lambda p: nn.Momentum(p, 1e-2, 0.9),
            "SGD": lambda p: nn.SGD(p, 1e-2, momentum=0.9)}
    opt = make[args.optimizer](net.trainable_params())
    loss_fn = nn.SoftmaxCrossEntropyWithLogits(sparse=True, reduction="mean")
    extra = {}
    if args.loss_scale:
        # CPU takes a fixed scale that never drops updates (MindSpore's rule on CPU)
        extra["loss_scale_manager"] = ms.amp.FixedLossScaleManager(1024.0, drop_overflow_update=False)
    model = Model(net, loss_fn, opt, **extra)

    ckpt_dir = os.path.join(args.output_dir, "checkpoint")
    initial_epoch = 0
    if args.resume:
        report = load_checkpoint(net, ckpt_dir, optimizer=opt, resume=True,
                                 steps_per_epoch=steps_per_epoch, output_dir=args.output_dir)
        initial_epoch = report.resume_point.initial_epoch
        if initial_epoch >= args.epochs:
            if rank == 0:
                print(f"nothing to train: the checkpoint is at epoch {initial_epoch} of "
                      f"{args.epochs}", flush=True)
            return 0
        if report.resume_point.skip_steps:
            # Model.train restarts each epoch's data from its beginning; resuming mid-epoch needs
            # a dataset that skips only in the first epoch. This example saves once per epoch.
            raise SystemExit(f"the newest save is {report.resume_point.skip_steps} steps into "
                             f"an epoch; save at epoch ends (--save_steps {steps_per_epoch})")
    monitor = CheckpointMonitor(prefix="net", checkpoint_format="safetensors",
                                save_checkpoint_steps=args.save_steps or steps_per_epoch,
                                keep_checkpoint_max=5, remove_redundancy=args.remove_redundancy,
                                async_save=args.async_save, output_dir=args.output_dir)
    model.train(args.epochs, data, callbacks=[monitor, PrintLoss(rank)],
                dataset_sink_mode=args.sink, initial_epoch=initial_epoch)
    if rank == 0:
        print(f"done: {args.epochs} epochs of {steps_per_epoch} steps, checkpoints in {ckpt_dir}",
              flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
