"""MindSpore strategy files, read and written: protobuf `ParallelStrategyMap` or its JSON form.

Formats (MindSpore 2.10, `mindspore/train/node_strategy.proto`):
- protobuf: one `ckpt_strategy_rank_{r}.ckpt` per rank (the layouts of that rank's pipeline
  stage), or one file merged over stages by `merge_pipeline_strategys`, whose parameter names
  carry a `"<stage>-"` prefix;
- JSON (file name ends in `.json`): `{"current_stage", "parallel_strategy_item": {op: {"stage",
  "parallel_strategy"}}, "parallel_layout_item": {name: {"dev_matrix", "tensor_map",
  "opt_weight_shard_step", "opt_weight_shard_size", "field", ...}}}`. JSON cannot express a tensor
  dim split over several device axes.

Strategy files do not record global shapes; `read_strategy` takes them (or one rank's local
shapes) when the caller has them, otherwise the layouts come back with `global_shape=None`.

The protobuf classes are MindSpore's own generated `node_strategy_pb2` module, loaded from the
installed MindSpore package by file path so that this pure layer never imports MindSpore itself.
"""
from __future__ import annotations

import glob
import importlib.util
import json
import logging
import os
import re
import sys
from types import ModuleType
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

from ..errors import LayoutError
from ..storage.atomic import atomic_write_bytes
from .tensor_layout import TensorLayout

logger = logging.getLogger(__name__)

RANK_FILE_RE = re.compile(r"^ckpt_strategy_rank_(\d+)\.(ckpt|json)$")
STAGE_PREFIX_RE = re.compile(r"^(\d+)-(.+)$")
_NODE_NAME = "Default/mindformers_st"
_PB2: Optional[ModuleType] = None


def strategy_file_name(rank: int) -> str:
    """MindSpore's per-rank strategy file name."""
    return f"ckpt_strategy_rank_{rank}.ckpt"


def _pb2() -> ModuleType:
    """MindSpore's generated node_strategy_pb2, without importing the mindspore package."""
    global _PB2
    if _PB2 is not None:
        return _PB2
    loaded = sys.modules.get("mindspore.train.node_strategy_pb2")
    if loaded is None:
        spec = importlib.util.find_spec("mindspore")  # locates the package, does not run it
        if spec is None or not spec.submodule_search_locations:
            raise LayoutError("reading or writing protobuf strategy files needs MindSpore's "
                              "node_strategy_pb2 (install mindspore), or use a .json strategy")
        path = os.path.join(list(spec.submodule_search_locations)[0], "train",
                            "node_strategy_pb2.py")
        mod_spec = importlib.util.spec_from_file_location("_mindformers_st_node_strategy_pb2",
                                                          path)
        loaded = importlib.util.module_from_spec(mod_spec)
        mod_spec.loader.exec_module(loaded)
    _PB2 = loaded
    return loaded


# ---------------------------------------------------------------------------------------------
# writing
# ---------------------------------------------------------------------------------------------
def _check_encodable(name: str, layout: TensorLayout, as_json: bool) -> None:
    multi = any(isinstance(e, tuple) for e in layout.tensor_map)
    if multi and as_json:
        raise LayoutError(f"parameter {name}: tensor_map {layout.tensor_map} splits a dim over "
                          f"several device axes, which MindSpore's JSON strategy cannot express; "
                          f"write a protobuf (.ckpt) strategy instead")
    if multi and len(layout.tensor_map) == 1:
        raise LayoutError(f"parameter {name}: a 1-d tensor split over several device axes "
                          f"{layout.tensor_map} is ambiguous in MindSpore's strategy format")


def _opt_fields(layout: TensorLayout) -> Tuple[int, int]:
    return layout.opt_weight_shard_step, layout.opt_weight_shard_size


def _atomic_write_bytes(path: str, data: bytes) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    atomic_write_bytes(path, data)


