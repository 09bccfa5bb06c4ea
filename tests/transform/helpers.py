"""Tiny real checkpoints for the transform tests: a global numpy model saved the ways training
saves it (complete, or rank_x/ with our slice metadata, with or without remove_redundancy)."""
from __future__ import annotations

import json
import os
from typing import Dict, Mapping, Optional

import ml_dtypes
import numpy as np

from mindformers_st.layout.owners import assign_owners
from mindformers_st.layout.param_table import ParamSpec, ParamTable
from mindformers_st.layout.parallel_config import ParallelConfig, plan_layouts
from mindformers_st.records.names import parse_step_arg
from mindformers_st.records.rank_meta import RankFileMeta, save_id_of
from mindformers_st.storage.index import read_index
from mindformers_st.storage.reader import open_safetensors
from mindformers_st.storage.writer import save_tensors

NP = {"F32": np.float32, "BF16": ml_dtypes.bfloat16, "F16": np.float16}


def tiny_table(dtype: str = "F32", layers: int = 2, hidden: int = 8, vocab: int = 16,
               inter: int = 12) -> ParamTable:
    """A Llama-shaped table small enough to check by eye: row- and column-split weights, a
    vocab-parallel embedding, replicated norms, `layers` layers for pipeline stages."""
    params = [ParamSpec("model.tok_embeddings.embedding_weight", (vocab, hidden), dtype, 0, True, -1)]
    for i in range(layers):
        p = f"model.layers.{i}."
        params += [ParamSpec(p + "attention.wq.weight", (hidden, hidden), dtype, 0, False, i),
                   ParamSpec(p + "attention.wo.weight", (hidden, hidden), dtype, 1, False, i),
                   ParamSpec(p + "feed_forward.w1.weight", (inter, hidden), dtype, 0, False, i),
                   ParamSpec(p + "feed_forward.w2.weight", (hidden, inter), dtype, 1, False, i),
                   ParamSpec(p + "attention_norm.weight", (hidden,), dtype, None, False, i)]
    params += [ParamSpec("model.norm_out.weight", (hidden,), dtype, None, False, layers),
               ParamSpec("lm_head.weight", (vocab, hidden), dtype, 0, True, layers)]
    return ParamTable(tuple(params), layers)


def make_globals(table: ParamTable, seed: int = 0) -> Dict[str, np.ndarray]:
    """Distinct random values for every parameter (so a misplaced block shows)."""
    rng = np.random.default_rng(seed)
    return {p.name: rng.standard_normal(p.shape).astype(np.float32).astype(NP[p.dtype])
            for p in table}


HYPER = {"global_step": np.array([30], dtype=np.int32), "epoch_num": np.array(2, dtype=np.int64)}


def save_distributed(folder: str, values: Mapping[str, np.ndarray], table: ParamTable,
                     pc: ParallelConfig, remove_redundancy: bool = False, metadata: bool = True,
                     prefix: str = "checkpoint", suffix: str = "2_30",
                     run_id: Optional[str] = None) -> dict:
    """Write `values` as training would under `pc`: rank_{r}/{prefix}_rank_{r}-{suffix}.safetensors
    (with `run_id`, each file carries the save identity training gives it). Returns the layouts."""
    layouts = plan_layouts(table, pc)
    owners = (assign_owners(layouts, {p.name: p.dtype for p in table})
              if remove_redundancy else None)
    for r in range(pc.world_size):
        tensors, slices = {}, {}
        for name, lay in layouts.items():
            if r not in lay.ranks():
                continue
            sl = lay.slice_for(r)
            if owners is not None and owners[(name, sl)] != r:
                continue
            tensors[name] = np.ascontiguousarray(values[name][sl.index()])
            slices[name] = sl
        tensors.update(HYPER)
        meta = {"format": "ms", "remove_redundancy": str(remove_redundancy)}
        if metadata:
            epoch, step = parse_step_arg(suffix)
            meta = RankFileMeta(r, pc.world_size, slices, pc.to_json(), remove_redundancy,
                                epoch, step, run_id=run_id,
                                save_id=run_id and save_id_of(run_id, epoch, step)).to_metadata()
        os.makedirs(os.path.join(folder, f"rank_{r}"), exist_ok=True)
        save_tensors(os.path.join(folder, f"rank_{r}", f"{prefix}_rank_{r}-{suffix}.safetensors"),
                     tensors, meta)
    return layouts


def load_folder_tensors(folder: str) -> Dict[str, np.ndarray]:
    """Every tensor of a complete folder, via its index (and hyper_param.safetensors)."""
    index = read_index(folder)
    out = {}
    files = set(index.weight_map.values()) if index else set()
    if os.path.exists(os.path.join(folder, "hyper_param.safetensors")):
        files.add("hyper_param.safetensors")
    for f in sorted(files):
        with open_safetensors(os.path.join(folder, f)) as fh:
            for n in fh.tensors:
                out[n] = fh.read(n)
    return out


def load_rank(folder: str, rank: int):
    """(tensors, mindformers_st metadata) of a rank's single file."""
    d = os.path.join(folder, f"rank_{rank}")
    files = [f for f in os.listdir(d) if f.endswith(".safetensors")]
    assert len(files) == 1, files
    with open_safetensors(os.path.join(d, files[0])) as fh:
        meta = json.loads(fh.metadata["mindformers_st"]) if "mindformers_st" in fh.metadata else None
        return {n: fh.read(n) for n in fh.tensors}, meta


def assert_bit_exact(a: np.ndarray, b: np.ndarray, what: str = "") -> None:
    """Same dtype, shape and bytes."""
    assert a.dtype == b.dtype and a.shape == b.shape, (what, a.dtype, b.dtype, a.shape, b.shape)
    assert np.ascontiguousarray(a).tobytes() == np.ascontiguousarray(b).tobytes(), what


def assert_rank_files_match(folder: str, values, layouts, world: int,
                            remove_redundancy: bool = False) -> None:
    """Every rank file holds exactly its blocks of `values` (or, de-duplicated, each distinct
    block in one file), with metadata saying so."""
    seen = {}
    for r in range(world):
        tensors, meta = load_rank(folder, r)
        assert meta["rank"] == r and meta["remove_redundancy"] == remove_redundancy
        for name, js in meta["slices"].items():
            from mindformers_st.layout.slices import TensorSlice
            sl = TensorSlice.from_json(js)
            assert sl == layouts[name].slice_for(r)
            assert_bit_exact(tensors[name], values[name][sl.index()], f"rank {r} {name}")
            seen.setdefault(name, set()).add(sl)
        for h, v in HYPER.items():
            assert_bit_exact(tensors[h], v, h)
    for name, lay in layouts.items():
        assert seen.get(name) == set(lay.distinct_slices()), name
