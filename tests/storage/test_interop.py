"""Files we write open in safetensors and MindSpore, and theirs open in ours, bit for bit (bf16 included)."""
import ml_dtypes
import numpy as np
import pytest
import safetensors.numpy
from safetensors import safe_open

from mindformers_st.storage import load_tensors, open_safetensors, save_tensors, verify_checksums


def _tensors():
    rng = np.random.default_rng(0)
    return {
        "model.layers.0.attention.wq.weight": rng.standard_normal((8, 6)).astype(ml_dtypes.bfloat16),
        "model.norm_out.weight": rng.standard_normal(6).astype(np.float32),
        "model.layers.0.feed_forward.w2.weight": rng.standard_normal((6, 4)).astype(np.float16).T,  # strided
        "global_step": np.array(12, np.int64),
        "mask": rng.integers(0, 2, (3, 3)).astype(np.bool_),
    }


def _same_bits(a, b):
    # by name: once MindSpore is imported it registers a second numpy "bfloat16" type, equal in
    # bits but not in identity to ml_dtypes'
    assert str(a.dtype) == str(b.dtype) and a.dtype.itemsize == b.dtype.itemsize
    assert a.shape == b.shape
    assert np.ascontiguousarray(a).tobytes() == np.ascontiguousarray(b).tobytes()


def test_safetensors_reads_our_files_bit_for_bit(tmp_path):
    tensors = _tensors()
    path = save_tensors(tmp_path / "ours.safetensors", tensors, metadata={"format": "ms"})
    loaded = safetensors.numpy.load_file(path)
    for name, arr in tensors.items():
        _same_bits(loaded[name], arr)
    with safe_open(path, framework="np") as f:
        assert f.metadata()["format"] == "ms" and "checksums" in f.metadata()
        wq = f.get_tensor("model.layers.0.attention.wq.weight")
        assert wq.view(np.uint16).tolist() == tensors["model.layers.0.attention.wq.weight"].view(np.uint16).tolist()


def test_we_read_files_safetensors_writes_bit_for_bit(tmp_path):
    tensors = {k: np.ascontiguousarray(v) for k, v in _tensors().items()}  # save_file ignores strides
    path = str(tmp_path / "theirs.safetensors")
    safetensors.numpy.save_file(tensors, path, metadata={"k": "v"})
    with open_safetensors(path) as f:
        assert f.metadata == {"k": "v"}
        assert verify_checksums(f) == []     # nothing recorded, nothing to fail
        for name, arr in tensors.items():
            _same_bits(f.read(name), arr)
        block = f.read("model.layers.0.attention.wq.weight", (2, 3), (4, 3))
        _same_bits(block, tensors["model.layers.0.attention.wq.weight"][2:6, 3:6])


def test_mindspore_loads_our_files_bit_for_bit(tmp_path):
    ms = pytest.importorskip("mindspore")
    tensors = _tensors()
    path = save_tensors(tmp_path / "ours.safetensors", tensors, metadata={"format": "ms"})
    params = ms.load_checkpoint(path, format="safetensors")
    assert set(params) == set(tensors)
    for name, arr in tensors.items():
        got = params[name].asnumpy()
        _same_bits(got.view(np.uint16) if arr.dtype == ml_dtypes.bfloat16 else got,
                   arr.view(np.uint16) if arr.dtype == ml_dtypes.bfloat16 else arr)


def test_we_read_files_mindspore_writes_bit_for_bit(tmp_path):
    ms = pytest.importorskip("mindspore")
    tensors = {k: np.ascontiguousarray(v) for k, v in _tensors().items()}
    path = str(tmp_path / "theirs.safetensors")
    ms.save_checkpoint([{"name": k, "data": ms.Tensor(v)} for k, v in tensors.items()], path,
                       format="safetensors")
    with open_safetensors(path) as f:
        assert f.metadata.get("format") == "ms"
        for name, arr in tensors.items():
            _same_bits(f.read(name), arr)
    assert load_tensors(path)["global_step"] == 12