def _encode_proto(entries: Sequence[Tuple[str, TensorLayout]], stages: Sequence[int],
                  current_stage: int) -> bytes:
    pb = _pb2()
    smap = pb.ParallelStrategyMap()
    smap.current_stage = current_stage
    for stage in stages:
        # merge_pipeline_strategys reads the stage of a file from its first strategy item.
        item = smap.parallel_strategy_item.add()
        item.node_name = f"{_NODE_NAME}/stage{stage}"
        item.parallel_strategys.stage = stage
        item.parallel_strategys.parallel_strategy.add().dim.extend([1])
    for name, layout in entries:
        li = smap.parallel_layout_item.add()
        li.param_name = name
        lay = li.parallel_layouts
        lay.dev_matrix.add().dim.extend(layout.dev_matrix)
        if any(isinstance(e, tuple) for e in layout.tensor_map):
            for e in layout.tensor_map:  # one TensorMap per tensor dim
                lay.tensor_map.add().dim.extend(list(e) if isinstance(e, tuple) else [e])
        else:
            lay.tensor_map.add().dim.extend(layout.tensor_map)
        lay.param_split_shape.add()   # MindSpore's readers index [0]; empty = even split
        lay.indices_offset.add()
        lay.field = 0
        lay.opt_weight_shard_step, lay.opt_weight_shard_size = _opt_fields(layout)
    return smap.SerializeToString()


def _encode_json(entries: Sequence[Tuple[str, TensorLayout]], stages: Sequence[int],
                 current_stage: int) -> bytes:
    obj = {"current_stage": current_stage,
           "parallel_strategy_item": {f"{_NODE_NAME}/stage{s}": {"stage": s,
                                                                   "parallel_strategy": [[1]]}
                                      for s in stages},
           "parallel_layout_item": {}}
    for name, layout in entries:
        step, size = _opt_fields(layout)
        obj["parallel_layout_item"][name] = {
            "dev_matrix": list(layout.dev_matrix), "tensor_map": list(layout.tensor_map),
            "param_split_shape": [], "indices_offset": [], "field": 0,
            "opt_weight_shard_step": step, "opt_weight_shard_size": size}
    return json.dumps(obj, indent=1).encode()


def _write(path: str, entries, stages, current_stage) -> None:
    as_json = str(path).endswith(".json")
    for name, layout in entries:
        _check_encodable(name, layout, as_json)
    data = (_encode_json if as_json else _encode_proto)(entries, stages, current_stage)
    _atomic_write_bytes(str(path), data)
    logger.debug("wrote strategy %s (%d layouts)", path, len(entries))


def write_strategy_file(path, layouts: Mapping[str, TensorLayout], stage: int = 0) -> None:
    """Write the layouts of pipeline stage `stage` as one MindSpore strategy file (as MindSpore
    writes for every rank of that stage): protobuf, or JSON when `path` ends in `.json`.

    Layouts of other stages are left out; LayoutError when none belongs to `stage`."""
    entries = sorted((n, lay) for n, lay in layouts.items() if lay.stage == stage)
    if layouts and not entries:
        raise LayoutError(f"no layout belongs to pipeline stage {stage} "
                          f"(stages present: {sorted({l.stage for l in layouts.values()})})")
    _write(path, entries, [stage], stage)


def write_merged_strategy_file(path, layouts: Mapping[str, TensorLayout]) -> None:
    """Write all stages in one file the way `merge_pipeline_strategys` does: names prefixed by
    `"<stage>-"`, one strategy item per stage, current_stage 1."""
    entries = sorted((f"{lay.stage}-{n}", lay) for n, lay in layouts.items())
    stages = sorted({lay.stage for lay in layouts.values()})
    _write(path, entries, stages, 1)


def write_rank_strategy_files(folder, layouts: Mapping[str, TensorLayout], pc) -> List[str]:
    """Write `ckpt_strategy_rank_{r}.ckpt` for every rank of `pc` (each holds its stage's layouts)
    as one complete set: rank files of an earlier, larger run are removed (see
    `remove_stale_rank_files`). Returns the paths in rank order."""
    paths = []
    for rank in range(pc.world_size):
        stage = rank // pc.stage_size
        path = os.path.join(str(folder), strategy_file_name(rank))
        write_strategy_file(path, layouts, stage)
        paths.append(path)
    remove_stale_rank_files(folder, pc.world_size)
    return paths


def remove_stale_rank_files(folder, world_size: int) -> List[str]:
    """Delete `ckpt_strategy_rank_{k}.{ckpt,json}` with k >= `world_size` from `folder`: they
    belong to an earlier run with more ranks, and a folder read as one set must hold one run's
    files only. Returns the removed names (a warning names them)."""
    folder = str(folder)
    try:
        names = os.listdir(folder)
    except FileNotFoundError:
        return []
    stale = sorted((n for n in names
                    if (m := RANK_FILE_RE.match(n)) and int(m.group(1)) >= world_size),
                   key=lambda n: int(RANK_FILE_RE.match(n).group(1)))
    for n in stale:
        os.unlink(os.path.join(folder, n))
    if stale:
        logger.warning("%s: removed %d strategy file(s) of an earlier run with more ranks (%s); "
                       "this run has %d", folder, len(stale), _name_range(stale), world_size)
    return stale


