"""Real Hugging Face models: save_pretrained -> convert-hf -> export-hf -> from_pretrained.

Needs the `hf` extra (torch, transformers): `pip install -e .[hf]`. Skipped without it.
"""
import json
import os

import pytest

torch = pytest.importorskip(
    "torch", reason="torch is not installed; `pip install -e .[hf]` to run the Hugging Face "
                    "round-trip tests")
transformers = pytest.importorskip(
    "transformers", reason="transformers is not installed; `pip install -e .[hf]` to run the "
                           "Hugging Face round-trip tests")

from mindformers_st.convert import convert_hf_folder, export_hf_folder  # noqa: E402

from .helpers import read_folder  # noqa: E402

# importing torch + transformers alone takes ~10 s on 2 cores
pytestmark = pytest.mark.slow

SIZES = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
             max_position_embeddings=64, rms_norm_eps=1e-5)


def _model(kind, heads, kv, tied, dtype):
    torch.manual_seed(0)
    if kind == "llama":
        cfg = transformers.LlamaConfig(num_attention_heads=heads, num_key_value_heads=kv,
                                       tie_word_embeddings=tied, **SIZES)
        model = transformers.LlamaForCausalLM(cfg)
    else:
        cfg = transformers.Qwen2Config(num_attention_heads=heads, num_key_value_heads=kv,
                                       tie_word_embeddings=tied, **SIZES)
        model = transformers.Qwen2ForCausalLM(cfg)
        with torch.no_grad():   # HF initialises biases to zero; make them carry information
            for layer in model.model.layers:
                for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                    proj.bias.normal_()
    return model.to(dtype).eval()


@pytest.mark.parametrize("kind,heads,kv,tied,dtype,fused", [
    ("llama", 4, 4, False, "float32", False),   # Llama 2: MHA
    ("llama", 4, 2, False, "bfloat16", True),   # Llama 3: GQA, qkv_concat
    ("qwen2", 4, 2, True, "float32", True),     # Qwen2: q/k/v biases, tied embeddings
    ("qwen2", 4, 1, False, "bfloat16", False),
])
def test_hf_model_converts_and_exports_back_to_the_same_model(tmp_path, kind, heads, kv, tied,
                                                              dtype, fused):
    model = _model(kind, heads, kv, tied, getattr(torch, dtype))
    hf = str(tmp_path / "hf")
    model.save_pretrained(hf, safe_serialization=True, max_shard_size="20KB")
    shards = sorted(f for f in os.listdir(hf) if f.endswith(".safetensors"))
    assert len(shards) > 1

    ms, back = str(tmp_path / "ms"), str(tmp_path / "back")
    res = convert_hf_folder(hf, ms, qkv_concat=fused, progress=False)
    assert res.family == kind
    assert sorted(f for f in os.listdir(ms) if f.endswith(".safetensors")) == shards
    export_hf_folder(ms, back, res.model_config, progress=False)

    orig, got = read_folder(hf), read_folder(back)
    assert got.keys() == orig.keys()
    for n in orig:
        assert got[n].dtype == orig[n].dtype and got[n].tobytes() == orig[n].tobytes(), n
    with open(os.path.join(back, "config.json")) as fh:
        assert json.load(fh)["model_type"] == kind

    # The reference is the original folder loaded the same way: an in-memory model moved to
    # bf16 with .to() also casts its RoPE inv_freq buffer, which from_pretrained never does.
    original = transformers.AutoModelForCausalLM.from_pretrained(hf, dtype=getattr(torch, dtype))
    loaded = transformers.AutoModelForCausalLM.from_pretrained(back, dtype=getattr(torch, dtype))
    assert type(loaded) is type(model)
    for (n, p), (m, q) in zip(original.state_dict().items(), loaded.state_dict().items()):
        assert n == m and torch.equal(p, q), n
    ids = torch.tensor([[1, 5, 9, 33, 2, 63, 7]])
    with torch.no_grad():
        want, have = original.eval()(ids).logits, loaded.eval()(ids).logits
    assert torch.equal(want, have)
    if dtype == "float32":   # and the same function as the model we started from
        with torch.no_grad():
            assert torch.equal(model(ids).logits, have)
