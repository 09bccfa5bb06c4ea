"""One malformed header per rule: each is refused with SafetensorsFormatError naming file, tensor and rule."""
import json
import os

import pytest

from mindformers_st.errors import CheckpointError, SafetensorsFormatError
from mindformers_st.storage import open_safetensors, read_header


def _write(tmp_path, header, data=b"", name="bad.safetensors", length=None):
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    n = len(raw) if length is None else length
    path = tmp_path / name
    path.write_bytes(n.to_bytes(8, "little") + raw + data)
    return str(path)


def _refused(path, *patterns):
    with pytest.raises(SafetensorsFormatError) as info:
        open_safetensors(path)
    msg = str(info.value)
    assert path in msg
    for p in patterns:
        assert p in msg, msg
    with pytest.raises(SafetensorsFormatError):
        read_header(path)
    return msg


def _t(dtype="F32", shape=(2,), offsets=(0, 8)):
    return {"dtype": dtype, "shape": list(shape), "data_offsets": list(offsets)}


def test_a_valid_hand_made_file_opens(tmp_path):
    path = _write(tmp_path, {"__metadata__": {"k": "v"}, "a": _t(), "b": _t("U8", (0,), (8, 8))}, b"\0" * 8)
    with open_safetensors(path) as f:
        assert list(f.tensors) == ["a", "b"] and f.metadata == {"k": "v"}


def test_an_empty_file_is_refused(tmp_path):
    path = tmp_path / "empty.safetensors"
    path.write_bytes(b"")
    _refused(str(path), "0 bytes", "8-byte header length")


def test_a_file_shorter_than_the_length_prefix_is_refused(tmp_path):
    path = tmp_path / "short.safetensors"
    path.write_bytes(b"\x05\x00\x00")
    _refused(str(path), "3 bytes")


def test_a_header_length_of_2_pow_63_is_refused_without_reading(tmp_path):
    _refused(_write(tmp_path, b"{}", length=2 ** 63), str(2 ** 63), "exceeds the limit")


def test_a_header_longer_than_100_mb_is_refused(tmp_path):
    _refused(_write(tmp_path, b"{}", length=100_000_001), "exceeds the limit of 100000000")


def test_a_header_running_past_the_end_of_the_file_is_refused(tmp_path):
    _refused(_write(tmp_path, b"{}", length=50), "runs past the end", "truncated")


def test_a_zero_header_length_is_refused(tmp_path):
    _refused(_write(tmp_path, b"", length=0), "header length is 0")


def test_a_header_that_is_not_utf8_is_refused(tmp_path):
    _refused(_write(tmp_path, b'{"\xff": 1}'), "UTF-8")


def test_a_header_that_is_not_json_is_refused(tmp_path):
    _refused(_write(tmp_path, b'{"a": '), "not valid JSON")


def test_a_header_that_is_not_an_object_is_refused(tmp_path):
    _refused(_write(tmp_path, b"[1, 2]"), "must start with '{'")


def test_duplicate_keys_are_refused(tmp_path):
    raw = b'{"a": {"dtype": "U8", "shape": [0], "data_offsets": [0, 0]}, "a": {"dtype": "U8", "shape": [0], "data_offsets": [0, 0]}}'
    _refused(_write(tmp_path, raw), "'a' twice", "duplicate")


def test_nan_and_infinity_are_refused(tmp_path):
    _refused(_write(tmp_path, b'{"a": NaN}'), "not valid JSON")


def test_deep_nesting_is_refused_not_crashed(tmp_path):
    _refused(_write(tmp_path, b'{"a": ' + b"[" * 200000 + b"]" * 200000 + b"}"), "nested too deeply")


def test_a_lone_surrogate_escape_in_a_name_or_metadata_is_refused(tmp_path):
    """JSON can escape half a UTF-16 pair (\\ud800); that is no character: a tensor named so
    was accepted and made the writer of a merge die on it after all data was written."""
    _refused(_write(tmp_path, {"a\ud800b": _t()}, b"\0" * 8), "tensor 'a\\ud800b'",
             "lone surrogate")
    _refused(_write(tmp_path, {"__metadata__": {"k": "v\udfff"}, "a": _t()}, b"\0" * 8,
                    name="meta.safetensors"), "__metadata__ string", "lone surrogate")
    pair = _write(tmp_path, {"\U0001F600 \\ud800": _t()}, b"\0" * 8, name="ok.safetensors")
    assert list(read_header(pair)[0]) == ["\U0001F600 \\ud800"]   # a pair; a literal backslash


def test_an_entry_that_is_not_an_object_is_refused(tmp_path):
    _refused(_write(tmp_path, {"w": [1, 2]}), "tensor 'w'", "must be an object")


def test_an_entry_missing_data_offsets_is_refused(tmp_path):
    _refused(_write(tmp_path, {"w": {"dtype": "F32", "shape": [0]}}), "tensor 'w'", "data_offsets")


def test_an_entry_with_unknown_keys_is_refused(tmp_path):
    _refused(_write(tmp_path, {"w": dict(_t(), extra=1)}, b"\0" * 8), "tensor 'w'", "unknown keys")


@pytest.mark.parametrize("dtype", ["F128", "f32", "float32", 3, None, "C64"])
def test_an_unknown_dtype_is_refused(tmp_path, dtype):
    _refused(_write(tmp_path, {"w": _t(dtype=dtype)}, b"\0" * 8), "tensor 'w'", "dtype", "not one of")


