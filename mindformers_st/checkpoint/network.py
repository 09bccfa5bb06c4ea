"""A network (and its optimizer) seen as named tensors on this rank: what a save holds and what a
load sets, for our Llama models and for any MindSpore `nn.Cell`.

Two views, one interface (`NetworkState`):
- `ModelState` — our models (`param_table()`, `set_local_params`) and our AdamW
  (`adam_m.*`, `adam_v.*`, `global_step`): layouts from `plan_layouts` for the job's
  ParallelConfig (tensor and pipeline parallel, optimizer shard);
- `CellState` — any `nn.Cell` with any MindSpore optimizer (AdamWeightDecay, AdamW, Adam,
  Momentum, SGD, ...), its tensors named as MindSpore names them (`fc1.weight`,
  `adam_m.fc1.weight`, `moment1.fc1.weight`, `global_step`, `learning_rate`, ...), laid out from
  `network.parameter_layout_dict` where MindSpore's auto/semi-auto parallel fills it, from given
  layouts (a strategy file), or else replicated on every rank (one card, DATA_PARALLEL).
Whole-valued counters (`records.hyper.is_hyper`: global_step, learning_rate, loss scale ...) have
no layout: every rank writes them whole, and a load sets them whole.
"""
from __future__ import annotations

import logging
from typing import Dict, Iterable, List, Mapping, Optional, Sequence

import numpy as np

from ..dtypes import ST_TO_NUMPY
from ..errors import CheckpointError, LayoutError
from ..layout.tensor_layout import TensorLayout
from ..records.hyper import is_hyper

logger = logging.getLogger(__name__)

# Optimizer state prefixes MindSpore's optimizers use (their `parameters` clone the weights
# under these names) and the scalar state they keep; used to tell state from stray tensors.
OPTIMIZER_PREFIXES = ("adam_m.", "adam_v.", "moment1.", "moment2.", "moments.", "accum.",
                      "stat.", "exp_avg.", "exp_avg_sq.", "max_exp_avg_sq.", "mean_grad.",
                      "mean_square.")
OPTIMIZER_SCALARS = ("global_step", "learning_rate", "beta1_power", "beta2_power", "momentum",
                     "weight_decay")


def is_optimizer_state(name: str) -> bool:
    """True for optimizer moments and counters as MindSpore's optimizers and ours name them."""
    return name.startswith(OPTIMIZER_PREFIXES) or name in OPTIMIZER_SCALARS


class NetworkState:
    """This rank's tensors of a network and optimizer, by name.

    weights: the network's parameters; optimizer_states: the optimizer's own tensors (moments,
    counters) that are not weights; layouts: a TensorLayout for every tensor that has one
    (hyper values have none); dtypes: safetensors dtype per name."""

    weights: List[str]
    optimizer_states: List[str]
    layouts: Dict[str, TensorLayout]
    dtypes: Dict[str, str]
    elsewhere: frozenset = frozenset()   # tensors other pipeline stages of the job hold
    # every laid-out tensor of the job, on every stage (None: `layouts` are the job's), so a
    # rank can plan what the others load (balanced_load)
    job_layouts: Optional[Dict[str, TensorLayout]] = None
    # whether a load may give the parameters other memory (a checkpoint file's pages) instead
    # of filling their own: only where no compiled graph holds them — MindSpore's optimizers
    # and any @jit step keep the memory a parameter had when they first ran, and update that
    # memory ever after (a load re-pointing the parameter would be ignored by training)
    map_pages: bool = False

    def parameters(self) -> Dict[str, object]:
        """name -> MindSpore Parameter of every tensor a save holds, in save order."""
        raise NotImplementedError

    def trainable(self, params: Optional[Mapping[str, object]] = None) -> List[str]:
        """The weights that require gradients (`params`: this state's `parameters()`, when the
        caller already has them)."""
        params = self.parameters() if params is None else params
        return [n for n in self.weights if getattr(params[n], "requires_grad", True)]

    def set_weights(self, arrays: Mapping[str, np.ndarray], strict: bool = True) -> List[str]:
        """Set the weights from this rank's slices; returns the names set."""
        raise NotImplementedError

    def set_optimizer_states(self, arrays: Mapping[str, np.ndarray],
                             strict: bool = True) -> List[str]:
        """Set the optimizer's tensors (moments, counters); returns the names set."""
        raise NotImplementedError

    def destinations(self, shapes: Mapping[str, Sequence[int]],
                     mapped=None) -> "ParamDestinations":
        """Writable arrays over the parameters' own memory for the tensors in `shapes` (name ->
        the shape the load produces), for the engine to fill in place, or the source's own
        copy-on-write pages where `mapped(name)` gives them and this state allows it
        (`map_pages`; `ParamDestinations`)."""
        params = self.parameters()
        missing = sorted(n for n in shapes if n not in params)
        if missing:
            raise CheckpointError(f"load_checkpoint: the network has no tensor(s) {missing[:5]}")
        return ParamDestinations({n: params[n] for n in shapes}, shapes, self._reshape_ok,
                                 mapped if self.map_pages else None)

    def _reshape_ok(self, name: str, have: Sequence[int], want: Sequence[int]) -> bool:
        """Whether a tensor stored with shape `want` may fill a parameter of shape `have`."""
        return False

    def step_count(self) -> Optional[int]:
        """Updates the optimizer has applied (its global_step), None without one."""
        params = self.parameters()
        if "global_step" not in params:
            return None
        return int(np.asarray(params["global_step"].asnumpy()).reshape(-1)[0])


