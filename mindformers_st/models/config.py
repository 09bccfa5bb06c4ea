"""The Llama-family model config (YAML `model.model_config`), validated, without MindSpore.

Keys keep MindSpore Transformers' `LlamaConfig` names. `LlamaConfig.from_dict` rejects unknown
keys and wrong types with a `ConfigError` naming them; a few MindSpore Transformers keys that only
tune Ascend kernels are accepted and ignored (listed in `IGNORED_KEYS`, documented in
docs/models.md).
"""
from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, fields
from typing import Any, Dict, List, Optional, Union

from ..errors import ConfigError
from .rope import check_rope

logger = logging.getLogger(__name__)

DTYPES = ("float32", "float16", "bfloat16")

# MindSpore Transformers LlamaConfig keys we accept so their YAML files load unchanged, but that
# do not change what this implementation computes (Ascend kernels, paged attention, recompute...).
IGNORED_KEYS = frozenset({
    "use_flash_attention", "use_paged_attention", "block_size", "num_blocks", "use_past_shard",
    "is_dynamic", "use_rope_slice", "fine_grain_interleave", "offset", "pp_interleave_num", "parallel_decoding_params", "use_ring_attention",
    "use_attn_mask_compression", "use_eod_attn_mask_compression", "input_sliced_sig",
    "rmsnorm_compute_2d", "chunk_prefill", "calculate_per_token_loss", "fused_rms_norm",
    "max_position_embedding", "quant_config", "tie_word_embeddings_type",
})

# LlamaConfig fields this runtime validates but does not act on: warned by name when set to
# anything but their default (never silently ignored).
NO_EFFECT_FIELDS = {
    "layernorm_compute_type": "RMSNorm computes in float32",
    "softmax_compute_type": "attention softmax computes in float32",
    "rotary_dtype": "rotary embeddings compute in float32",
    "use_past": "generation always uses a KV cache (same tokens)",
    "batch_size": "the batch is runner_config.batch_size / predict_batch_size",
    "bos_token_id": "prompts are encoded as tokenizer.json says",
    "checkpoint_name_or_path": "weights are loaded from load_checkpoint only",
}


