"""Worker for test_pipeline: train a tiny Llama 3 steps with pipeline stages, dump results.

`python pp_worker.py OUT 1 1 1 MB` on one card, or under msrun with dp*mp*pp workers
(`msrun ... pp_worker.py OUT DP MP PP MB [OPTIMIZER_SHARD]`). Every rank writes OUT/<variant>_rank_<r>.json
(losses, grad norms, lrs, greedy tokens) and OUT/<variant>_rank_<r>.npz (its parameter and moment slices with their
offsets, as equiv_worker does) so the test can rebuild the global tensors. The run itself
(GLOBAL_BATCH rows, STEPS steps) is equiv_worker.run_variant's.
"""
import sys

from mindformers_st.layout.parallel_config import ParallelConfig
from mindformers_st.models.config import LlamaConfig
from mindformers_st.parallel.context import init_parallel

import equiv_worker  # noqa: E402  (same folder: the script's own directory is on sys.path)

# 4 layers: on 2 stages the second holds model.layers.2 and .3 (global names), with the bias
# code paths of equiv_worker's first variant
TINY = dict(vocab_size=256, hidden_size=64, num_layers=4, num_heads=4, n_kv_heads=2,
            intermediate_size=128, seq_length=16, qkv_has_bias=True, attn_proj_has_bias=True,
            pad_token_id=0)


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
    # clip 0.05: below the measured norms, so clipping with the cross-stage norm is exercised
    equiv_worker.run_variant(out, ctx, variant, cfg, clip_norm=0.05, sample=False)


if __name__ == "__main__":
    main(sys.argv[1], *(int(a) for a in sys.argv[2:]))
