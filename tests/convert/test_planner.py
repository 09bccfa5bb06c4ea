"""HF <-> MindSpore conversion plans, executed by the real engine on tiny files."""
import json
import os

import numpy as np
import pytest

from mindformers_st.convert import (convert_hf_folder, export_hf_folder, plan_convert_hf,
                                    plan_hf_folder)
from mindformers_st.convert.fuse import ffn_blocks, fuse_rows, qkv_blocks
from mindformers_st.convert.hf_config import hf_config_to_model_config
from mindformers_st.errors import ConversionError
from mindformers_st.storage.index import read_index
from mindformers_st.transform.sources import describe_complete

from .helpers import BF16, hf_config, hf_tensors, read_folder, write_hf_folder


def _same(a, b):
    assert set(a) == set(b)
    for n in a:
        assert a[n].dtype == b[n].dtype and a[n].shape == b[n].shape, n
        assert a[n].tobytes() == b[n].tobytes(), n


def _ms_config(cfg):
    return hf_config_to_model_config(cfg)


@pytest.mark.parametrize("family,heads,kv,dtype,fused,tied", [
    ("llama", 4, 4, np.float32, False, False),      # Llama 2 MHA
    ("llama", 4, 2, BF16, False, False),            # Llama 3 GQA, bf16
    ("llama", 4, 2, np.float32, True, False),       # GQA with qkv_concat
    ("qwen2", 4, 2, BF16, True, True),              # biases fused, tied embeddings
    ("qwen2", 4, 1, np.float32, False, True),
])
def test_hf_to_ms_to_hf_is_bit_identical(tmp_path, family, heads, kv, dtype, fused, tied):
    cfg = hf_config(family, heads=heads, kv_heads=kv, tied=tied,
                    dtype="bfloat16" if dtype is BF16 else "float32")
    tensors = hf_tensors(heads=heads, kv_heads=kv, bias=family == "qwen2", tied=tied, dtype=dtype)
    hf = write_hf_folder(str(tmp_path / "hf"), tensors, shards=3, config=cfg)
    ms = str(tmp_path / "ms")
    res = convert_hf_folder(hf, ms, qkv_concat=fused, progress=False)
    assert res.family == family
    assert sorted(f for f in os.listdir(ms) if f.endswith(".safetensors")) == \
        [f"model-0000{k}-of-00003.safetensors" for k in (1, 2, 3)]
    ms_tensors = read_folder(ms)
    index = read_index(ms, "ms")
    assert set(index.weight_map) == set(ms_tensors)
    # the MindSpore side holds the values at MindSpore names, fused in MindSpore's layouts
    wo = ms_tensors["model.layers.1.attention.wo.weight"]
    assert wo.tobytes() == tensors["model.layers.1.self_attn.o_proj.weight"].tobytes()
    if fused:
        q, k, v = (tensors[f"model.layers.0.self_attn.{x}_proj.weight"] for x in "qkv")
        want = fuse_rows([q, k, v], qkv_blocks(heads, kv, 16 // heads))
        assert ms_tensors["model.layers.0.attention.w_qkv.weight"].tobytes() == want.tobytes()
        g, u = tensors["model.layers.0.mlp.gate_proj.weight"], tensors["model.layers.0.mlp.up_proj.weight"]
        assert ms_tensors["model.layers.0.feed_forward.w_gate_hidden.weight"].tobytes() == \
            fuse_rows([g, u], ffn_blocks(24)).tobytes()
        assert "model.layers.0.attention.wq.weight" not in ms_tensors
    back = str(tmp_path / "back")
    export_hf_folder(ms, back, res.model_config, progress=False)
    _same(read_folder(back), tensors)
    with open(os.path.join(back, "model.safetensors.index.json")) as fh:
        assert json.load(fh)["weight_map"].keys() == tensors.keys()
    with open(os.path.join(back, "config.json")) as fh:
        out_cfg = json.load(fh)
    assert out_cfg["architectures"] == cfg["architectures"]
    assert out_cfg["num_key_value_heads"] == kv and out_cfg["tie_word_embeddings"] == tied


def test_fused_ffn_is_many_row_copies_not_a_buffer(tmp_path):
    """A fuse is a set of CopyOps: 3 per KV group for w_qkv, 2 per row for w_gate_hidden."""
    cfg = hf_config("llama", heads=4, kv_heads=2)
    hf = write_hf_folder(str(tmp_path / "hf"), hf_tensors(), shards=1, config=cfg)
    plan = plan_hf_folder(hf, qkv_concat=True).plan
    targets = {t.name: t for f in plan.files for t in f.tensors}
    assert len(targets["model.layers.0.attention.w_qkv.weight"].ops) == 3 * 2
    assert len(targets["model.layers.0.feed_forward.w_gate_hidden.weight"].ops) == 2 * 24
    assert plan.side_files[0][0] == "param_name_map.json"


def test_wrong_family_and_missing_tensors_fail_before_writing(tmp_path):
    tensors = hf_tensors(bias=True)
    hf = write_hf_folder(str(tmp_path / "hf"), tensors, config=hf_config("qwen2"))
    out = tmp_path / "out"
    with pytest.raises(ConversionError, match=r"q_proj\.bias.*--family qwen2"):
        convert_hf_folder(hf, str(out), family="llama", progress=False)
    assert not out.exists()

    llama = write_hf_folder(str(tmp_path / "llama"), hf_tensors(), config=hf_config("llama"))
    with pytest.raises(ConversionError, match="--family llama"):
        convert_hf_folder(llama, str(out), family="qwen2", progress=False)

    gone = hf_tensors()
    del gone["model.layers.1.mlp.up_proj.weight"]
    broken = write_hf_folder(str(tmp_path / "broken"), gone, config=hf_config("llama"))
    with pytest.raises(ConversionError, match=r"missing: 'model\.layers\.1\.mlp\.up_proj\.weight'"):
        convert_hf_folder(broken, str(out), progress=False)
    assert not out.exists()


def test_unknown_tensor_is_listed(tmp_path):
    tensors = hf_tensors()
    tensors["model.layers.0.self_attn.rotary_emb.inv_freq"] = np.ones(2, np.float32)
    hf = write_hf_folder(str(tmp_path / "hf"), tensors, config=hf_config("llama"))
    with pytest.raises(ConversionError, match="rotary_emb.inv_freq"):
        plan_hf_folder(hf)


def test_head_counts_that_do_not_fit_the_weights_are_refused(tmp_path):
    hf = write_hf_folder(str(tmp_path / "hf"), hf_tensors(heads=4, kv_heads=2),
                         config=hf_config("llama", heads=4, kv_heads=4))
    with pytest.raises(ConversionError, match="wk.weight has 8 rows"):
        plan_hf_folder(hf, qkv_concat=True)


def test_untied_config_without_lm_head_is_missing_a_tensor(tmp_path):
    hf = write_hf_folder(str(tmp_path / "hf"), hf_tensors(tied=True),
                         config=hf_config("llama", tied=False))
    with pytest.raises(ConversionError, match="lm_head.weight"):
        plan_hf_folder(hf)


def test_export_leaves_out_optimizer_states_and_rejects_unknown_names(tmp_path):
    from mindformers_st.storage.writer import save_tensors
    cfg = hf_config("llama")
    hf = write_hf_folder(str(tmp_path / "hf"), hf_tensors(), shards=1, config=cfg)
    ms = str(tmp_path / "ms")
    res = convert_hf_folder(hf, ms, progress=False)
    save_tensors(os.path.join(ms, "extra.safetensors"), {
        "adam_m.model.norm_out.weight": np.zeros(16, np.float32)})
    os.remove(os.path.join(ms, "param_name_map.json"))   # a folder of *.safetensors, no index
    out = str(tmp_path / "out")
    export_hf_folder(ms, out, res.model_config, progress=False)
    assert "adam_m.model.norm_out.weight" not in read_folder(out)
    save_tensors(os.path.join(ms, "odd.safetensors"), {"model.some_adapter.weight": np.zeros(2)})
    with pytest.raises(ConversionError, match="model.some_adapter.weight"):
        export_hf_folder(ms, str(tmp_path / "out2"), res.model_config, progress=False)


def test_export_refuses_a_yaml_that_contradicts_the_weights(tmp_path):
    hf = write_hf_folder(str(tmp_path / "hf"), hf_tensors(), config=hf_config("llama"))
    ms = str(tmp_path / "ms")
    res = convert_hf_folder(hf, ms, qkv_concat=True, progress=False)
    bad = dict(res.model_config, hidden_size=32)
    with pytest.raises(ConversionError, match="hidden_size=32"):
        export_hf_folder(ms, str(tmp_path / "o"), bad, progress=False)
    bad = dict(res.model_config, n_kv_heads=4)
    with pytest.raises(ConversionError, match="w_qkv"):
        export_hf_folder(ms, str(tmp_path / "o"), bad, progress=False)


def test_plan_convert_hf_needs_heads_for_qkv_concat(tmp_path):
    hf = write_hf_folder(str(tmp_path / "hf"), hf_tensors())
    with pytest.raises(ConversionError, match="num_heads"):
        plan_convert_hf(describe_complete(hf), "llama", qkv_concat=True)


def test_a_shard_emptied_by_fusing_renumbers_the_shards(tmp_path):
    """A shard holding only k/v loses them to q's shard when fused: "-of-0000n" must stay true."""
    from mindformers_st.storage.writer import save_tensors
    tensors = hf_tensors(layers=1)
    kv = {n: a for n, a in tensors.items() if "k_proj" in n or "v_proj" in n}
    hf = tmp_path / "hf"
    hf.mkdir()
    save_tensors(str(hf / "model-00001-of-00002.safetensors"),
                 {n: a for n, a in tensors.items() if n not in kv})
    save_tensors(str(hf / "model-00002-of-00002.safetensors"), kv)
    with open(hf / "config.json", "w") as fh:
        json.dump(hf_config("llama", layers=1), fh)
    convert_hf_folder(str(hf), str(tmp_path / "fused"), qkv_concat=True, progress=False)
    assert [f for f in os.listdir(tmp_path / "fused") if f.endswith(".safetensors")] == \
        ["model.safetensors"]
    convert_hf_folder(str(hf), str(tmp_path / "plain"), progress=False)
    assert sorted(f for f in os.listdir(tmp_path / "plain") if f.endswith(".safetensors")) == \
        ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]


def _llama_biases(tensors, layers=2, hidden=16, inter=24, mlp=True):
    """Add Llama attention_bias (q/k/v/o) and mlp_bias (gate/up/down) tensors."""
    rng = np.random.default_rng(7)
    for i in range(layers):
        p = f"model.layers.{i}."
        for name, rows in (("self_attn.q_proj", 16), ("self_attn.k_proj", 8),
                           ("self_attn.v_proj", 8), ("self_attn.o_proj", hidden)):
            tensors[p + name + ".bias"] = rng.standard_normal(rows).astype(np.float32)
        if mlp:
            for name, rows in (("mlp.gate_proj", inter), ("mlp.up_proj", inter),
                               ("mlp.down_proj", hidden)):
                tensors[p + name + ".bias"] = rng.standard_normal(rows).astype(np.float32)
    return tensors


@pytest.mark.parametrize("fused", [False, True])
def test_llama_attention_and_mlp_biases_round_trip_bit_identical(tmp_path, fused):
    tensors = _llama_biases(hf_tensors())
    cfg = dict(hf_config("llama"), attention_bias=True, mlp_bias=True)
    hf = write_hf_folder(str(tmp_path / "hf"), tensors, config=cfg)
    res = convert_hf_folder(hf, str(tmp_path / "ms"), qkv_concat=fused, progress=False)
    ms = read_folder(str(tmp_path / "ms"))
    assert "model.layers.1.attention.wo.bias" in ms
    if fused:
        gh = ms["model.layers.0.feed_forward.w_gate_hidden.bias"]
        np.testing.assert_array_equal(gh[0::2], tensors["model.layers.0.mlp.gate_proj.bias"])
        np.testing.assert_array_equal(gh[1::2], tensors["model.layers.0.mlp.up_proj.bias"])
    else:
        np.testing.assert_array_equal(ms["model.layers.1.feed_forward.w2.bias"],
                                      tensors["model.layers.1.mlp.down_proj.bias"])
    export_hf_folder(str(tmp_path / "ms"), str(tmp_path / "back"), res.model_config,
                     progress=False)
    back = read_folder(str(tmp_path / "back"))
    assert back.keys() == tensors.keys()
    for n, a in tensors.items():
        assert back[n].tobytes() == a.tobytes(), n


def test_biases_that_config_json_does_not_declare_are_refused(tmp_path):
    out = tmp_path / "out"
    quiet = write_hf_folder(str(tmp_path / "quiet"), _llama_biases(hf_tensors()),
                            config=hf_config("llama"))       # attention_bias/mlp_bias unset
    with pytest.raises(ConversionError, match="attention_bias, mlp_bias"):
        convert_hf_folder(quiet, str(out), progress=False)
    declared = write_hf_folder(str(tmp_path / "declared"), _llama_biases(hf_tensors(), mlp=False),
                               config=dict(hf_config("llama"), attention_bias=True, mlp_bias=True))
    with pytest.raises(ConversionError, match=r"missing: 'model\.layers\.0\.mlp\.gate_proj\.bias'"):
        convert_hf_folder(declared, str(out), progress=False)
    assert not out.exists()


def test_unsupported_config_is_refused_before_any_safetensors_file_is_opened(tmp_path):
    hf = write_hf_folder(str(tmp_path / "hf"), hf_tensors(),
                         config=dict(hf_config("llama"), num_local_experts=8))
    for f in os.listdir(hf):   # unreadable weights: only config.json may be looked at
        if f.endswith(".safetensors"):
            with open(os.path.join(hf, f), "wb") as fh:
                fh.write(b"\xff" * 16)
    with pytest.raises(ConversionError, match="num_local_experts"):
        plan_hf_folder(hf)
