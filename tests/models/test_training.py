"""Single-card trainer pieces: lr schedule, AdamW state and maths, TrainStep, generate."""
import numpy as np
import pytest

from mindformers_st.errors import ConfigError
from mindformers_st.layout.parallel_config import ParallelConfig
from mindformers_st.models.config import LlamaConfig
from mindformers_st.models.llama import LlamaForCausalLM
from mindformers_st.parallel.context import init_parallel
from mindformers_st.trainer.generate import _choose, generate
from mindformers_st.trainer.lr import build_lr_schedule
from mindformers_st.trainer.optim import build_optimizer
from mindformers_st.trainer.step import TrainStep

TINY = dict(vocab_size=128, hidden_size=32, num_layers=2, num_heads=4, n_kv_heads=2,
            intermediate_size=64, seq_length=16)


def make(seed=0, **over):
    ctx = init_parallel(ParallelConfig(), False, "CPU", seed=seed)
    return ctx, LlamaForCausalLM(LlamaConfig.from_dict({**TINY, **over}), ctx)


def test_cosine_with_warmup_follows_mindformers_formula():
    s = build_lr_schedule({"type": "CosineWithWarmUpLR", "learning_rate": 1e-3, "lr_end": 1e-5,
                           "warmup_ratio": 0.1, "total_steps": -1}, 100)
    assert s.warmup_steps == 10
    assert s.lr_at(0) == 0.0 and s.lr_at(5) == pytest.approx(5e-4)
    assert s.lr_at(10) == pytest.approx(1e-3)
    assert s.lr_at(55) == pytest.approx(1e-5 + (1e-3 - 1e-5) * 0.5)
    assert s.lr_at(100) == pytest.approx(1e-5) and s.lr_at(500) == pytest.approx(1e-5)
    d = build_lr_schedule({"type": "CosineWithWarmUpLR", "learning_rate": 1e-3,
                           "decay_steps": 10}, 100)
    assert d.lr_at(5) == pytest.approx(5e-4) and d.lr_at(10) == 0.0
    c = build_lr_schedule({"type": "ConstantWarmUpLR", "learning_rate": 2e-4, "warmup_steps": 2}, 9)
    assert [c.lr_at(i) for i in (0, 1, 2, 8)] == pytest.approx([0, 1e-4, 2e-4, 2e-4])


@pytest.mark.parametrize("cfg, word", [
    ({"type": "CosineWithWarmUpLR", "learning_rate": 1e-3, "warmup_rato": 0.1}, "warmup_rato"),
    ({"type": "Polynomial", "learning_rate": 1e-3}, "Polynomial"),
    ({"type": "CosineWithWarmUpLR", "learning_rate": "high"}, "learning_rate"),
    ({"type": "CosineWithWarmUpLR", "learning_rate": 1e-3, "warmup_steps": 50}, "warmup"),
])
def test_lr_config_errors_name_the_key(cfg, word):
    with pytest.raises(ConfigError, match=word):
        build_lr_schedule(cfg, 10)


def test_adamw_state_names_and_one_update_match_numpy():
    _, model = make()
    sched = build_lr_schedule({"type": "ConstantWarmUpLR", "learning_rate": 0.01,
                               "warmup_steps": 0}, 10)
    opt = build_optimizer(model, {"type": "AdamWeightDecay", "betas": [0.8, 0.9], "eps": 1e-6,
                                  "weight_decay": 0.5}, sched)
    state = opt.get_state_arrays()
    names = [p.name for p in model.trainable_params()]
    assert set(state) == {f"adam_{k}.{n}" for n in names for k in "mv"} | {"global_step"}
    before = model.get_local_params()
    rng = np.random.default_rng(0)
    from mindspore import Tensor
    grads = [rng.normal(0, 1, p.shape).astype(np.float32) for p in model.trainable_params()]
    assert opt([Tensor(g) for g in grads]) == pytest.approx(0.01)
    after = model.get_local_params()
    for name, g in zip(names, grads):
        m, v = 0.2 * g, 0.1 * g * g
        w = before[name] * (1 - 0.01 * 0.5 if before[name].ndim >= 2 else 1.0)
        want = w - 0.01 * (m / 0.2) / (np.sqrt(v / 0.1) + 1e-6)
        np.testing.assert_allclose(after[name], want, rtol=1e-5, atol=1e-6, err_msg=name)
    assert opt.get_state_arrays()["global_step"][0] == 1
    # a restored optimizer continues from the same state
    opt2 = build_optimizer(model, {"type": "AdamW"}, sched)
    opt2.set_state_arrays(opt.get_state_arrays())
    assert opt2.step_count == 1
    with pytest.raises(ConfigError, match="momentum"):
        build_optimizer(model, {"type": "AdamW", "momentum": 0.9}, sched)


def test_train_step_lowers_the_loss_and_clips_the_global_norm():
    ctx, model = make()
    sched = build_lr_schedule({"type": "ConstantWarmUpLR", "learning_rate": 3e-3,
                               "warmup_steps": 0}, 10)
    step = TrainStep(model, build_optimizer(model, {"type": "AdamW"}, sched), ctx, clip_norm=0.5)
    ids = np.random.default_rng(1).integers(1, 128, (2, 17))
    losses = [step(ids) for _ in range(4)]
    assert losses[-1] < losses[0] - 0.05
    assert step.last_lr == pytest.approx(3e-3) and step.step_count == 4
    assert step.last_grad_norm > 0.5          # reported before clipping


