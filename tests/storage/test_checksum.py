"""Per-tensor xxh3_64 checksums: recorded at write time, verified on demand, corruption named."""
import json

import numpy as np
import pytest
import xxhash

from mindformers_st.storage import SafetensorsWriter, open_safetensors, save_tensors, verify_checksums
from mindformers_st.storage.checksum import decode_checksums


def test_recorded_checksums_are_xxh3_64_of_each_tensors_bytes(tmp_path):
    tensors = {"a": np.arange(10, dtype=np.float32), "b": np.arange(6, dtype=np.int16).reshape(2, 3).T}
    path = save_tensors(tmp_path / "t.safetensors", tensors)
    with open_safetensors(path) as f:
        recorded = decode_checksums(f.metadata)
        assert json.loads(f.metadata["checksums"])["algo"] == "xxh3_64"
    for name, arr in tensors.items():
        assert recorded[name] == xxhash.xxh3_64(np.ascontiguousarray(arr).tobytes()).hexdigest()


def test_streamed_and_read_back_checksums_agree(tmp_path):
    arr = np.arange(8 * 8, dtype=np.float32).reshape(8, 8)
    streamed, readback = tmp_path / "s.safetensors", tmp_path / "r.safetensors"
    with SafetensorsWriter(streamed, [("w", "F32", (8, 8))]) as w:   # row blocks, in order
        for r in range(0, 8, 2):
            w.write_block("w", (r, 0), arr[r:r + 2])
    with SafetensorsWriter(readback, [("w", "F32", (8, 8))]) as w:   # column blocks: out of order
        for c in range(0, 8, 2):
            w.write_block("w", (0, c), arr[:, c:c + 2])
    with open_safetensors(streamed) as f1, open_safetensors(readback) as f2:
        assert f1.metadata["checksums"] == f2.metadata["checksums"]
        assert verify_checksums(f1) == [] and verify_checksums(f2) == []


def test_a_flipped_data_byte_is_reported_naming_the_tensor(tmp_path):
    path = save_tensors(tmp_path / "t.safetensors", {"a": np.zeros(4, np.float32), "b": np.zeros(4, np.float32)})
    with open_safetensors(path) as f:
        pos = f.data_start + f.tensors["b"].begin + 3
    with open(path, "r+b") as fh:
        fh.seek(pos)
        fh.write(b"\x01")
    with open_safetensors(path) as f:
        problems = verify_checksums(f)
        assert len(problems) == 1 and "'b' checksum mismatch" in problems[0] and str(path) in problems[0]
        assert verify_checksums(f, ["a"]) == []
        assert "not in the file" in verify_checksums(f, ["zz"])[0]


def test_checksums_can_be_turned_off_and_then_nothing_is_verified(tmp_path):
    path = save_tensors(tmp_path / "t.safetensors", {"a": np.zeros(4, np.float32)}, metadata={"k": "v"},
                        checksums=False)
    with open_safetensors(path) as f:
        assert f.metadata == {"k": "v"}
        assert verify_checksums(f) == []


def test_malformed_checksum_metadata_is_a_problem_not_a_crash(tmp_path):
    path = save_tensors(tmp_path / "t.safetensors", {"a": np.zeros(4, np.float32)},
                        metadata={"checksums": '{"algo": "md5", "tensors": {}}'}, checksums=False)
    with open_safetensors(path) as f:
        assert "malformed" in verify_checksums(f)[0]
    with pytest.raises(ValueError, match="nested too deeply"):   # not a RecursionError
        decode_checksums({"checksums": "[" * 100_000})


def test_the_header_never_moves_when_checksums_are_filled_in(tmp_path):
    w = SafetensorsWriter(tmp_path / "t.safetensors", [("a", "F32", (3,)), ("b", "U8", (5,))])
    planned = w.data_start
    w.write("a", np.ones(3, np.float32))
    w.write("b", np.ones(5, np.uint8))
    path = w.commit()
    with open_safetensors(path) as f:
        assert f.data_start == planned


@pytest.mark.parametrize("bad", ["ABCDEF0123456789", "abc", "", "0123456789abcdefg", 17, "g" * 16])
def test_decode_checksums_names_the_first_malformed_digest(bad):
    good = "0123456789abcdef"
    tensors = {f"t{i}": good for i in range(50)}
    tensors["t7"] = bad
    with pytest.raises(ValueError, match="checksum of 't7'"):
        decode_checksums({"checksums": json.dumps({"algo": "xxh3_64", "tensors": tensors})})
    assert decode_checksums({"checksums": json.dumps(
        {"algo": "xxh3_64", "tensors": {"a": good}})}) == {"a": good}
