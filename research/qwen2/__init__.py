"""Qwen2 for run_mindformer.py --register_path research/qwen2: the Llama family with q/k/v
biases, optional tied embeddings, and Qwen2's defaults (rope theta 1e6, rms eps 1e-6).

Importing this package registers `Qwen2ForCausalLM` (model.arch.type) and `Qwen2Config`
(model.model_config.type) in mindformers_st.models.registry.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Union

from mindformers_st.models.config import LlamaConfig
from mindformers_st.models.llama import LlamaForCausalLM
from mindformers_st.models.registry import register_model


@dataclass
class Qwen2Config(LlamaConfig):
    """LlamaConfig with Qwen2's defaults: biases on q/k/v, theta 1e6, eps 1e-6, Qwen2 tokens."""

    qkv_has_bias: bool = True
    theta: float = 1000000.0
    rms_norm_eps: float = 1e-6
    bos_token_id: int = 151643
    eos_token_id: Union[int, List[int]] = 151645
    pad_token_id: int = 151643
    type: str = "Qwen2Config"


@register_model("Qwen2ForCausalLM", Qwen2Config)
class Qwen2ForCausalLM(LlamaForCausalLM):
    """Qwen2 causal LM: MindSpore Transformers' Llama names plus `attention.w{q,k,v}.bias`."""
