"""Hugging Face Llama checkpoints as people use them today (RoPE scaling, attention/MLP biases,
explicit head_dim, Qwen2.5): a `transformers` model saved with save_pretrained, converted by
convert-hf and run by our model on one card, generates transformers' greedy tokens; dropping the
feature would not; and export-hf gives back the same bytes and the same rope settings.
"""
import json
import os

import pytest

from mindformers_st.convert import convert_hf_folder, export_hf_folder
from mindformers_st.layout.parallel_config import ParallelConfig
from mindformers_st.models.config import LlamaConfig
from mindformers_st.models.llama import LlamaForCausalLM
from mindformers_st.parallel.context import init_parallel
from mindformers_st.trainer.generate import generate

from ..convert.helpers import read_folder
from . import hf_tiny
from .hf_tiny import NEW_TOKENS, PROMPT

torch = pytest.importorskip("torch", reason="torch not installed")
transformers = pytest.importorskip("transformers", reason="transformers not installed")


def our_greedy(model_config, params, drop=None):
    """Greedy tokens of our one-card model; `drop` replaces model_config keys (the ablation)."""
    mc = dict(model_config, seq_length=64, **(drop or {}))
    ctx = init_parallel(ParallelConfig(), False, "CPU", seed=0)
    model = LlamaForCausalLM(LlamaConfig.from_dict(mc), ctx)
    model.set_local_params(hf_tiny.to_numpy(params), strict=drop is None)
    return generate(model, ctx, [PROMPT], NEW_TOKENS)[0]


# (rope, family, biases, head_dim, tied, dtype, qkv_concat, the model_config keys that drop it)
CASES = [
    ("linear", "llama", False, None, False, "float32", False,
     {"extend_method": "None", "scaling_factor": 1.0}),
    ("linear", "llama", False, None, True, "bfloat16", False,
     {"extend_method": "None", "scaling_factor": 1.0}),
    ("dynamic", "llama", False, None, False, "float32", False,
     {"extend_method": "None", "scaling_factor": 1.0}),
    ("dynamic", "llama", False, None, True, "bfloat16", True,
     {"extend_method": "None", "scaling_factor": 1.0}),
    ("llama3", "llama", False, None, True, "float32", False,
     {"extend_method": "None", "scaling_factor": 1.0}),
    ("llama3", "llama", False, None, False, "bfloat16", False,
     {"extend_method": "None", "scaling_factor": 1.0}),
    ("default", "llama", True, None, False, "float32", False,
     {"qkv_has_bias": False, "attn_proj_has_bias": False, "mlp_has_bias": False}),
    ("default", "llama", True, None, True, "bfloat16", True,
     {"qkv_has_bias": False, "attn_proj_has_bias": False, "mlp_has_bias": False}),
    ("llama3", "llama", True, 12, False, "bfloat16", True,
     {"extend_method": "None", "scaling_factor": 1.0}),
    ("default", "qwen2", True, None, True, "bfloat16", False,    # a Qwen2.5 folder
     {"qkv_has_bias": False}),
]


@pytest.mark.parametrize("rope,family,biases,head_dim,tied,dtype,fused,drop", CASES)
def test_converted_checkpoint_generates_transformers_greedy_tokens(
        tmp_path, rope, family, biases, head_dim, tied, dtype, fused, drop):
    cfg = hf_tiny.config_json(rope, family, biases, head_dim, tied, dtype)
    if family == "qwen2":   # as Qwen2.5 ships it: a window that is not used
        cfg.update(sliding_window=131072, use_sliding_window=False, max_window_layers=21)
    hf = hf_tiny.save(torch, hf_tiny.build(torch, transformers, cfg), str(tmp_path / "hf"), dtype)
    want = hf_tiny.hf_greedy(torch, transformers, hf)

    ms = str(tmp_path / "ms")
    res = convert_hf_folder(hf, ms, qkv_concat=fused, progress=False)
    assert res.family == family
    params = read_folder(ms)
    assert our_greedy(res.model_config, params) == want
    # the feature decides the tokens: a loader that ignored it would generate others
    if any(k.endswith("has_bias") for k in drop):
        params = {n: v for n, v in params.items() if not n.endswith(".bias")}
    assert our_greedy(res.model_config, params, drop) != want

    # HF -> MindSpore -> HF: the same tensors, bit for bit, and the same rope settings
    back = str(tmp_path / "back")
    export_hf_folder(ms, back, res.model_config, progress=False)
    orig, got = read_folder(hf), read_folder(back)
    assert got.keys() == orig.keys()
    for n in orig:
        assert got[n].dtype == orig[n].dtype and got[n].tobytes() == orig[n].tobytes(), n
    with open(os.path.join(back, "config.json")) as fh:
        exported = json.load(fh)
    def rope_of(folder):   # as transformers reads it (a legacy `type` duplicates rope_type)
        params = dict(transformers.AutoConfig.from_pretrained(folder).rope_parameters)
        params.pop("type", None)
        return params
    assert rope_of(back) == rope_of(hf)
    if family == "llama":
        assert (exported["attention_bias"], exported["mlp_bias"]) == (biases, biases)
    assert hf_tiny.hf_greedy(torch, transformers, back) == want
