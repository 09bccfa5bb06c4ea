"""Runs MindSpore Transformers 2.0.0's own checkpoint code (see mindformers_ref.py): never our
package. `python mf_worker.py JSON_LIST_OF_[COMMAND, ARGS]` runs the commands in order in one
process (importing mindformers once); prints `MF_RESULT [json answers]` last.

- save: `mindformers.checkpoint.checkpoint.save_checkpoint(iteration, net, opt, common_info)`
  of a one-card network whose parameters (and AdamWeightDecay moments) are the arrays in
  `values` (an .npz);
- save_sharded: a distributed save as its save_checkpoint writes it on `world` ranks: each
  rank's `model-`/`opt-` file via its `get_checkpoint_name` + MindSpore's save_checkpoint, and
  `metadata.json` via its `save_metadata` over `build_sharded_tensor`s (the collective part of
  save_checkpoint cannot run in one process);
- load: its `load_checkpoint(path, net, opt)` into a one-card network of zeros, then saves what
  it holds to `out` (.npz), with its `CommonInfo.load_common` and `get_checkpoint_path` answers;
- assemble: for a sharded save (its load_checkpoint cannot merge one on a single CPU process:
  it hands the net a rank's block), its `get_checkpoint_path`, `verify_ckpt_valid` and
  `get_metadata_of_checkpoint` say which file holds which chunk; each chunk is read with
  MindSpore's safetensors loader and placed at its global offset; the globals go to `out`.
"""
import json
import os
import sys

import numpy as np


def _net(values):
    import mindspore as ms
    from mindspore import Parameter, ParameterTuple, Tensor, nn
    ms.set_context(mode=ms.PYNATIVE_MODE, device_target="CPU")

    class Net(nn.Cell):
        def __init__(self):
            super().__init__()
            self.params = ParameterTuple([Parameter(Tensor(v), name=n) for n, v in values.items()])

        def construct(self, x):
            return x
    return Net()


def _optimizer(net, moments):
    from mindspore import Tensor, nn
    opt = nn.AdamWeightDecay(net.trainable_params(), learning_rate=1e-3)
    for p in opt.parameters_dict().values():
        if p.name in moments:
            p.set_data(Tensor(moments[p.name]))
    return opt


def save(args):
    from mindformers.checkpoint.checkpoint import CommonInfo, save_checkpoint
    arrays = dict(np.load(args["values"]))
    weights = {n: v for n, v in arrays.items() if not n.startswith("adam_") and n != "global_step"}
    net = _net(weights)
    opt = _optimizer(net, arrays)
    save_checkpoint(args["iteration"], net, opt, common_info=CommonInfo(**args["common"]),
                    save_checkpoint_path=args["out"], user_prefix=args.get("prefix"))
    return {"files": sorted(os.listdir(args["out"]))}