@dataclass
class LlamaConfig:
    """Hyper-parameters of a Llama-family causal LM (Llama 2/3, Qwen2 with `qkv_has_bias`).

    Defaults follow MindSpore Transformers' LlamaConfig except the dtypes, which default to
    float32 (the CPU backend). `intermediate_size=None` is derived as MindSpore Transformers
    does (4h*2/3, times `ffn_dim_multiplier`, rounded up to `multiple_of`). `head_dim=None`
    means hidden_size / num_heads. RoPE scaling is `extend_method` + `scaling_factor` (see
    `models/rope.py`); biases are `qkv_has_bias` (wq/wk/wv), `attn_proj_has_bias` (wo) and
    `mlp_has_bias` (w1/w2/w3), MindSpore Transformers' names.
    """

    vocab_size: int = 32000
    hidden_size: int = 4096
    num_layers: int = 32
    num_heads: int = 32
    n_kv_heads: Optional[int] = None
    head_dim: Optional[int] = None
    intermediate_size: Optional[int] = None
    multiple_of: int = 256
    ffn_dim_multiplier: Optional[float] = None
    rms_norm_eps: float = 1e-5
    theta: float = 10000.0
    extend_method: str = "None"
    scaling_factor: Union[float, Dict[str, Any]] = 1.0
    seq_length: int = 2048
    batch_size: int = 1
    qkv_has_bias: bool = False
    attn_proj_has_bias: bool = False
    mlp_has_bias: bool = False
    qkv_concat: bool = False
    tie_word_embeddings: bool = False
    compute_dtype: str = "float32"
    param_init_type: str = "float32"
    layernorm_compute_type: str = "float32"
    softmax_compute_type: str = "float32"
    rotary_dtype: str = "float32"
    embedding_init_type: Optional[str] = None
    initializer_range: float = 0.02
    use_past: bool = False
    do_sample: bool = False
    top_k: int = 5
    top_p: float = 1.0
    temperature: float = 1.0
    repetition_penalty: float = 1.0
    max_decode_length: int = 1024
    bos_token_id: int = 1
    eos_token_id: Union[int, List[int]] = 2
    pad_token_id: int = 0
    ignore_token_id: int = -100
    checkpoint_name_or_path: str = ""
    type: str = "LlamaConfig"

    def __post_init__(self):
        self._validate()
        if self.n_kv_heads is None:
            self.n_kv_heads = self.num_heads
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_heads
        if self.intermediate_size is None:
            inter = int(2 * (4 * self.hidden_size) / 3)
            if self.ffn_dim_multiplier is not None:
                inter = int(self.ffn_dim_multiplier * inter)
            self.intermediate_size = self.multiple_of * ((inter + self.multiple_of - 1)
                                                         // self.multiple_of)

    @property
    def eos_token_ids(self) -> List[int]:
        """`eos_token_id` as a list (Llama 3 configs may give several)."""
        e = self.eos_token_id
        return list(e) if isinstance(e, (list, tuple)) else [e]

    def to_dict(self) -> Dict[str, Any]:
        """All fields as a plain dict (round-trips through `from_dict`)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "LlamaConfig":
        """Build from a YAML `model.model_config` mapping.

        Raises ConfigError naming every unknown key and every value of the wrong type, and for
        inconsistent sizes (hidden_size not divisible by num_heads, ...).
        """
        if not isinstance(d, dict):
            raise ConfigError(f"model.model_config must be a mapping, got {type(d).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(k for k in d if k not in known and k not in IGNORED_KEYS)
        if unknown:
            raise ConfigError(
                f"model.model_config: unknown key(s) {unknown}; known keys are "
                f"{sorted(known)} (accepted and ignored: {sorted(IGNORED_KEYS)}). "
                "Fix the spelling or remove them.")
        for k in sorted(k for k in d if k in IGNORED_KEYS and d[k] not in (None, False, "", 0)):
            logger.warning("config key 'model.model_config.%s' = %r has no effect here: this "
                           "runtime does not implement it (docs/models.md)", k, d[k])
        defaults = cls.__dataclass_fields__
        for k, why in NO_EFFECT_FIELDS.items():
            if k in d and d[k] not in (None, "") and d[k] != defaults[k].default:
                logger.warning("config key 'model.model_config.%s' = %r has no effect here: %s",
                               k, d[k], why)
        return cls(**{k: v for k, v in d.items() if k in known})

    def _validate(self) -> None:
        problems = []
        for f in fields(self):
            value = getattr(self, f.name)
            if not _type_ok(value, f.type):
                problems.append(f"{f.name}={value!r} should be {f.type}")
        if problems:
            raise ConfigError("model.model_config has value(s) of the wrong type: "
                              + "; ".join(problems))
        for key in ("compute_dtype", "param_init_type", "layernorm_compute_type",
                    "softmax_compute_type", "rotary_dtype"):
            if getattr(self, key) not in DTYPES:
                raise ConfigError(f"model.model_config.{key}={getattr(self, key)!r}: "
                                  f"use one of {DTYPES}")
        if self.embedding_init_type is not None and self.embedding_init_type not in DTYPES:
            raise ConfigError(f"model.model_config.embedding_init_type="
                              f"{self.embedding_init_type!r}: use one of {DTYPES}")
        for key in ("vocab_size", "hidden_size", "num_layers", "num_heads", "seq_length"):
            if getattr(self, key) <= 0:
                raise ConfigError(f"model.model_config.{key} must be positive, "
                                  f"got {getattr(self, key)}")
        if self.head_dim is None and self.hidden_size % self.num_heads:
            raise ConfigError(f"model.model_config: hidden_size {self.hidden_size} is not "
                              f"divisible by num_heads {self.num_heads} (set head_dim when "
                              f"heads are not hidden_size / num_heads wide)")
        if self.head_dim is not None and self.head_dim <= 0:
            raise ConfigError(f"model.model_config.head_dim must be positive, got "
                              f"{self.head_dim}")
        kv = self.n_kv_heads if self.n_kv_heads is not None else self.num_heads
        if kv <= 0 or self.num_heads % kv:
            raise ConfigError(f"model.model_config: num_heads {self.num_heads} must be a "
                              f"multiple of n_kv_heads {kv}")
        head_dim = self.head_dim or self.hidden_size // self.num_heads
        if (head_dim % 2) != 0:
            raise ConfigError(f"model.model_config: head dim {head_dim} must be even "
                              "for rotary embeddings")
        check_rope(self.extend_method, self.scaling_factor, head_dim)


_TYPES = {"int": (int,), "float": (int, float), "bool": (bool,), "str": (str,)}


def _type_ok(value: Any, annotation: str) -> bool:
    """Check `value` against a field annotation written as a string (from __future__)."""
    ann = str(annotation).replace(" ", "")
    if ann.startswith("Optional["):
        if value is None:
            return True
        ann = ann[len("Optional["):-1]
    if ann == "Union[float,Dict[str,Any]]":
        return isinstance(value, dict) or (isinstance(value, (int, float))
                                           and not isinstance(value, bool))
    if ann == "Union[int,List[int]]":
        if isinstance(value, (list, tuple)):
            return all(isinstance(v, int) and not isinstance(v, bool) for v in value)
        ann = "int"
    allowed = _TYPES[ann]
    if isinstance(value, bool) and ann != "bool":
        return False
    return isinstance(value, allowed)