class ModelState(NetworkState):
    """Our models (LlamaForCausalLM and registered kin) with our AdamW; under pipeline
    parallelism only the tensors of this rank's stage. A load maps the file's pages
    (`map_pages`) only for a model without an optimizer (predict): a model that trains would
    copy every page at its first update anyway (a copy-on-write fault per page costs more
    than one copy at load), would keep a pruned save's disk space for the whole run, and a
    truncating rewrite of the file by another program would replace its trained values
    (docs/checkpoint-loading.md); so training loads copy once."""

    def __init__(self, model, optimizer, ctx, with_optimizer: bool = True):
        self.model, self.optimizer, self.ctx = model, optimizer, ctx
        self.map_pages = optimizer is None
        self._describe(model.param_table(), ctx, with_optimizer and optimizer is not None)

    def _describe(self, table, ctx, with_optimizer: bool) -> None:
        self.weights = [p.name for p in table]
        if with_optimizer:
            table = table.with_optimizer_states()
        self.optimizer_states = [p.name for p in table if p.name not in set(self.weights)]
        if with_optimizer:
            self.optimizer_states.append("global_step")   # whole-valued: no layout
        if ctx is not None:
            self.layouts = ctx.layouts(table)
        else:
            from ..layout.parallel_config import ParallelConfig, plan_layouts
            self.layouts = plan_layouts(table, ParallelConfig())
        self.job_layouts = dict(self.layouts)
        # A pipeline stage holds (saves, loads) only the tensors its layout puts on its stage.
        stage = ctx.coords[0] if ctx is not None else 0
        here = {n for n, lay in self.layouts.items() if lay.stage == stage}
        self.elsewhere = frozenset(n for n in self.layouts if n not in here)
        self.weights = [n for n in self.weights if n in here]
        self.optimizer_states = [n for n in self.optimizer_states
                                 if n in here or n not in self.layouts]
        self.layouts = {n: lay for n, lay in self.layouts.items() if n in here}
        self.dtypes = {p.name: p.dtype for p in table}

    @classmethod
    def planned(cls, table, ctx, with_optimizer: bool) -> "ModelState":
        """The tensors a model of parameter table `table` (with AdamW's when `with_optimizer`)
        will have on this rank, before the model exists: enough to plan and read a load
        (`loader.PendingLoad`), not to set it (no model, no optimizer)."""
        state = cls.__new__(cls)
        state.model, state.optimizer, state.ctx = None, None, ctx
        state._describe(table, ctx, with_optimizer)
        return state

    def parameters(self) -> Dict[str, object]:
        out = {p.name: p for p in self.model.get_parameters()}
        if self.optimizer is not None:
            out.update((p.name, p) for p in list(self.optimizer.adam_m) + list(self.optimizer.adam_v))
            out["global_step"] = self.optimizer.global_step
        return out

    def set_weights(self, arrays, strict=True):
        return self.model.set_local_params(arrays, strict=strict)

    def set_optimizer_states(self, arrays, strict=True):
        if self.optimizer is None:
            raise CheckpointError("restoring optimizer state needs the optimizer")
        return self.optimizer.set_state_arrays(arrays, strict=strict)