def save_sharded(args):
    import mindspore as ms
    from mindspore import Tensor
    from mindformers.checkpoint.checkpoint import CommonInfo
    from mindformers.checkpoint.metadata import save_metadata
    from mindformers.checkpoint.sharded_tensor import build_sharded_tensor
    from mindformers.checkpoint.utils import (FileType, get_checkpoint_iter_dir,
                                              get_checkpoint_name, get_common_filename,
                                              get_checkpoint_tracker_filename,
                                              get_metadata_filename)
    ms.set_context(mode=ms.PYNATIVE_MODE, device_target="CPU")
    arrays = dict(np.load(args["values"]))
    world, it, out = args["world"], args["iteration"], args["out"]
    split = args["split"]   # name -> dim cut over the ranks (absent: replicated)
    iter_dir = get_checkpoint_iter_dir(out, it)
    os.makedirs(iter_dir, exist_ok=True)
    metas, mappings = {}, []
    for r in range(world):
        metas[r] = {}
        for kind in (FileType.MODEL, FileType.OPTIMIZER):
            local = {}
            for n, v in arrays.items():
                if (kind == FileType.OPTIMIZER) != (n.startswith("adam_") or n == "global_step"):
                    continue
                base = n.split(".", 1)[1] if n.startswith("adam_") else n
                dim = split.get(base)
                off = [0] * v.ndim
                if dim is not None:
                    size = v.shape[dim] // world
                    off[dim] = r * size
                    v = np.take(v, range(r * size, (r + 1) * size), axis=dim)
                local[n] = v
                st = build_sharded_tensor(param_name=n, param_dtype=ms.float32 if v.dtype == np.float32 else ms.int32,
                                          local_shape=tuple(v.shape),
                                          global_shape=tuple(arrays[n].shape),
                                          global_offset=tuple(off) if off else (0,),
                                          axis_fragmentations=[world if d == dim else 1
                                                               for d in range(v.ndim)])
                metas[r][n] = st
                fname = get_checkpoint_name(None, None, r, world, kind) + ".safetensors"
                ranks = [r] if dim is not None else list(range(world))
                mappings.append((fname, r, ranks, (n, st.global_offset)))
            path = get_checkpoint_name(iter_dir, None, r, world, kind)
            ms.save_checkpoint([{"name": n, "data": Tensor(v)} for n, v in local.items()], path,
                               format="safetensors")
    save_metadata(metas, mappings, get_metadata_filename(out, it))
    CommonInfo(**args["common"]).save_common(get_common_filename(out, it))
    with open(get_checkpoint_tracker_filename(out), "w", encoding="utf-8") as fh:
        fh.write(str(it))
    return {"files": sorted(os.listdir(iter_dir))}


def load(args):
    from mindformers.checkpoint.checkpoint import CommonInfo, get_checkpoint_path, load_checkpoint
    arrays = dict(np.load(args["values"]))   # shapes and dtypes only: the network starts at 0
    weights = {n: np.zeros_like(v) for n, v in arrays.items()
               if not n.startswith("adam_") and n != "global_step"}
    net = _net(weights)
    opt = _optimizer(net, {}) if args.get("optimizer") else None
    load_checkpoint(args["path"], net, opt)
    held = {n: p.asnumpy() for n, p in net.parameters_dict().items()}
    if opt is not None:
        held.update({n: p.asnumpy() for n, p in opt.parameters_dict().items()
                     if n.startswith("adam_") or n == "global_step"})
    np.savez(args["out"], **held)
    folder = get_checkpoint_path(args["path"])
    common = CommonInfo.load_common(os.path.join(folder, "common.json")).__dict__
    return {"folder": folder, "common": common}


def assemble(args):
    import mindspore as ms
    from mindformers.checkpoint.checkpoint import CommonInfo, get_checkpoint_path
    from mindformers.checkpoint.metadata import get_metadata_of_checkpoint
    from mindformers.checkpoint.utils import get_sharded_tensor_shard_id, verify_ckpt_valid
    folder = get_checkpoint_path(args["path"])
    verify_ckpt_valid(folder)
    metas, storage = get_metadata_of_checkpoint(folder)
    files, out = {}, {}
    for name, shards in metas.items():
        full = None
        for st in shards:
            entry = storage[get_sharded_tensor_shard_id(name, st.global_offset)][0]
            path = os.path.join(folder, entry["file_name"])
            if path not in files:
                files[path] = {n: p.asnumpy() for n, p in
                               ms.load_checkpoint(path, format="safetensors").items()}
            block = files[path][name]
            assert tuple(block.shape) == tuple(st.local_shape), (name, block.shape, st.local_shape)
            if full is None:
                full = np.zeros(tuple(st.global_shape), block.dtype)
            index = tuple(slice(o, o + s) for o, s in zip(st.global_offset, st.local_shape))
            full[index] = block
        out[name] = full
    np.savez(args["out"], **out)
    common = CommonInfo.load_common(os.path.join(folder, "common.json")).__dict__
    return {"folder": folder, "common": common}


if __name__ == "__main__":
    commands = {"save": save, "save_sharded": save_sharded, "load": load, "assemble": assemble}
    results = [commands[name](args) for name, args in json.loads(sys.argv[1])]
    print("MF_RESULT " + json.dumps(results), flush=True)