def _name_range(names: Sequence[str]) -> str:
    return names[0] if len(names) == 1 else f"{names[0]} .. {names[-1]}"


def strategy_world_size(layouts: Mapping[str, TensorLayout]) -> int:
    """The number of ranks a set of layouts describes (all pipeline stages); 0 when empty."""
    return max((lay.ranks().stop for lay in layouts.values()), default=0)


def check_strategy_world(layouts: Mapping[str, TensorLayout], strategy, ckpt_world: int,
                         ckpt_path) -> None:
    """LayoutError naming both when the strategy `strategy` describes another number of ranks
    than the checkpoint at `ckpt_path` was saved by (`ckpt_world`)."""
    world = strategy_world_size(layouts)
    if layouts and ckpt_world and world != ckpt_world:
        raise LayoutError(f"the strategy {strategy} is for {world} rank(s) but the checkpoint "
                          f"{ckpt_path} was saved by {ckpt_world} rank(s); pass the strategy of "
                          f"the run that saved it")


# ---------------------------------------------------------------------------------------------
# reading
# ---------------------------------------------------------------------------------------------
def _entries_from_proto(path: str) -> Tuple[List[Tuple[str, dict]], Optional[int]]:
    pb = _pb2()
    smap = pb.ParallelStrategyMap()
    try:
        with open(path, "rb") as f:
            smap.ParseFromString(f.read())
    except Exception as exc:  # protobuf raises DecodeError and friends
        raise LayoutError(f"strategy file {path} is not a MindSpore ParallelStrategyMap "
                          f"protobuf ({exc}); JSON strategies must end in .json") from exc
    item_stage = (smap.parallel_strategy_item[0].parallel_strategys.stage
                  if len(smap.parallel_strategy_item) else None)
    out = []
    for li in smap.parallel_layout_item:
        lay = li.parallel_layouts
        if not len(lay.dev_matrix):
            raise LayoutError(f"strategy file {path}: parameter {li.param_name} has no dev_matrix")
        maps = [list(m.dim) for m in lay.tensor_map]
        if len(maps) > 1:   # one TensorMap per tensor dim (multi-axis form), as MindSpore reads it
            tensor_map = [tuple(m) if len(m) > 1 else m[0] for m in maps if m]
        else:
            tensor_map = maps[0] if maps else []
        out.append((li.param_name, {"dev_matrix": list(lay.dev_matrix[0].dim),
                                    "tensor_map": tensor_map,
                                    "opt_weight_shard_step": lay.opt_weight_shard_step,
                                    "opt_weight_shard_size": lay.opt_weight_shard_size}))
    return out, item_stage


def _entries_from_json(path: str) -> Tuple[List[Tuple[str, dict]], Optional[int]]:
    try:
        with open(path, encoding="utf-8") as f:
            obj = json.load(f)
        items = obj.get("parallel_strategy_item") or {}
        item_stage = next(iter(items.values())).get("stage") if items else None
        out = []
        for name, li in (obj.get("parallel_layout_item") or {}).items():
            out.append((name, {"dev_matrix": list(li["dev_matrix"]),
                               "tensor_map": list(li["tensor_map"]),
                               "opt_weight_shard_step": int(li.get("opt_weight_shard_step") or 0),
                               "opt_weight_shard_size": int(li.get("opt_weight_shard_size") or 0)}))
    except (OSError, ValueError, KeyError, TypeError, AttributeError, StopIteration) as exc:
        raise LayoutError(f"strategy file {path} is not a MindSpore JSON strategy ({exc})") from exc
    return out, item_stage