@pytest.mark.parametrize("shape", [[-1], [2.0], [True], "2", [[2]], None])
def test_a_shape_that_is_not_non_negative_ints_is_refused(tmp_path, shape):
    entry = {"dtype": "F32", "shape": shape, "data_offsets": [0, 8]}
    _refused(_write(tmp_path, {"w": entry}, b"\0" * 8), "tensor 'w'", "non-negative integers")


@pytest.mark.parametrize("offsets", [[0], [0, 8, 9], [-1, 7], [0.0, 8], "0,8", None, [True, 8]])
def test_malformed_data_offsets_are_refused(tmp_path, offsets):
    entry = {"dtype": "F32", "shape": [2], "data_offsets": offsets}
    _refused(_write(tmp_path, {"w": entry}, b"\0" * 8), "tensor 'w'", "data_offsets")


def test_data_offsets_with_start_after_end_are_refused(tmp_path):
    _refused(_write(tmp_path, {"w": _t("U8", (0,), (8, 0))}, b"\0" * 8), "tensor 'w'", "start after end")


def test_data_offsets_outside_the_data_area_are_refused(tmp_path):
    _refused(_write(tmp_path, {"w": _t()}, b"\0" * 4), "tensor 'w'", "outside the data area of 4")


def test_a_span_that_does_not_match_shape_times_itemsize_is_refused(tmp_path):
    _refused(_write(tmp_path, {"w": _t(shape=(3,))}, b"\0" * 8), "tensor 'w'", "needs 12",
             "end - start == prod(shape) * itemsize")


def test_a_huge_shape_is_refused_by_arithmetic_not_allocation(tmp_path):
    _refused(_write(tmp_path, {"w": _t(shape=(2 ** 62, 2 ** 62))}, b"\0" * 8), "tensor 'w'", "needs")


def test_overlapping_tensors_are_refused(tmp_path):
    header = {"a": _t("U8", (4,), (0, 4)), "b": _t("U8", (4,), (2, 6))}
    _refused(_write(tmp_path, header, b"\0" * 6), "tensor 'b'", "overlap tensor 'a'")


def test_a_hole_between_tensors_is_refused(tmp_path):
    header = {"a": _t("U8", (4,), (0, 4)), "b": _t("U8", (4,), (6, 10))}
    _refused(_write(tmp_path, header, b"\0" * 10), "tensor 'b'", "not covered", "holes")


def test_a_hole_at_the_start_of_the_data_area_is_refused(tmp_path):
    _refused(_write(tmp_path, {"a": _t("U8", (4,), (2, 6))}, b"\0" * 6), "tensor 'a'", "2 bytes are not covered")


def test_trailing_bytes_after_the_last_tensor_are_refused(tmp_path):
    _refused(_write(tmp_path, {"a": _t("U8", (4,), (0, 4))}, b"\0" * 5), "1 trailing bytes")


def test_tensors_listed_out_of_offset_order_are_accepted_and_sorted(tmp_path):
    header = {"b": _t("U8", (4,), (4, 8)), "a": _t("U8", (4,), (0, 4))}
    with open_safetensors(_write(tmp_path, header, bytes(range(8)))) as f:
        assert list(f.tensors) == ["a", "b"]
        assert f.read("b").tolist() == [4, 5, 6, 7]


@pytest.mark.parametrize("meta", [[], "x", {"k": 1}, {"k": None}, {"k": {"a": "b"}}])
def test_metadata_that_is_not_a_map_of_strings_is_refused(tmp_path, meta):
    _refused(_write(tmp_path, {"__metadata__": meta}), "__metadata__")


def test_a_missing_file_is_a_checkpoint_error_naming_it(tmp_path):
    with pytest.raises(CheckpointError, match="no such safetensors file"):
        open_safetensors(tmp_path / "nope.safetensors")


def test_a_truncated_real_file_is_refused(tmp_path):
    from mindformers_st.storage import save_tensors
    import numpy as np
    path = save_tensors(tmp_path / "ok.safetensors", {"w": np.zeros(100, np.float32)})
    size = os.path.getsize(path)
    with open(path, "r+b") as fh:
        fh.truncate(size - 1)
    _refused(path, "tensor 'w'", "outside the data area")


def test_a_header_parsed_once_is_parsed_again_when_the_file_changes(tmp_path):
    """Parsed headers are kept by file identity (one parse per file per command), never served
    for a file changed since: rewritten in place with the same size, or replaced."""
    good = {"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}
    path = _write(tmp_path, good, b"\0" * 8)
    assert list(read_header(path)[0]) == ["a"]
    tensors, _, _ = read_header(path)
    tensors.clear()   # a caller's copy: the kept parse is not changed by it
    assert list(read_header(path)[0]) == ["a"]
    bad = json.dumps({"b": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}).encode()
    raw = json.dumps(good).encode()
    bad = bad[:len(raw)].ljust(len(raw))   # the same length: the same file size
    with open(path, "r+b") as fh:
        fh.seek(8)
        fh.write(bad)
    with pytest.raises(SafetensorsFormatError):
        read_header(path)
    _write(tmp_path, {"c": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 8)
    assert list(read_header(path)[0]) == ["c"]
