"""The reader and writer agree with each other on every dtype, shape and block."""
import numpy as np
import ml_dtypes
import pytest

from mindformers_st.errors import CheckpointError
from mindformers_st.storage import (ST_TO_NUMPY, SafetensorsWriter, load_tensors, open_safetensors,
                                    save_tensors, verify_checksums)


def _sample(dtype_name, shape, seed=0):
    rng = np.random.default_rng(seed)
    raw = rng.integers(0, 256, size=int(np.prod(shape)) * ST_TO_NUMPY[dtype_name].itemsize, dtype=np.uint8)
    if dtype_name == "BOOL":
        raw = raw % 2
    return raw.view(ST_TO_NUMPY[dtype_name]).reshape(shape)


@pytest.mark.parametrize("dtype_name", sorted(ST_TO_NUMPY))
def test_every_dtype_round_trips_bit_for_bit(tmp_path, dtype_name):
    arr = _sample(dtype_name, (3, 5))
    path = save_tensors(tmp_path / "t.safetensors", {"w": arr})
    back = load_tensors(path)["w"]
    assert back.dtype == arr.dtype and back.shape == arr.shape
    assert back.tobytes() == arr.tobytes()


def test_zero_size_tensors_and_scalars_round_trip(tmp_path):
    tensors = {"empty": np.zeros((0, 4), np.float32), "scalar": np.array(7, np.int64),
               "empty1d": np.zeros((0,), ml_dtypes.bfloat16), "after": np.arange(3, dtype=np.int32)}
    path = save_tensors(tmp_path / "t.safetensors", tensors)
    back = load_tensors(path)
    for name, arr in tensors.items():
        assert back[name].shape == arr.shape and back[name].tobytes() == arr.tobytes()
    with open_safetensors(path) as f:
        assert f.read("scalar", (), ()) == 7
        assert f.byte_ranges("empty") == []
        assert verify_checksums(f) == []


def test_a_transposed_view_is_written_as_its_values_not_its_memory(tmp_path):
    base = np.arange(12, dtype=np.float32).reshape(3, 4)
    view = base.T
    assert not view.flags.c_contiguous
    path = save_tensors(tmp_path / "t.safetensors", {"t": view})
    np.testing.assert_array_equal(load_tensors(path)["t"], view)


def test_block_reads_equal_numpy_slicing(tmp_path):
    arr = np.arange(2 * 3 * 8, dtype=np.float32).reshape(2, 3, 8)
    path = save_tensors(tmp_path / "t.safetensors", {"a": arr})
    with open_safetensors(path) as f:
        for offsets, sizes in [((0, 0, 0), (2, 3, 8)), ((1, 0, 0), (1, 3, 8)), ((0, 1, 2), (2, 2, 3)),
                               ((0, 0, 7), (2, 3, 1)), ((1, 2, 0), (1, 1, 8)), ((0, 0, 0), (0, 3, 8))]:
            got = f.read("a", offsets, sizes)
            assert got.flags.c_contiguous
            np.testing.assert_array_equal(got, arr[tuple(slice(o, o + s) for o, s in zip(offsets, sizes))])


def test_read_into_fills_a_strided_view_of_a_bigger_array(tmp_path):
    arr = np.arange(4 * 6, dtype=np.int16).reshape(4, 6)
    path = save_tensors(tmp_path / "t.safetensors", {"a": arr})
    big = np.zeros((8, 12), np.int16)
    with open_safetensors(path) as f:
        f.read_into("a", big[1:5, 3:9], (0, 0), (4, 6))
        f.read_into("a", big[6:8, ::6], (1, 2), (2, 2))
    np.testing.assert_array_equal(big[1:5, 3:9], arr)
    np.testing.assert_array_equal(big[6:8, ::6], arr[1:3, 2:4])


def test_byte_ranges_of_a_column_block_cover_exactly_its_share(tmp_path):
    arr = np.zeros((64, 256), np.float32)
    path = save_tensors(tmp_path / "t.safetensors", {"a": arr})
    with open_safetensors(path) as f:
        runs = f.byte_ranges("a", (0, 32), (64, 32))
        assert len(runs) == 64 and all(n == 32 * 4 for _, n in runs)
        assert sum(n for _, n in runs) == arr.nbytes // 8
        start = f.data_start + f.tensors["a"].begin
        assert runs[0][0] == start + 32 * 4 and runs[1][0] == start + 256 * 4 + 32 * 4
        # A row block is one coalesced run.
        assert f.byte_ranges("a", (8, 0), (8, 256)) == [(start + 8 * 256 * 4, 8 * 256 * 4)]


def test_blocks_written_in_any_order_give_the_whole_tensor_and_a_correct_checksum(tmp_path):
    arr = np.arange(6 * 8, dtype=np.float32).reshape(6, 8)
    path = tmp_path / "t.safetensors"
    with SafetensorsWriter(path, [("a", "F32", (6, 8)), ("b", "I8", (4,))]) as w:
        w.write_block("a", (0, 4), arr[:, 4:])   # columns first: bytes arrive out of order
        w.write_block("a", (0, 0), arr[:, :4])
        w.write_block("b", (0,), np.arange(2, dtype=np.int8))   # in order, streamed hash
        w.write_block("b", (2,), np.arange(2, 4, dtype=np.int8))
    with open_safetensors(path) as f:
        np.testing.assert_array_equal(f.read("a"), arr)
        np.testing.assert_array_equal(f.read("b"), np.arange(4, dtype=np.int8))
        assert verify_checksums(f) == []


def test_commit_names_the_tensor_that_was_not_fully_written(tmp_path):
    path = tmp_path / "t.safetensors"
    w = SafetensorsWriter(path, [("done", "F32", (2,)), ("half", "F32", (2, 4))])
    w.write("done", np.ones(2, np.float32))
    w.write_block("half", (0, 0), np.ones((2, 2), np.float32))
    with pytest.raises(CheckpointError, match=r"'half' \(16 bytes missing\)"):
        w.commit()
    assert list(tmp_path.iterdir()) == []


def test_an_exception_inside_the_writer_leaves_no_file(tmp_path):
    path = tmp_path / "t.safetensors"
    with pytest.raises(RuntimeError):
        with SafetensorsWriter(path, [("a", "F32", (2,))]) as w:
            w.write("a", np.ones(2, np.float32))
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


def test_header_is_padded_with_spaces_to_a_multiple_of_8(tmp_path):
    for n in range(1, 9):
        path = save_tensors(tmp_path / f"t{n}.safetensors", {"x" * n: np.zeros(1, np.uint8)}, checksums=False)
        raw = open(path, "rb").read()
        length = int.from_bytes(raw[:8], "little")
        assert length % 8 == 0
        header = raw[8:8 + length]
        assert header.rstrip(b" ").endswith(b"}") and set(header[len(header.rstrip(b" ")):]) <= {0x20}


def test_wrong_dtype_or_shape_is_refused_with_the_tensor_name(tmp_path):
    with SafetensorsWriter(tmp_path / "t.safetensors", [("w", "BF16", (2, 2))]) as w:
        with pytest.raises(CheckpointError, match="'w' is BF16"):
            w.write("w", np.zeros((2, 2), np.float32))
        with pytest.raises(CheckpointError, match="'w' has shape"):
            w.write("w", np.zeros((2, 3), ml_dtypes.bfloat16))
        with pytest.raises(CheckpointError, match="leave the tensor"):
            w.write_block("w", (1, 1), np.zeros((2, 2), ml_dtypes.bfloat16))
        w.write("w", np.zeros((2, 2), ml_dtypes.bfloat16))
