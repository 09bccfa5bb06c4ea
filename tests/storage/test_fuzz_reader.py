"""Fuzzing the reader: whatever bytes a file holds, opening and reading it either works or raises
SafetensorsFormatError — never another exception, a hang, or a big allocation.

`MFST_FUZZ_EXAMPLES=200000 pytest tests/storage/test_fuzz_reader.py` runs a long campaign; the
default keeps the whole file well under 30 s.
"""
import atexit
import json
import os
import re
import shutil
import tempfile
import tracemalloc

import numpy as np
import pytest
import safetensors.numpy
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from mindformers_st.errors import SafetensorsFormatError
from mindformers_st.layout.param_table import ITEMSIZE
from mindformers_st.storage import open_safetensors, verify_checksums
from mindformers_st.dtypes import ST_TO_NUMPY

# Examples per test. The default (~2400 files over the four tests) takes ~20 s on 2 busy cores; the
# long run (MFST_FUZZ_EXAMPLES=200000) also lifts the per-test timeout accordingly.
EXAMPLES = int(os.environ.get("MFST_FUZZ_EXAMPLES", "400"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
TIMEOUT = max(120, EXAMPLES // 50)
ALLOC_LIMIT = 16 << 20   # the files are < 4 KiB; anything near this means a length was trusted

_DIR = tempfile.mkdtemp(prefix="mfst-fuzz-")
atexit.register(shutil.rmtree, _DIR, True)
_PATH = os.path.join(_DIR, "f.safetensors")

json_scalars = st.one_of(
    st.none(), st.booleans(), st.text(max_size=8),
    st.integers(min_value=-2 ** 70, max_value=2 ** 70),
    st.sampled_from([0, 1, -1, 2 ** 31, 2 ** 32, 2 ** 53 + 1, 2 ** 63 - 1, 2 ** 63, 2 ** 64, 10 ** 30]),
    st.floats(allow_nan=False, allow_infinity=False),
    st.sampled_from(sorted(ST_TO_NUMPY) + ["F128", "bf16", ""]),
)
json_values = st.recursive(json_scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=6), inner, max_size=4)), max_leaves=12)

specs = st.lists(st.tuples(st.sampled_from(sorted(ST_TO_NUMPY)),
                           st.lists(st.integers(0, 4), max_size=3)), min_size=1, max_size=4)


def _valid_file(spec_list, metadata) -> bytes:
    tensors = {}
    for i, (dtype, shape) in enumerate(spec_list):
        n = int(np.prod(shape)) * ITEMSIZE[dtype]
        tensors[f"t{i}"] = np.arange(n, dtype=np.uint8).view(ST_TO_NUMPY[dtype]).reshape(shape)
    # safetensors' own writer, in memory: no fsync per example, and a second writer's dialect.
    return safetensors.numpy.save(tensors, metadata=metadata)


