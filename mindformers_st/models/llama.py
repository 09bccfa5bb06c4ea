"""The Llama-family causal LM (Llama 2/3, Qwen2) with explicit tensor parallelism, in MindSpore.

Reads top to bottom like the paper: embedding -> N x (RMSNorm, rotary GQA attention, residual,
RMSNorm, SwiGLU, residual) -> RMSNorm -> lm_head -> cross-entropy. The parallel pieces live in
`layers.py`. Parameter names are exactly MindSpore Transformers' (`model.layers.0.attention.wq.
weight`, `model.tok_embeddings.embedding_weight`, `lm_head.weight`, ...), and each rank holds
exactly the slice `plan_layouts(llama_param_table(cfg), ctx.config)` gives it; the constructor
checks this. Weights start from global tensors generated from (seed, name), so every layout
starts from the same model.
"""
from __future__ import annotations

import dataclasses
import hashlib
import logging
from typing import Dict, List, Mapping, Optional, Tuple

import numpy as np
import mindspore as ms
from mindspore import Parameter, Tensor, nn, ops

from ..errors import CheckpointError, ConfigError, LayoutError
from ..layout.param_table import ParamTable
from ..layout.slices import TensorSlice
from ..parallel.comm import CopyToModelParallel, ms_dtype
from .config import LlamaConfig
from .layers import (Attention, ColumnParallelLinear, FeedForward, RMSNorm, VocabEmbedding,
                     VocabParallelCrossEntropy, rotary_cos_sin)
from .param_table import llama_param_table
from .rope import inv_freq as rope_inv_freq

logger = logging.getLogger(__name__)

NEG_INF = -1e9   # additive mask value; finite so fully padded rows stay NaN-free

KVCache = List[Tuple[Tensor, Tensor]]
EMBEDDING = "model.tok_embeddings.embedding_weight"


def global_init(name: str, shape: Tuple[int, ...], seed: int, std: float) -> np.ndarray:
    """The initial GLOBAL value of parameter `name`, a pure function of (seed, name, shape).

    Norm weights are ones, biases zeros, everything else normal(0, std). The per-parameter seed
    is a SHA-256 of "seed:name", so values do not depend on creation order or on the layout.
    """
    if name.endswith("norm.weight") or name.endswith("norm_out.weight"):
        return np.ones(shape, np.float32)
    if name.endswith(".bias"):
        return np.zeros(shape, np.float32)
    key = int.from_bytes(hashlib.sha256(f"{seed}:{name}".encode()).digest()[:8], "little")
    return np.random.default_rng(key).normal(0.0, std, size=shape).astype(np.float32)


class DecoderLayer(nn.Cell):
    """x + attn(norm(x)), then h + ffn(norm(h))."""

    def __init__(self, cfg: LlamaConfig, mp: int, group, param_dtype, compute_dtype):
        super().__init__()
        self.attention_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, param_dtype)
        self.attention = Attention(cfg, mp, group, param_dtype, compute_dtype)
        self.ffn_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, param_dtype)
        self.feed_forward = FeedForward(cfg, mp, group, param_dtype, compute_dtype)

    def construct(self, x, cos, sin, mask, past=None):
        attn, present = self.attention(self.attention_norm(x), cos, sin, mask, past)
        h = x + attn
        return h + self.feed_forward(self.ffn_norm(h)), present


class StageLayers(nn.Cell):
    """The decoder layers of one pipeline stage, named by their GLOBAL index (`layers.2.` on
    the second of two stages of a 4-layer model), as the checkpoint names them."""

    def __init__(self, layers: Mapping[int, nn.Cell]):
        super().__init__()
        for index, layer in layers.items():
            self.insert_child_to_cell(str(index), layer)

    def __iter__(self):
        return iter(self._cells.values())