def test_gradient_accumulation_over_micro_batches_equals_one_big_batch():
    """k micro-batches of b rows then one update == one update on k*b rows (equal token counts,
    so the mean of micro-batch means is the batch mean)."""
    ids = np.random.default_rng(2).integers(1, 128, (4, 17))
    results = []
    for k in (1, 2):
        ctx, model = make()
        sched = build_lr_schedule({"type": "ConstantWarmUpLR", "learning_rate": 3e-3,
                                   "warmup_steps": 0}, 10)
        step = TrainStep(model, build_optimizer(model, {"type": "AdamW"}, sched), ctx,
                         clip_norm=1.0, accumulation_steps=k)
        losses = [step(ids) for _ in range(2)]
        results.append((losses, step.last_grad_norm, model.get_local_params()))
    (l1, n1, p1), (l2, n2, p2) = results
    assert l1 == pytest.approx(l2, rel=1e-5) and n1 == pytest.approx(n2, rel=1e-4)
    for name in p1:
        np.testing.assert_allclose(p1[name], p2[name], rtol=1e-4, atol=1e-6, err_msg=name)
    ctx, model = make()
    step = TrainStep(model, build_optimizer(model, {"type": "AdamW"}, sched), ctx,
                     accumulation_steps=3)
    with pytest.raises(ConfigError, match="gradient_accumulation_steps=3"):
        step(ids)


def test_accumulated_gradient_is_the_mean_of_the_micro_batch_gradients():
    """With unequal masking the big-batch mean differs from the mean of micro-batch means: the
    accumulated gradient is the latter, so micro-batches really run one by one."""
    rng = np.random.default_rng(3)
    ids = rng.integers(1, 128, (4, 17))
    labels = ids.copy()
    labels[:2, :12] = -100                       # the first micro-batch counts few tokens
    ctx, model = make()
    opt = build_optimizer(model, {"type": "AdamW"}, build_lr_schedule(
        {"type": "ConstantWarmUpLR", "learning_rate": 1e-3, "warmup_steps": 0}, 10))
    acc2 = TrainStep(model, opt, ctx, accumulation_steps=2)
    one = TrainStep(model, opt, ctx, accumulation_steps=1)
    loss2, g2 = acc2._accumulated_grads(ids, labels)
    la, ga = one._accumulated_grads(ids[:2], labels[:2])
    lb, gb = one._accumulated_grads(ids[2:], labels[2:])
    lfull, gfull = one._accumulated_grads(ids, labels)
    assert float(loss2.asnumpy()) == pytest.approx((float(la.asnumpy()) + float(lb.asnumpy())) / 2,
                                                   rel=1e-5)
    # float32 noise is ~1e-6 here; the two definitions differ by ~3e-3 on this data
    assert abs(float(loss2.asnumpy()) - float(lfull.asnumpy())) > 1e-4
    for x, a, b in zip(g2, ga, gb):
        np.testing.assert_allclose(x.asnumpy(), (a.asnumpy() + b.asnumpy()) / 2, rtol=1e-4, atol=1e-7)


def test_generate_greedy_batched_left_padding_equals_one_by_one_and_stops_at_eos():
    ctx, model = make(seed=11)
    prompts = [[5, 9, 33, 2, 7], [40], [1, 2, 3]]
    together = generate(model, ctx, prompts, max_new_tokens=5)
    alone = [generate(model, ctx, [p], max_new_tokens=5)[0] for p in prompts]
    assert together == alone
    assert [len(t) for t in together] == [10, 6, 8]
    eos = together[0][6]
    stopped = generate(model, ctx, [prompts[0]], max_new_tokens=5, eos_token_id=[eos, 999])
    assert stopped[0] == together[0][:7]


def test_sampling_is_seeded_and_filters_work():
    ctx, model = make(seed=11)
    a = generate(model, ctx, [[5, 9]], 6, do_sample=True, top_k=10, top_p=0.9, seed=4)
    b = generate(model, ctx, [[5, 9]], 6, do_sample=True, top_k=10, top_p=0.9, seed=4)
    assert a == b
    logits = np.array([[0.0, 5.0, 4.9, -1.0]])
    rng = np.random.default_rng(0)
    assert {int(_choose(logits, rng, True, 1, 1.0, 1.0)[0]) for _ in range(20)} == {1}
    # top_p: token 1 alone has mass ~0.51 < 0.6, so {1, 2} stay; never 0 or 3
    picks = {int(_choose(logits, rng, True, 0, 0.6, 1.0)[0]) for _ in range(50)}
    assert picks == {1, 2}


def test_repetition_penalty_matches_hugging_face():
    torch = pytest.importorskip("torch", reason="torch (the hf extra) is the reference here")
    from transformers import RepetitionPenaltyLogitsProcessor
    from mindformers_st.trainer.generate import _penalize_repeats

    rng = np.random.default_rng(4)
    logits = rng.standard_normal((2, 50)).astype(np.float32) * 3
    seqs = [[1, 5, 5, 7, 49], [0, 2, 3]]
    ours = _penalize_repeats(logits, seqs, 1.3)
    ref = RepetitionPenaltyLogitsProcessor(1.3)(
        torch.tensor([[1, 5, 5, 7, 49], [0, 2, 3, 3, 3]]), torch.tensor(logits)).numpy()
    np.testing.assert_allclose(ours, ref, rtol=1e-6)
    assert not np.allclose(ours, logits)


def test_generate_applies_the_repetition_penalty():
    ctx, model = make()
    prompt = [[3, 4, 5, 3, 4, 5]]
    plain = generate(model, ctx, prompt, 12)
    assert generate(model, ctx, prompt, 12, repetition_penalty=1.0) == plain
    # a huge penalty takes seen tokens' logits to ~0 (positive) or far below (negative); with
    # this seeded model some unseen token always beats them, so no token repeats
    fresh = generate(model, ctx, prompt, 4, repetition_penalty=1e9)[0][6:]
    assert len(set(fresh)) == len(fresh) and not set(fresh) & {3, 4, 5}