def param_view(param) -> Optional[np.ndarray]:
    """A writable numpy array over `param`'s own memory, in our dtype table's dtype (bfloat16
    as ml_dtypes'), or None when MindSpore gives a copy. On CPU `asnumpy()` is such a view
    (MindSpore 2.10, also after training steps); two calls returning the same buffer prove it."""
    if getattr(param, "has_init", False):
        param.init_data()
    try:
        first, second = param.asnumpy(), param.asnumpy()
    except (RuntimeError, TypeError, ValueError):
        return None
    if (not isinstance(first, np.ndarray) or not first.flags.writeable or first.size == 0
            or first.ctypes.data != second.ctypes.data or not first.flags.c_contiguous):
        return None
    want = ST_TO_NUMPY[_st_dtype(param)]
    return first if first.dtype == want else first.view(want)


class ParamDestinations:
    """Where a load puts each tensor. Copy-free where the source allows: `mapped[name]` is the
    stored tensor itself, a copy-on-write array over its file's pages (`mapped(name)` of the
    caller, e.g. `PreparedRead.mapped`; only for a dtype MindSpore shares memory with), which
    `commit()` makes the parameter's data, as MindSpore's own safetensors load does; the file
    is never written (an update copies the page it writes). Otherwise copy-once:
    `arrays[name]` is a writable array of the load's shape over the parameter's own memory
    (filling it sets the parameter), or, when MindSpore hands out no such view, a new array
    that `commit()` gives to the parameter without a copy (`Tensor.from_numpy` shares memory).
    CheckpointError, naming the tensor and both shapes, when a stored shape cannot fill its
    parameter."""

    def __init__(self, params: Mapping[str, object], shapes: Mapping[str, Sequence[int]],
                 reshape_ok=lambda name, have, want: False, mapped=None):
        self.arrays: Dict[str, np.ndarray] = {}
        self.mapped: Dict[str, np.ndarray] = {}
        self._params: Dict[str, object] = {}
        self._adopt: Dict[str, object] = {}
        self.shared: List[str] = []
        for name, shape in shapes.items():
            p, want = params[name], tuple(int(d) for d in shape)
            have = tuple(int(d) for d in p.shape)
            if have != want and not (int(np.prod(have)) == int(np.prod(want))
                                     and reshape_ok(name, have, want)):
                raise CheckpointError(f"load_checkpoint: {name} has shape {want} in the "
                                      f"checkpoint, the network holds {have} on this rank")
            st_dtype = _st_dtype(p)
            if mapped is not None and st_dtype not in _NOT_SHARED:
                pages = mapped(name)
                if pages is not None and pages.dtype == ST_TO_NUMPY[st_dtype]:
                    self.mapped[name], self._params[name] = pages, p
                    continue
            view = param_view(p)
            if view is None:
                view = np.empty(have, dtype=ST_TO_NUMPY[_st_dtype(p)])
                self._adopt[name] = p
            else:
                self.shared.append(name)
            self.arrays[name] = view.reshape(want)

    def commit(self) -> List[str]:
        """Hand the arrays that are not the parameters' own memory (mapped pages, new arrays)
        to their parameters (no copy); returns every name set."""
        if self.mapped:
            from mindspore import Tensor
            for name, pages in self.mapped.items():
                p = self._params[name]
                p.set_data(Tensor.from_numpy(pages.reshape(tuple(p.shape))))
        if self._adopt:
            from mindspore import Tensor
            for name, p in self._adopt.items():
                arr = self.arrays[name].reshape(tuple(p.shape))
                if arr.dtype.name == "bfloat16":   # MindSpore's numpy bfloat16 is its own type
                    p.set_data(Tensor(arr.astype(np.float32)).astype(p.dtype))
                else:
                    p.set_data(Tensor.from_numpy(np.ascontiguousarray(arr)))
        return list(self.mapped) + list(self.arrays)


