"""Tiny Llama/Qwen2 checkpoints with Hugging Face names, written with numpy only."""
import json
import os

import ml_dtypes
import numpy as np

from mindformers_st.storage.writer import save_tensors


def hf_tensors(layers=2, hidden=16, heads=4, kv_heads=2, inter=24, vocab=32, bias=False,
               tied=False, dtype=np.float32, seed=0):
    """{HF name: array} of a random tiny Llama-family model (distinct values everywhere)."""
    rng = np.random.default_rng(seed)
    hd = hidden // heads

    def r(*shape):
        return rng.standard_normal(shape).astype(np.float32).astype(dtype)

    t = {"model.embed_tokens.weight": r(vocab, hidden), "model.norm.weight": r(hidden)}
    if not tied:
        t["lm_head.weight"] = r(vocab, hidden)
    for i in range(layers):
        p = f"model.layers.{i}."
        t[p + "self_attn.q_proj.weight"] = r(heads * hd, hidden)
        t[p + "self_attn.k_proj.weight"] = r(kv_heads * hd, hidden)
        t[p + "self_attn.v_proj.weight"] = r(kv_heads * hd, hidden)
        t[p + "self_attn.o_proj.weight"] = r(hidden, heads * hd)
        if bias:
            t[p + "self_attn.q_proj.bias"] = r(heads * hd)
            t[p + "self_attn.k_proj.bias"] = r(kv_heads * hd)
            t[p + "self_attn.v_proj.bias"] = r(kv_heads * hd)
        t[p + "mlp.gate_proj.weight"] = r(inter, hidden)
        t[p + "mlp.up_proj.weight"] = r(inter, hidden)
        t[p + "mlp.down_proj.weight"] = r(hidden, inter)
        t[p + "input_layernorm.weight"] = r(hidden)
        t[p + "post_attention_layernorm.weight"] = r(hidden)
    return t


def write_hf_folder(folder, tensors, shards=2, config=None):
    """Write `tensors` as HF shards (`model-0000k-of-0000n.safetensors` + index) and config.json."""
    os.makedirs(folder, exist_ok=True)
    names = list(tensors)
    per = -(-len(names) // shards)
    weight_map = {}
    for k in range(shards):
        part = names[k * per:(k + 1) * per]
        fname = f"model-{k + 1:05d}-of-{shards:05d}.safetensors"
        save_tensors(os.path.join(folder, fname), {n: tensors[n] for n in part},
                     metadata={"format": "pt"}, checksums=False)
        weight_map.update({n: fname for n in part})
    total = sum(a.nbytes for a in tensors.values())
    with open(os.path.join(folder, "model.safetensors.index.json"), "w") as fh:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, fh)
    if config is not None:
        with open(os.path.join(folder, "config.json"), "w") as fh:
            json.dump(config, fh)
    return folder


def hf_config(family="llama", layers=2, hidden=16, heads=4, kv_heads=2, inter=24, vocab=32,
              tied=False, dtype="float32"):
    """A config.json dict as transformers 5 writes it for these sizes."""
    return {
        "architectures": ["LlamaForCausalLM" if family == "llama" else "Qwen2ForCausalLM"],
        "model_type": family, "hidden_size": hidden, "intermediate_size": inter,
        "num_hidden_layers": layers, "num_attention_heads": heads,
        "num_key_value_heads": kv_heads, "vocab_size": vocab, "rms_norm_eps": 1e-5,
        "rope_parameters": {"rope_theta": 500000.0, "rope_type": "default"},
        "max_position_embeddings": 128, "tie_word_embeddings": tied, "dtype": dtype,
        "hidden_act": "silu",
    }


def read_folder(folder):
    """{name: array} of every *.safetensors file in `folder` (bf16 as ml_dtypes.bfloat16)."""
    from mindformers_st.storage.writer import load_tensors
    out = {}
    for f in sorted(os.listdir(folder)):
        if f.endswith(".safetensors"):
            out.update(load_tensors(os.path.join(folder, f)))
    return out


BF16 = ml_dtypes.bfloat16


def as_hub_cache(folder, cache_root, repo="models--org--tiny", revision="abc123"):
    """Lay `folder`'s files out as the Hugging Face hub cache does: the bytes in
    `{cache_root}/{repo}/blobs/<sha256>`, the snapshot `{repo}/snapshots/{revision}/` holding
    relative symlinks `name -> ../../blobs/<sha256>`. Returns the snapshot folder."""
    import hashlib
    repo_dir = os.path.join(str(cache_root), repo)
    snap = os.path.join(repo_dir, "snapshots", revision)
    os.makedirs(snap)
    os.makedirs(os.path.join(repo_dir, "blobs"), exist_ok=True)
    for name in sorted(os.listdir(folder)):
        with open(os.path.join(folder, name), "rb") as fh:
            data = fh.read()
        sha = hashlib.sha256(data).hexdigest()
        with open(os.path.join(repo_dir, "blobs", sha), "wb") as fh:
            fh.write(data)
        os.symlink(os.path.join("..", "..", "blobs", sha), os.path.join(snap, name))
    return snap