def _check(raw: bytes) -> None:
    """Open and fully read `raw`; only SafetensorsFormatError may escape, allocations stay small."""
    with open(_PATH, "wb") as fh:
        fh.write(raw)
    tracemalloc.start()  # only around the reader: tracing hypothesis itself would triple the run time
    try:
        with open_safetensors(_PATH) as f:
            for name, e in f.tensors.items():
                whole = f.read(name)
                assert whole.shape == e.shape
                if e.shape:
                    half = tuple(d // 2 for d in e.shape)
                    f.read(name, (0,) * len(half), half)
                    assert sum(n for _, n in f.byte_ranges(name)) == e.nbytes
            verify_checksums(f)
        event("file accepted and fully read")
    except SafetensorsFormatError as exc:
        # The rule that refused the file, for --hypothesis-show-statistics.
        rule = re.sub(r"'[^']*'|\[[^\]]*\]|\d+", "_", str(exc)[len(_PATH) + 2:])
        event("refused: " + " ".join(rule.replace("tensor _: ", "").split()[:4]))
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    assert peak < ALLOC_LIMIT, f"reader allocated {peak} bytes for a {len(raw)}-byte file"


def _split(raw: bytes):
    n = int.from_bytes(raw[:8], "little")
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def _assemble(header, data: bytes, pad: bool = False) -> bytes:
    text = json.dumps(header).encode()
    return len(text).to_bytes(8, "little") + text + data


@pytest.mark.timeout(TIMEOUT)
@FUZZ
@given(specs, st.data())
def test_byte_level_mutations_of_valid_files_never_escape_the_format_error(spec_list, data):
    raw = bytearray(_valid_file(spec_list, {"k": "v"}))
    header_end = 8 + int.from_bytes(raw[:8], "little")
    for _ in range(data.draw(st.integers(1, 4))):
        kind = data.draw(st.sampled_from(["flip", "prefix", "truncate", "append", "splice"]))
        if kind == "flip" and raw:
            i = data.draw(st.integers(0, min(len(raw), header_end + 4) - 1))
            raw[i] = data.draw(st.integers(0, 255))
        elif kind == "prefix":
            n = data.draw(st.one_of(st.integers(0, 2 ** 64 - 1), st.integers(0, len(raw) + 8)))
            raw[:8] = n.to_bytes(8, "little")
        elif kind == "truncate":
            del raw[data.draw(st.integers(0, len(raw))):]
        elif kind == "append":
            raw += data.draw(st.binary(max_size=16))
        elif kind == "splice" and len(raw) > 8:
            i = data.draw(st.integers(8, len(raw)))
            raw[i:i] = data.draw(st.binary(min_size=1, max_size=8))
    _check(bytes(raw))


@pytest.mark.timeout(TIMEOUT)
@FUZZ
@given(specs, st.data())
def test_json_level_mutations_of_valid_headers_never_escape_the_format_error(spec_list, data):
    header, body = _split(_valid_file(spec_list, {"k": "v"}))
    for _ in range(data.draw(st.integers(1, 3))):
        name = data.draw(st.sampled_from(sorted(header)))
        kind = data.draw(st.sampled_from(["replace_entry", "replace_field", "shift_offsets",
                                          "drop_field", "add_tensor", "dtype", "shape", "metadata"]))
        entry = header[name]
        if kind == "replace_entry":
            header[name] = data.draw(json_values)
        elif kind == "add_tensor":
            header[data.draw(st.text(max_size=6))] = data.draw(json_values)
        elif kind == "metadata":
            header["__metadata__"] = data.draw(json_values)
        elif not isinstance(entry, dict) or not entry:
            continue
        elif kind == "replace_field":
            entry[data.draw(st.sampled_from(sorted(entry)))] = data.draw(json_values)
        elif kind == "drop_field":
            del entry[data.draw(st.sampled_from(sorted(entry)))]
        elif kind == "shift_offsets" and isinstance(entry.get("data_offsets"), list):
            entry["data_offsets"] = [o + data.draw(st.sampled_from([-9, -1, 1, 8, 2 ** 63, -2 ** 63]))
                                     if isinstance(o, int) else o for o in entry["data_offsets"]]
        elif kind == "dtype":
            entry["dtype"] = data.draw(st.sampled_from(sorted(ST_TO_NUMPY) + ["F128", "BF16 ", 1]))
        elif kind == "shape":
            entry["shape"] = data.draw(st.lists(st.integers(-2, 2 ** 64), max_size=4))
    body_cut = data.draw(st.sampled_from([None, 0, -1, 1]))
    if body_cut is not None:
        body = body[:len(body) + body_cut] if body_cut < 0 else body + b"\0" * body_cut
    _check(_assemble(header, body))


@pytest.mark.timeout(TIMEOUT)
@settings(FUZZ, max_examples=max(50, EXAMPLES // 10))
@given(st.integers(1, 300_000), st.sampled_from(["[", "{\"a\":"]))
def test_deeply_nested_headers_are_refused_not_crashed(depth, opener):
    closer = "]" if opener == "[" else "}"
    text = ('{"w":' + opener * depth + "1" + closer * depth + "}").encode()
    _check(len(text).to_bytes(8, "little") + text)


@pytest.mark.timeout(TIMEOUT)
@settings(FUZZ, max_examples=2 * EXAMPLES)
@given(st.binary(max_size=64), st.integers(0, 2 ** 64 - 1))
def test_random_bytes_with_any_length_prefix_never_escape_the_format_error(body, n):
    _check(n.to_bytes(8, "little") + body)
    _check(body)