def _numpy_native(dtype: np.dtype) -> bool:
    return dtype.type.__module__ == "numpy"


# dtypes whose numpy arrays MindSpore does not take as they are: ml_dtypes' bfloat16 and float8
# (MindSpore's numpy bfloat16 is its own type); those loads copy once instead
_NOT_SHARED = frozenset(k for k, v in ST_TO_NUMPY.items() if not _numpy_native(np.dtype(v)))


def _st_dtype(param) -> str:
    """The safetensors dtype of a MindSpore parameter, from its dtype's name (no data copied)."""
    from ..dtypes import MINDSPORE_TO_ST
    name = str(param.dtype)
    if name not in MINDSPORE_TO_ST:
        raise CheckpointError(f"{param.name}: MindSpore dtype {name} has no safetensors "
                              f"equivalent; cast the parameter to a standard dtype")
    return MINDSPORE_TO_ST[name]


def replicated_layout(shape: Sequence[int], world: int) -> TensorLayout:
    """A tensor held whole by each of `world` ranks (one card, DATA_PARALLEL)."""
    return TensorLayout(tuple(int(d) for d in shape), (max(1, int(world)),),
                        (-1,) * len(tuple(shape)))


def layouts_from_parameter_layout_dict(layout_dict: Mapping[str, Sequence],
                                       shapes: Mapping[str, Sequence[int]]) -> Dict[str, TensorLayout]:
    """TensorLayouts from MindSpore's `network.parameter_layout_dict` (auto/semi-auto parallel on
    Ascend/GPU), whose entries are, as MindSpore builds them (`mindspore.parallel._tensor`):
    [dev_matrix, tensor_map, slice_shape, field_size, uniform_split, opt_shard_group,
    full_shape, after_reshape_slice_shape, ...]. The global shape is `full_shape` when given,
    else the slice shape times the split (`shapes` are the tensors as this rank holds them).
    LayoutError naming the tensor for what cannot be described here: a non-uniform split, and an
    optimizer-shard group (its size is not in the entry: pass the run's strategy file as
    `layouts=`, which records it)."""
    out = {}
    for name, entry in layout_dict.items():
        if name not in shapes:
            continue
        entry = list(entry)
        if len(entry) < 3:
            raise LayoutError(f"{name}: parameter_layout_dict entry {entry!r} is not MindSpore's "
                              f"[dev_matrix, tensor_map, slice_shape, ...]")
        dev_matrix, tensor_map = tuple(entry[0]), tuple(entry[1])
        if len(entry) > 4 and not bool(entry[4]):
            raise LayoutError(f"{name}: parameter_layout_dict says the split is not uniform; "
                              f"only uniform splits can be saved as slices")
        if len(entry) > 5 and entry[5]:
            raise LayoutError(f"{name}: parameter_layout_dict shards it over the optimizer group "
                              f"{entry[5]!r}, whose size the entry does not record; pass the "
                              f"run's strategy file (CheckpointMonitor(layouts=...))")
        full = tuple(int(d) for d in entry[6]) if len(entry) > 6 and entry[6] else None
        lay = TensorLayout(full, dev_matrix, tensor_map)
        if full is None:
            lay = lay.with_local_shape(tuple(int(d) for d in entry[2]))
        out[name] = lay
    return out


