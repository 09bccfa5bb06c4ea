"""A write is invisible until commit: killed or failed writers leave nothing under the final name."""
import os
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from mindformers_st.storage import SafetensorsWriter, load_tensors, save_tensors

_WRITER = textwrap.dedent("""
    import sys, time, numpy as np
    from mindformers_st.storage import SafetensorsWriter
    w = SafetensorsWriter(sys.argv[1], [("a", "F32", (256, 256)), ("b", "F32", (256, 256))])
    w.write("a", np.ones((256, 256), np.float32))
    print("HALF", flush=True)
    time.sleep(60)          # killed here, before "b" and before commit
    w.write("b", np.ones((256, 256), np.float32))
    w.commit()
""")


@pytest.mark.timeout(60)
def test_a_writer_killed_mid_write_leaves_no_file_under_the_final_name(tmp_path):
    final = tmp_path / "model.safetensors"
    proc = subprocess.Popen([sys.executable, "-c", _WRITER, str(final)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "HALF"
        partial = [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]
        assert partial, "the writer should be writing to a temporary file"
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert not final.exists()
    # What remains is hidden and does not look like a safetensors file to folder scans.
    assert all(p.startswith(".") and not p.endswith(".safetensors") for p in os.listdir(tmp_path))


def test_a_failed_rewrite_keeps_the_previous_file_intact(tmp_path):
    path = tmp_path / "model.safetensors"
    save_tensors(path, {"a": np.zeros(4, np.float32)})
    with pytest.raises(ValueError):
        with SafetensorsWriter(path, [("a", "F32", (4,))]) as w:
            w.write("a", np.ones(4, np.float32))
            raise ValueError("simulated failure before commit")
    np.testing.assert_array_equal(load_tensors(path)["a"], np.zeros(4, np.float32))
    assert os.listdir(tmp_path) == ["model.safetensors"]


def test_a_committed_rewrite_replaces_the_file(tmp_path):
    path = tmp_path / "model.safetensors"
    save_tensors(path, {"a": np.zeros(4, np.float32)})
    save_tensors(path, {"b": np.ones(2, np.int8)})
    assert list(load_tensors(path)) == ["b"]


def test_a_writer_dropped_without_commit_removes_its_temporary_file(tmp_path):
    w = SafetensorsWriter(tmp_path / "x.safetensors", [("a", "U8", (3,))])
    w.write("a", np.zeros(3, np.uint8))
    del w
    assert os.listdir(tmp_path) == []