class LlamaModel(nn.Cell):
    """Embedding, decoder layers and final norm (MindSpore Transformers' `model.` prefix).

    Under pipeline parallelism a stage holds only its share: the embedding on the first stage,
    `layer_ids` (its contiguous run of layers), the final norm on the last; `construct` then
    takes the previous stage's hidden state instead of token ids and returns this stage's
    hidden state (normed only on the last stage)."""

    def __init__(self, cfg: LlamaConfig, split_vocab: bool, mp_rank: int, mp: int, group,
                 param_dtype, compute_dtype, layer_ids=None, first: bool = True,
                 last: bool = True):
        super().__init__()
        self.first, self.last = first, last
        if first:
            self.tok_embeddings = VocabEmbedding(cfg.vocab_size, cfg.hidden_size, split_vocab,
                                                 mp_rank, mp, group, param_dtype, compute_dtype)
        ids = range(cfg.num_layers) if layer_ids is None else layer_ids
        if first and last:
            self.layers = nn.CellList([DecoderLayer(cfg, mp, group, param_dtype, compute_dtype)
                                       for _ in ids])
        else:
            self.layers = StageLayers({i: DecoderLayer(cfg, mp, group, param_dtype,
                                                       compute_dtype) for i in ids})
        if last:
            self.norm_out = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, param_dtype)

    def construct(self, inputs, cos, sin, mask, cache=None):
        h = self.tok_embeddings(inputs) if self.first else inputs
        presents = []
        for i, layer in enumerate(self.layers):
            h, present = layer(h, cos, sin, mask, None if cache is None else cache[i])
            presents.append(present)
        return (self.norm_out(h) if self.last else h), presents


