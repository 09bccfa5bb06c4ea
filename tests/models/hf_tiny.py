"""Tiny `transformers` Llama/Qwen2 checkpoints for the features a loader can silently drop (RoPE
scaling, biases, explicit head_dim), saved as HF folders, and transformers' greedy tokens.

Weights are sharpened (q/k scaled, biases random) so that positions and biases decide the
greedy tokens: a loader ignoring the feature generates other tokens (the tests check it does).
"""
import json
import os

import numpy as np

VOCAB = 128
MAX_POS = 16          # generation runs past it, where dynamic NTK changes the frequencies
PROMPT = [1, 17, 99, 3, 42, 8, 64]
NEW_TOKENS = 20

ROPES = {
    "default": {"rope_theta": 10000.0},
    "linear": {"rope_theta": 10000.0, "rope_scaling": {"type": "linear", "factor": 4.0}},
    "dynamic": {"rope_parameters": {"rope_type": "dynamic", "rope_theta": 10000.0,
                                    "factor": 4.0}},
    "llama3": {"rope_theta": 10000.0,
               "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                "high_freq_factor": 4.0, "original_max_position_embeddings": 8}},
}


def config_json(rope="default", family="llama", biases=False, head_dim=None, tied=False,
                dtype="float32"):
    """A config.json dict (transformers 4 or 5 rope form as in ROPES)."""
    cfg = {"architectures": ["LlamaForCausalLM" if family == "llama" else "Qwen2ForCausalLM"],
           "model_type": family, "vocab_size": VOCAB, "hidden_size": 32,
           "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
           "num_key_value_heads": 2, "rms_norm_eps": 1e-5, "max_position_embeddings": MAX_POS,
           "tie_word_embeddings": tied, "hidden_act": "silu", "torch_dtype": dtype,
           "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}
    if family == "llama":
        cfg.update(attention_bias=biases, mlp_bias=biases)
    if head_dim:
        cfg["head_dim"] = head_dim
    cfg.update(json.loads(json.dumps(ROPES[rope])))
    return cfg


def build(torch, transformers, cfg, seed=0):
    """A transformers model for `cfg` with sharpened, information-carrying weights (fp32)."""
    torch.manual_seed(seed)
    conf = transformers.AutoConfig.for_model(cfg["model_type"], **{
        k: v for k, v in cfg.items() if k not in ("model_type", "torch_dtype")})
    model = transformers.AutoModelForCausalLM.from_config(conf).float().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("q_proj.weight", "k_proj.weight")):
                p.mul_(12.0)      # peaked attention: positions matter
            elif name.endswith(("v_proj.weight", "o_proj.weight")):
                p.mul_(10.0)      # attention outweighs the residual stream
            elif name.endswith("bias"):
                p.normal_(0.0, 0.5)
    return model


def save(torch, model, folder, dtype="float32"):
    """save_pretrained in several shards, in `dtype`; returns the folder."""
    model.to(getattr(torch, dtype)).save_pretrained(folder, safe_serialization=True,
                                                    max_shard_size="40KB")
    model.float()
    return folder


def hf_greedy(torch, transformers, folder, prompt=PROMPT, new_tokens=NEW_TOKENS, eos=None):
    """transformers' greedy tokens (prompt + new) from the saved folder, computed in float32
    (a bf16 checkpoint's values are exactly representable; our CPU matmuls are float32 too)."""
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    model.generation_config.eos_token_id = eos
    model.generation_config.pad_token_id = 0
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=new_tokens, do_sample=False,
                             min_new_tokens=0 if eos is not None else new_tokens)
    return [int(t) for t in out[0]]


def write_word_tokenizer(folder):
    """A word-level tokenizer.json: "<unk>" 0, "<s>" 1, "</s>" 2, then "w3".."w127"; the
    post-processor prepends <s>. Returns the text whose ids are PROMPT."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, VOCAB)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tok.save(os.path.join(folder, "tokenizer.json"))
    return " ".join(f"w{i}" for i in PROMPT[1:])


def to_numpy(arrays):
    """{name: float32 numpy} of a dict of numpy arrays (bf16 upcast)."""
    return {k: np.asarray(v, np.float32) for k, v in arrays.items()}
