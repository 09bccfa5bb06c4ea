"""Worker for test_pipeline: train a tiny Llama 3 steps with pipeline stages, dump results.

`python pp_worker.py OUT 1 1 1 MB` on one card, or under msrun with dp*mp*pp workers
(`msrun ... pp_worker.py OUT DP MP PP MB [OPTIMIZER_SHARD]`). Every rank writes OUT/<variant>_rank_<r>.json
(losses, grad norms, lrs, greedy tokens) and OUT/<variant>_rank_<r>.npz (its parameter and moment slices with their
offsets, as equiv_worker does) so the test can rebuild the global tensors.
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

# 4 layers: on 2 stages the second holds model.layers.2 and .3 (global names), with the bias
# code paths of equiv_worker's first variant
TINY = dict(vocab_size=256, hidden_size=64, num_layers=4, num_heads=4, n_kv_heads=2,
            intermediate_size=128, seq_length=16, qkv_has_bias=True, attn_proj_has_bias=True,
            pad_token_id=0)
GLOBAL_BATCH, STEPS = 4, 3


# the second variant ties lm_head to the embedding: the table lives on stage 0 and is used on
# stage 1 too (sent there each step, its gradient sent back)
VARIANTS = {"untied": TINY, "tied": dict(TINY, tie_word_embeddings=True)}


def main(out, dp, mp, pp, micro, optimizer_shard=0):
    pc = ParallelConfig(data_parallel=dp, model_parallel=mp, pipeline_stage=pp,
                        micro_batch_num=micro, vocab_emb_dp=mp == 1,
                        optimizer_shard=bool(optimizer_shard))
    ctx = init_parallel(pc, use_parallel=dp * mp * pp > 1, device_target="CPU", seed=1234)
    for variant, model_config in VARIANTS.items():
        run_variant(out, ctx, variant, LlamaConfig.from_dict(model_config))


def run_variant(out, ctx, variant, cfg):
    model = LlamaForCausalLM(cfg, ctx)
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
    # clip 0.05: below the measured norms, so clipping with the cross-stage norm is exercised
    step = TrainStep(model, opt, ctx, clip_norm=0.05)
    rng = np.random.default_rng(42)
    record = {"losses": [], "lrs": [], "grad_norms": []}
    for _ in range(STEPS):
        batch = rng.integers(1, cfg.vocab_size, (GLOBAL_BATCH, cfg.seq_length + 1))
        record["losses"].append(step(ctx.local_batch(batch)))
        record["lrs"].append(step.last_lr)
        record["grad_norms"].append(step.last_grad_norm)
    record["tokens"] = generate(model, ctx, [[3, 17, 42, 99], [5, 6], [200, 1, 2]],
                               max_new_tokens=4, pad_token_id=0)
    record.update(rank=ctx.rank, stage=ctx.stage)
    arrays = {}
    for name, sl in model.local_slices().items():
        arrays[name] = np.asarray(model.get_local_params()[name], np.float32)
        arrays["offsets:" + name] = np.array(sl.offsets, np.int64)
        arrays["shape:" + name] = np.array(sl.global_shape, np.int64)
    for name, value in opt.get_state_arrays().items():
        if name != "global_step":
            arrays[name] = value
    np.savez(os.path.join(out, f"{variant}_rank_{ctx.rank}.npz"), **arrays)
    with open(os.path.join(out, f"{variant}_rank_{ctx.rank}.json"), "w") as f:
        json.dump(record, f)


if __name__ == "__main__":
    main(sys.argv[1], *(int(a) for a in sys.argv[2:]))
