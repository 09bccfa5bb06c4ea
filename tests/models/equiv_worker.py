"""Worker for test_parallel_equivalence: train 3 steps + greedy-generate a tiny Llama, dump results.

Run on one card (`python equiv_worker.py OUT 1 1 1`) or under msrun with dp*mp workers
(`msrun ... equiv_worker.py OUT DP MP VOCAB_EMB_DP [OPTIMIZER_SHARD]`; several layouts of that
world size: `OUT DP MP VOCAB_EMB_DP OPTIMIZER_SHARD OUT2 DP2 MP2 ...`, run one after the other). Every rank writes OUT/rank_<r>.json
(losses, lr, grad norms, generated tokens) and OUT/rank_<r>.npz (its parameter slices, with
their offsets) so the test can rebuild global tensors and compare layouts.
"""
import json
import os
import sys

import numpy as np

from mindformers_st.layout.parallel_config import ParallelConfig
from mindformers_st.models.config import LlamaConfig
from mindformers_st.models.llama import LlamaForCausalLM
from mindformers_st.parallel.context import init_parallel
from mindformers_st.trainer.generate import generate
from mindformers_st.trainer.lr import build_lr_schedule
from mindformers_st.trainer.optim import build_optimizer
from mindformers_st.trainer.step import TrainStep

TINY = dict(vocab_size=256, hidden_size=64, num_layers=2, num_heads=4, n_kv_heads=2,
            intermediate_size=128, seq_length=32, qkv_has_bias=True, pad_token_id=0)
# the first variant adds Llama's o_proj and MLP biases (row-parallel wo/w2 biases replicated and
# added after the all-reduce) and dynamic NTK RoPE active within seq_length; the second covers
# tied embeddings (lm_head = the, possibly vocab-split, table) and MHA; the third the fused
# qkv_concat weights (w_qkv and w_gate_hidden with biases), a head_dim wider than hidden/heads
# and Llama 3.1 RoPE scaling
LLAMA3 = {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 8}
VARIANTS = {"gqa_bias": dict(TINY, attn_proj_has_bias=True, mlp_has_bias=True,
                             extend_method="DYNAMIC_NTK",
                             scaling_factor={"factor": 4.0,
                                             "original_max_position_embeddings": 16}),
            "tied_mha": dict(TINY, n_kv_heads=4, qkv_has_bias=False, tie_word_embeddings=True),
            "fused": dict(TINY, qkv_concat=True, attn_proj_has_bias=True, mlp_has_bias=True,
                          head_dim=24, extend_method="LLAMA3", scaling_factor=LLAMA3)}
GLOBAL_BATCH, STEPS = 4, 3


def main(out, dp, mp, vocab_emb_dp, optimizer_shard=False):
    pc = ParallelConfig(data_parallel=dp, model_parallel=mp, vocab_emb_dp=vocab_emb_dp,
                        optimizer_shard=optimizer_shard)
    ctx = init_parallel(pc, use_parallel=dp * mp > 1, device_target="CPU", seed=1234)
    for variant, model_config in VARIANTS.items():
        run_variant(out, ctx, variant, LlamaConfig.from_dict(model_config))


def run_variant(out, ctx, variant, cfg, clip_norm=1.0, sample=True):
    """Train STEPS steps of GLOBAL_BATCH rows and greedy-generate (and sample, if `sample`);
    write this rank's record (losses, lrs, grad norms, tokens, its place in the layout) and its
    parameter and optimizer-state slices with their offsets. Shared with pp_worker.py."""
    model = LlamaForCausalLM(cfg, ctx)
    # random non-zero biases so the bias code paths are exercised by the comparison
    params = model.get_local_params()
    for name, sl in model.local_slices().items():
        if name.endswith(".bias"):
            full = np.random.default_rng(7).normal(0, 0.1, sl.global_shape).astype(np.float32)
            params[name] = full[sl.index()]
    model.set_local_params(params)
    sched = build_lr_schedule({"type": "CosineWithWarmUpLR", "learning_rate": 1e-3,
                               "lr_end": 1e-5, "warmup_steps": 1}, STEPS + 2)
    opt = build_optimizer(model, {"type": "AdamW", "betas": [0.9, 0.95], "eps": 1e-8,
                                  "weight_decay": 0.1}, sched)
    step = TrainStep(model, opt, ctx, clip_norm=clip_norm)
    rng = np.random.default_rng(42)
    record = {"losses": [], "lrs": [], "grad_norms": []}
    for _ in range(STEPS):
        batch = rng.integers(1, cfg.vocab_size, (GLOBAL_BATCH, cfg.seq_length + 1))
        record["losses"].append(step(ctx.local_batch(batch)))
        record["lrs"].append(step.last_lr)
        record["grad_norms"].append(step.last_grad_norm)
    record["tokens"] = generate(model, ctx, [[3, 17, 42, 99], [5, 6], [200, 1, 2]],
                               max_new_tokens=4, pad_token_id=0)
    if sample:
        record["sampled"] = generate(model, ctx, [[3, 17, 42, 99]], max_new_tokens=4,
                                    do_sample=True, top_k=20, top_p=0.9, temperature=0.8, seed=5)
    record.update(rank=ctx.rank, dp_rank=ctx.dp_rank, mp_rank=ctx.mp_rank, stage=ctx.stage)
    arrays = {}
    for name, sl in model.local_slices().items():
        arrays[name] = np.asarray(model.get_local_params()[name], np.float32)
        arrays["offsets:" + name] = np.array(sl.offsets, np.int64)
        arrays["shape:" + name] = np.array(sl.global_shape, np.int64)
    for name, value in opt.get_state_arrays().items():
        if name != "global_step":   # a counter, not a slice (no offsets)
            arrays[name] = value
    np.savez(os.path.join(out, f"{variant}_rank_{ctx.rank}.npz"), **arrays)
    with open(os.path.join(out, f"{variant}_rank_{ctx.rank}.json"), "w") as f:
        json.dump(record, f)


if __name__ == "__main__":
    # several layouts of the same world size: repeat the 5 arguments (run one after the other)
    args = sys.argv[1:]
    for i in range(0, len(args), 5):
        main(args[i], int(args[i + 1]), int(args[i + 2]), args[i + 3] in ("1", "True", "true"),
             len(args) > i + 4 and args[i + 4] in ("1", "True", "true"))