def _read_one(path: str) -> Dict[str, TensorLayout]:
    entries, item_stage = (_entries_from_json if path.endswith(".json")
                           else _entries_from_proto)(path)
    m = RANK_FILE_RE.match(os.path.basename(path))
    file_rank = int(m.group(1)) if m else None
    result: Dict[str, TensorLayout] = {}
    for raw_name, fields in entries:
        pm = STAGE_PREFIX_RE.match(raw_name)
        if pm:   # merged over pipeline stages: "<stage>-<name>"
            stage, name = int(pm.group(1)), pm.group(2)
        else:
            name = raw_name
            if item_stage is not None:
                stage = int(item_stage)
            elif file_rank is not None:
                dev_num = 1
                for x in fields["dev_matrix"]:
                    dev_num *= int(x)
                stage = file_rank // dev_num
            else:
                stage = 0
        try:
            layout = TensorLayout(None, fields["dev_matrix"], fields["tensor_map"],
                                  fields["opt_weight_shard_step"],
                                  fields["opt_weight_shard_size"], stage)
        except LayoutError as exc:
            raise LayoutError(f"strategy file {path}, parameter {name}: {exc}") from exc
        _add(result, name, layout, path)
    return result


def _add(result: Dict[str, TensorLayout], name: str, layout: TensorLayout, source: str) -> None:
    old = result.get(name)
    if old is None:
        result[name] = layout
    elif old.stage == layout.stage:
        if old != layout:
            raise LayoutError(f"strategy {source}: parameter {name} has layout "
                              f"{layout.describe()} but another file of stage {old.stage} says "
                              f"{old.describe()}")
    elif layout.stage < old.stage:
        # A parameter shared by several stages: keep the first stage, as MindSpore does.
        result[name] = layout


def _check_one_set(folder: str, per_file) -> None:
    """The files of a strategy folder must describe one run: each file's device count times the
    number of pipeline stages is the same world size. A folder mixing two runs (stale files of a
    larger one) is one LayoutError naming both groups."""
    stages = {lay.stage for _, layouts in per_file for lay in layouts.values()}
    n_stages = max(stages) + 1 if stages else 1
    groups: Dict[int, List[str]] = {}
    for f, layouts in per_file:
        devs = {lay.device_num for lay in layouts.values()}
        if len(devs) == 1:
            groups.setdefault(devs.pop() * n_stages, []).append(os.path.basename(f))
    if len(groups) > 1:
        said = "; ".join(f"{_name_range(sorted(names, key=_rank_key))} describe {w} rank(s)"
                         for w, names in sorted(groups.items()))
        raise LayoutError(f"strategy folder {folder} mixes the files of runs of different sizes "
                          f"({said}); remove the other run's files or point at one run's "
                          f"strategy")


def _rank_key(name: str):
    m = RANK_FILE_RE.match(name)
    return (0, int(m.group(1))) if m else (1, name)


def read_strategy(path_or_dir, global_shapes: Optional[Mapping[str, Sequence[int]]] = None,
                  local_shapes: Optional[Mapping[str, Sequence[int]]] = None
                  ) -> Dict[str, TensorLayout]:
    """{parameter name: layout} from one strategy file, a folder of them (per-rank `*.ckpt` or
    `*.json` files; all are read and must agree), or a pipeline-merged file.

    Names lose any `"<stage>-"` prefix; the stage comes from it, else from the file's strategy
    item, else from a `ckpt_strategy_rank_{r}` file name. Shapes: `global_shapes[name]` when
    given, else computed from `local_shapes[name]` (one rank's block shape), else None."""
    path = str(path_or_dir)
    if os.path.isdir(path):
        files = sorted(glob.glob(os.path.join(path, "*.ckpt")) +
                       glob.glob(os.path.join(path, "*.json")))
        if not files:
            raise LayoutError(f"strategy folder {path} holds no *.ckpt or *.json strategy file")
    elif os.path.isfile(path):
        files = [path]
    else:
        raise LayoutError(f"strategy {path} does not exist")
    per_file = [(f, _read_one(f)) for f in files]
    if len(per_file) > 1:
        _check_one_set(path, per_file)
    result: Dict[str, TensorLayout] = {}
    for f, layouts in per_file:
        for name, layout in layouts.items():
            _add(result, name, layout, f)
    for name, layout in list(result.items()):
        try:
            if global_shapes is not None and name in global_shapes:
                result[name] = layout.with_global_shape(global_shapes[name])
            elif local_shapes is not None and name in local_shapes:
                result[name] = layout.with_local_shape(local_shapes[name])
        except LayoutError as exc:
            raise LayoutError(f"strategy {path}, parameter {name}: {exc}") from exc
    return result