class LlamaForCausalLM(nn.Cell):
    """Causal LM. `construct(input_ids, labels=None) -> loss` as MindSpore Transformers:

    input_ids [B, seq_length+1]; the model reads tokens[:, :-1] and predicts labels[:, 1:]
    (labels default to input_ids). Tokens equal to pad_token_id and labels equal to
    ignore_token_id do not count; the loss is the mean over counted tokens of this rank's
    batch (data parallel averages it across dp in TrainStep).
    """

    def __init__(self, cfg: LlamaConfig, ctx):
        super().__init__()
        pc = ctx.config
        mp = pc.model_parallel
        if cfg.num_heads % mp or cfg.n_kv_heads % mp:
            raise LayoutError(f"num_heads {cfg.num_heads} and n_kv_heads {cfg.n_kv_heads} must "
                              f"both be divisible by model_parallel {mp} (heads are not split)")
        self.cfg, self.ctx = cfg, ctx
        self.mp, self.mp_rank = mp, ctx.mp_rank
        group = ctx.mp_group
        # MatMul on CPU supports float32 only (measured): bf16/fp16 parameters are kept in
        # their dtype and computed in float32 there.
        self.param_dtype = ms_dtype(cfg.param_init_type)
        compute = cfg.compute_dtype if ctx.device_target != "CPU" else "float32"
        if compute != cfg.compute_dtype:
            logger.warning("config key 'model.model_config.compute_dtype' = %r has no effect on "
                           "CPU: MatMul there computes in float32", cfg.compute_dtype)
        self.compute_dtype = ms_dtype(compute)
        split_vocab = (not pc.vocab_emb_dp) and mp > 1
        self.split_vocab = split_vocab
        if cfg.embedding_init_type not in (None, cfg.param_init_type):
            raise ConfigError(f"model_config.embedding_init_type {cfg.embedding_init_type!r} "
                              f"differs from param_init_type {cfg.param_init_type!r}; this model "
                              "keeps one parameter dtype (leave embedding_init_type unset)")
        self._table = llama_param_table(cfg)
        self._layouts = ctx.layouts(self._table)
        # Pipeline stages: this rank builds only the parameters the layout puts on its stage
        # (layout.parallel_config.stage_of), so saves and loads line up with the plan.
        self.num_stages, self.stage = pc.pipeline_stage, ctx.coords[0]
        self.is_first, self.is_last = self.stage == 0, self.stage == self.num_stages - 1
        stage_names = {n for n, lay in self._layouts.items() if lay.stage == self.stage}
        layer_ids = sorted({p.layer for p in self._table
                            if p.name in stage_names and 0 <= p.layer < cfg.num_layers})
        self.model = LlamaModel(cfg, split_vocab, self.mp_rank, mp, group, self.param_dtype,
                                self.compute_dtype, layer_ids, self.is_first, self.is_last)
        self.tied = cfg.tie_word_embeddings
        self.lm_enter = CopyToModelParallel(group if split_vocab else None)
        if not self.tied and self.is_last:
            self.lm_head = ColumnParallelLinear(cfg.hidden_size, cfg.vocab_size,
                                                mp if split_vocab else 1, False,
                                                self.param_dtype, self.compute_dtype)
        self.loss_fn = VocabParallelCrossEntropy(split_vocab, self.mp_rank, mp, group)
        self._params = {p.name: p for p in self.get_parameters()}
        self._check_and_init(ctx.seed)
        if self.tied and self.num_stages > 1 and EMBEDDING in self.opt_sharded:
            raise LayoutError("tie_word_embeddings with pipeline_stage > 1 and an optimizer-"
                              "sharded embedding is not supported (the last stage's lm_head "
                              "gradient would be added to a shard); set optimizer_shard False")

    # ---- parameters, slices and numpy access -------------------------------------------
    def param_table(self) -> ParamTable:
        """The global parameter table (`llama_param_table(cfg)`)."""
        return self._table

    def layouts(self):
        """Every parameter's TensorLayout under this model's ParallelConfig."""
        return self._layouts

    def local_slices(self) -> Dict[str, TensorSlice]:
        """name -> the slice of the global tensor this rank holds."""
        return {n: self._layouts[n].slice_for(self.ctx.rank) for n in self._params}

    def get_local_params(self) -> Dict[str, np.ndarray]:
        """name -> this rank's slice as numpy (bf16 as ml_dtypes.bfloat16), a copy."""
        return {n: np.array(p.asnumpy()) for n, p in self._params.items()}

    def set_local_params(self, arrays: Mapping[str, np.ndarray], strict: bool = True) -> List[str]:
        """Assign this rank's slices from `arrays` (cast to each parameter's dtype).

        CheckpointError for a shape mismatch, or (strict) for missing or unexpected names.
        Returns the names that were set."""
        missing = sorted(set(self._params) - set(arrays))
        unexpected = sorted(set(arrays) - set(self._params))
        if strict and (missing or unexpected):
            raise CheckpointError(f"set_local_params: missing {missing[:8]}{'...' if len(missing) > 8 else ''}, "
                                  f"unexpected {unexpected[:8]}; the checkpoint does not match "
                                  f"this model config")
        done = []
        for name, value in arrays.items():
            if name not in self._params:
                continue
            param = self._params[name]
            if tuple(value.shape) != tuple(param.shape):
                raise CheckpointError(f"set_local_params: {name} has shape {tuple(value.shape)}, "
                                      f"this rank holds {tuple(param.shape)} "
                                      f"({self._layouts[name].slice_for(self.ctx.rank)})")
            param.set_data(Tensor(np.asarray(value, np.float32)).astype(param.dtype))
            done.append(name)
        return done

    def _check_and_init(self, seed: int) -> None:
        """Fail loudly if names or shapes disagree with plan_layouts; shard parameters the
        optimizer shard cuts; init every slice from its global tensor (seed, name)."""
        names = set(self._params)
        expected = {p.name for p in self._table if self._layouts[p.name].stage == self.stage}
        if names != expected:
            raise LayoutError(f"model parameters differ from llama_param_table (stage "
                              f"{self.stage}): extra "
                              f"{sorted(names - expected)}, missing {sorted(expected - names)}")
        specs = self._table.by_name()
        self.opt_sharded = set()
        owners = {id(p): (cell, attr) for _, cell in self.cells_and_names()
                  for attr, p in cell._params.items()}
        for name, param in self._params.items():
            layout = self._layouts[name]
            sl = layout.slice_for(self.ctx.rank)
            block = dataclasses.replace(layout, opt_weight_shard_step=0,
                                        opt_weight_shard_size=0).slice_for(self.ctx.rank)
            if tuple(block.sizes) != tuple(param.shape):
                raise LayoutError(f"{name}: this model holds {tuple(param.shape)} but "
                                  f"plan_layouts gives rank {self.ctx.rank} {block}")
            full = global_init(name, specs[name].shape, seed, self.cfg.initializer_range)
            value = Tensor(np.ascontiguousarray(full[sl.index()])).astype(param.dtype)
            if sl != block:
                # a NEW Parameter of the shard's shape: set_data with another shape leaves
                # MindSpore's autograd expecting the old shape (measured)
                cell, attr = owners[id(param)]
                setattr(cell, attr, Parameter(value, name=name))
                if getattr(cell, attr).name != name:
                    raise LayoutError(f"{name}: re-created shard parameter got the name "
                                      f"{getattr(cell, attr).name!r}")
                self._attach_gather(name, layout, sl, block, cell, attr)
            else:
                param.set_data(value)
        self._params = {p.name: p for p in self.get_parameters()}

    def _attach_gather(self, name, layout, sl, block, cell, attr) -> None:
        """Optimizer shard: the parameter keeps rows `sl` of its block; forward gathers them."""
        from ..parallel.comm import GatherOptimizerShard
        unsharded = dataclasses.replace(layout, opt_weight_shard_step=0, opt_weight_shard_size=0)
        group_ranks = unsharded.replica_group(self.ctx.rank)
        n = layout.opt_shard_count
        if n != len(group_ranks):
            raise LayoutError(f"{name}: optimizer shard of {n} parts over a replica group of "
                              f"{len(group_ranks)} ranks cannot be executed; use a shard size "
                              "equal to the group")
        stage, _, mp_idx = self.ctx.coords
        dp, mp = self.ctx.config.data_parallel, self.ctx.config.model_parallel
        dp_ranks = tuple(stage * dp * mp + i * mp + mp_idx for i in range(dp))
        if group_ranks == dp_ranks:
            group = self.ctx.dp_group
        elif len(group_ranks) == self.ctx.world_size:
            group = self.ctx.world_group
        else:
            raise LayoutError(f"{name}: optimizer-shard group {group_ranks} is neither the dp "
                              "group nor the whole world; no communication group exists for it")
        setattr(cell, attr + "_gather", GatherOptimizerShard(
            group, n, sl.offsets[0] - block.offsets[0], block.sizes[0]))
        self.opt_sharded.add(name)

    # ---- forward -----------------------------------------------------------------------
    def inv_freq(self, seq_len: int) -> np.ndarray:
        """The rotary inverse frequencies for a forward whose longest position is seq_len - 1
        (extend_method / scaling_factor applied; only DYNAMIC_NTK depends on seq_len)."""
        c = self.cfg
        return rope_inv_freq(c.head_dim, c.theta, c.extend_method, c.scaling_factor, seq_len)

    def shared_lm_weight(self) -> Optional[Tensor]:
        """Tied embeddings under pipeline parallelism: the first stage's embedding block (this
        mp rank's vocab rows, float32) on every stage of this (dp, mp) position, by an
        all-reduce over `pp_group` where the other stages add zeros; the last stage uses it as
        lm_head. None when the weights are not tied or there is one stage. Every stage of the
        group must call it at the same point (it is a collective)."""
        if not (self.tied and self.num_stages > 1):
            return None
        if self.is_first:
            w = self.model.tok_embeddings._full("embedding_weight").astype(ms.float32)
        else:
            rows = self.cfg.vocab_size // (self.mp if self.split_vocab else 1)
            w = ops.zeros((rows, self.cfg.hidden_size), ms.float32)
        return ops.AllReduce(group=self.ctx.pp_group)(w)

    def _lm_weight(self):
        if self.tied:
            return self.model.tok_embeddings._full("embedding_weight")
        return self.lm_head._full("weight")

    def forward_hidden(self, inputs: Tensor, attention_mask: Optional[np.ndarray] = None,
                       position_ids: Optional[np.ndarray] = None,
                       cache: Optional[KVCache] = None) -> Tuple[Tensor, KVCache]:
        """This stage's decoder part: token ids [B, S] (first stage) or the previous stage's
        hidden state [B, S, H] in, hidden state [B, S, H] out (after the final norm on the last
        stage), and the KV cache of this stage's layers extended by these tokens.

        attention_mask [B, past+S] (1 = real token) covers the cached and the new tokens;
        position_ids [B, S] default to past + arange(S). On one stage this is the whole model."""
        b, s = inputs.shape[0], inputs.shape[1]
        past = 0 if not cache else int(cache[0][0].shape[2])
        if position_ids is None:
            position_ids = np.broadcast_to(np.arange(past, past + s), (b, s))
        position_ids = np.asarray(position_ids)
        cos, sin = rotary_cos_sin(position_ids, self.inv_freq(int(position_ids.max()) + 1))
        mask = _additive_mask(b, s, past, attention_mask)
        return self.model(inputs, cos, sin, mask, cache)

    def logits_of(self, h: Tensor, lm_weight: Optional[Tensor] = None) -> Tensor:
        """Logits of this rank's vocab shard [B, S, V/mp] (V if not split) in float32 from the
        last stage's normed hidden state; `lm_weight` is the tied embedding a last stage got
        from `shared_lm_weight` (None: this model's own lm_head or embedding)."""
        h = self.lm_enter(h)
        w = (self._lm_weight() if lm_weight is None else lm_weight).astype(self.compute_dtype)
        return ops.matmul(h.astype(self.compute_dtype), w.T).astype(ms.float32)

    def forward_logits(self, input_ids: Tensor, attention_mask: Optional[np.ndarray] = None,
                       position_ids: Optional[np.ndarray] = None,
                       cache: Optional[KVCache] = None) -> Tuple[Tensor, KVCache]:
        """Logits of this rank's vocab shard [B, S, V/mp] (V if not split) in float32.

        attention_mask [B, past+S] (1 = real token) covers the cached and the new tokens;
        position_ids [B, S] default to past + arange(S). Returns the logits and the KV cache
        extended by these tokens (pass it back for incremental decoding). One stage only
        (pipeline stages run `forward_hidden` each and `logits_of` on the last)."""
        h, presents = self.forward_hidden(input_ids, attention_mask, position_ids, cache)
        return self.logits_of(h), presents

    def loss_of(self, logits: Tensor, input_ids: Tensor, labels=None) -> Tensor:
        """The mean cross-entropy over counted tokens of logits [B, S-1, V/mp] predicting
        input_ids [B, S] (or labels) shifted by one (see the class docstring)."""
        b, s = input_ids.shape
        tokens = input_ids[:, :s - 1]
        labels = input_ids[:, 1:] if labels is None else labels[:, 1:]
        flat_labels = labels.reshape(-1).astype(ms.int32)
        per_token = self.loss_fn(logits.reshape(b * (s - 1), -1), flat_labels)
        weight = ops.logical_and(tokens.reshape(-1) != self.cfg.pad_token_id,
                                 flat_labels != self.cfg.ignore_token_id).astype(ms.float32)
        return (per_token * weight).sum() / ops.maximum(weight.sum(), 1.0)

    def stage_construct(self, hidden_in, input_ids, labels=None, lm_weight=None):
        """The training forward of this pipeline stage on one micro-batch: the first stage reads
        input_ids (hidden_in is ignored), the others the previous stage's hidden state
        [B, S-1, H]; the last stage returns the loss (with `lm_weight`, the tied embedding from
        `shared_lm_weight`, as lm_head), the others their hidden state."""
        s = input_ids.shape[1]
        inputs = input_ids[:, :s - 1] if self.is_first else hidden_in
        h, _ = self.forward_hidden(inputs)
        if not self.is_last:
            return h
        return self.loss_of(self.logits_of(h, lm_weight), input_ids, labels)

    def construct(self, input_ids, labels=None):
        if self.num_stages > 1:
            raise LayoutError("a pipeline stage is not the whole model: train it with "
                              "trainer.step.TrainStep (which runs the pipeline schedule)")
        s = input_ids.shape[1]
        logits, _ = self.forward_logits(input_ids[:, :s - 1])
        return self.loss_of(logits, input_ids, labels)


def _additive_mask(b: int, s: int, past: int, attention_mask: Optional[np.ndarray]) -> Tensor:
    """[B, 1, S, past+S] float32: 0 where query i may see key j (j <= past+i and key real)."""
    total = past + s
    causal = np.arange(total)[None, :] <= (past + np.arange(s))[:, None]       # [S, T]
    allowed = np.broadcast_to(causal, (b, s, total))
    if attention_mask is not None:
        am = np.asarray(attention_mask).astype(bool)
        if am.shape != (b, total):
            raise ValueError(f"attention_mask shape {am.shape}, expected {(b, total)}")
        allowed = allowed & am[:, None, :]
    return Tensor(np.where(allowed, 0.0, NEG_INF).astype(np.float32)[:, None])
