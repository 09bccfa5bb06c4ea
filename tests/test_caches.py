"""Every process-wide cache of the package is emptied by `caches.forget_all` (benchmarks use it
to measure a first command; a cache it missed would hide per-tensor cost silently)."""
import os
import re

import numpy as np

from mindformers_st import caches
from mindformers_st.layout.slices import TensorSlice
from mindformers_st.layout.tensor_layout import TensorLayout
from mindformers_st.storage import reader
from mindformers_st.storage.writer import save_tensors

PKG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "mindformers_st")


def _on_forget_bodies(text):
    """The source of every function decorated with @on_forget in `text`."""
    lines = text.splitlines()
    for i, line in enumerate(lines):
        if line.strip() == "@on_forget":
            body = []
            for nxt in lines[i + 2:]:
                if nxt and not nxt[0].isspace():
                    break
                body.append(nxt)
            yield "\n".join(body)


def test_no_module_makes_a_cache_forget_all_does_not_know():
    found = []
    for root, _, files in os.walk(PKG):
        for f in files:
            if f.endswith(".py") and f != "caches.py":
                text = open(os.path.join(root, f), encoding="utf-8").read()
                if re.search(r"\blru_cache\b|functools\.cache\b|@cache\b", text):
                    found.append(os.path.relpath(os.path.join(root, f), PKG))
                for m in re.finditer(r"^(_\w*CACHE)\s*[:=]", text, re.M):   # module-level dicts
                    name = m.group(1)
                    registered = f"on_forget({name}.clear)" in text or any(
                        f"{name}.clear()" in body for body in _on_forget_bodies(text))
                    if not registered:
                        found.append(f"{f}: {name}")
    assert not found, f"caches not made with caches.process_cache / on_forget: {found}"


def test_forget_all_empties_what_was_remembered(tmp_path):
    path = str(tmp_path / "a.safetensors")
    save_tensors(path, {"w": np.zeros((4, 2), np.float32)})
    reader.read_header(path)
    w = TensorSlice.whole((4, 2))
    lay = TensorLayout((4, 2), (2,), (0, -1))
    lay.slice_for(1)
    assert reader._HEADER_CACHE and TensorSlice.whole((4, 2)) is w
    caches.forget_all()
    assert not reader._HEADER_CACHE
    assert TensorSlice.whole((4, 2)) is not w and TensorSlice.whole((4, 2)) == w
    from mindformers_st.layout.tensor_layout import _slice_for
    assert _slice_for.cache_info().currsize == 0
    assert lay.slice_for(1) == TensorSlice((4, 2), (2, 0), (2, 2))