class CellState(NetworkState):
    """Any MindSpore network and optimizer, as MindSpore names their tensors.

    `network` is what the loss is computed by, or the whole train network (TrainOneStepCell,
    whose parameters include the optimizer's); `optimizer` may be None. `layouts` (e.g. from a
    strategy file) override; otherwise MindSpore's `parameter_layout_dict`, else replicated over
    `world` ranks. `map_pages`: a load may give the parameters the checkpoint file's pages
    (no copy) — only for a network no compiled graph has run yet (MindSpore's optimizers run
    their update as one: `NetworkState.map_pages`); by default it fills their own memory."""

    def __init__(self, network, optimizer=None, world: int = 1,
                 layouts: Optional[Mapping[str, TensorLayout]] = None, map_pages: bool = False):
        self.network, self.optimizer = network, optimizer
        self.map_pages = bool(map_pages)
        params: Dict[str, object] = {}
        for _, p in network.parameters_and_names():
            params.setdefault(p.name, p)
        opt_params: Dict[str, object] = {}
        if optimizer is not None:
            for p in optimizer.get_parameters() if hasattr(optimizer, "get_parameters") else []:
                opt_params.setdefault(p.name, p)
        weight_ids = {id(p) for p in getattr(optimizer, "parameters", [])} if optimizer else set()
        self._params = dict(params)
        for n, p in opt_params.items():
            self._params.setdefault(n, p)
        # weights: what the optimizer updates (or, without one, every non-state tensor)
        if weight_ids:
            self.weights = [n for n, p in self._params.items() if id(p) in weight_ids]
            extra = [n for n, p in params.items() if n not in set(self.weights)
                     and not is_optimizer_state(n) and not is_hyper(n)]
            self.weights += extra   # frozen weights the optimizer does not update
        else:
            self.weights = [n for n in self._params if not is_optimizer_state(n)
                            and not is_hyper(n)]
        self.optimizer_states = [n for n in self._params if n not in set(self.weights)]
        shapes = {n: tuple(p.shape) for n, p in self._params.items()}
        found: Dict[str, TensorLayout] = {}
        layout_dict = getattr(network, "parameter_layout_dict", None) or {}
        if layout_dict:
            found.update(layouts_from_parameter_layout_dict(layout_dict, shapes))
            # optimizer moments are laid out like their parameter, as MindSpore does
            for n in self.optimizer_states:
                for pre in OPTIMIZER_PREFIXES:
                    if n.startswith(pre) and n[len(pre):] in found:
                        found[n] = found[n[len(pre):]]
        if layouts:
            found.update({n: lay for n, lay in layouts.items() if n in shapes})
        self.layouts = {}
        for n, shape in shapes.items():
            if is_hyper(n):
                continue   # whole on every rank
            lay = found.get(n) or replicated_layout(shape, world)
            if lay.global_shape is None:
                lay = lay.with_local_shape(shape)
            self.layouts[n] = lay
        self.dtypes = {n: _st_dtype(p) for n, p in self._params.items()}

    def parameters(self) -> Dict[str, object]:
        return dict(self._params)

    def _reshape_ok(self, name, have, want) -> bool:
        return is_hyper(name) or len(want) <= 1   # a scalar counter saved as [1] or ()

    def _set(self, names: Iterable[str], arrays: Mapping[str, np.ndarray], strict: bool,
             what: str) -> List[str]:
        import mindspore as ms
        names = list(names)
        missing = [n for n in names if n not in arrays]
        if strict and missing:
            raise CheckpointError(f"{what}: {len(missing)} tensor(s) are not in the checkpoint "
                                  f"(e.g. {missing[:5]})")
        done = []
        for n in names:
            if n not in arrays:
                continue
            p = self._params[n]
            value = np.asarray(arrays[n])
            if value.size == int(np.prod(p.shape)) and tuple(value.shape) != tuple(p.shape) \
                    and (is_hyper(n) or value.ndim <= 1):
                value = value.reshape(tuple(p.shape))   # a scalar counter saved as [1] or ()
            if tuple(value.shape) != tuple(p.shape):
                raise CheckpointError(f"{what}: {n} has shape {tuple(value.shape)} in the "
                                      f"checkpoint, the network holds {tuple(p.shape)} on this rank")
            if value.dtype.name == "bfloat16":
                value = value.astype(np.float32)
            p.set_data(ms.Tensor(value).astype(p.dtype))
            done.append(n)
        return done

    def set_weights(self, arrays, strict=True):
        return self._set(self.weights, arrays, strict, "load_checkpoint")

    def set_optimizer_states(self, arrays, strict=True):
        return self._set(self.optimizer_states, arrays, strict, "optimizer state")
