"""What many test modules share: a free port pair for msrun, the tiny Llama sizes, and a fixture
building their LlamaConfig. Import helpers as `from tests.conftest import free_port, TINY_LLAMA`."""
import os
import signal
import socket
import time

import pytest

# A Llama small enough for CPU tests (GQA: 4 heads over 2 KV heads), big enough that every
# parallel split (mp2, mp4, dp2) is exercised.
TINY_LLAMA = dict(vocab_size=64, hidden_size=16, num_layers=2, num_heads=4, n_kv_heads=2,
                  intermediate_size=32, seq_length=8)


def free_port() -> int:
    """A TCP port nobody listens on right now (and the next one, which msrun may also use)."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port < 65000:
            with socket.socket() as s2:
                try:
                    s2.bind(("127.0.0.1", port + 1))
                except OSError:
                    continue
            return port
    raise RuntimeError("no free port pair found")


@pytest.fixture
def tiny_llama_config():
    """The LlamaConfig of TINY_LLAMA (fp32)."""
    from mindformers_st.models.config import LlamaConfig
    return LlamaConfig.from_dict(dict(TINY_LLAMA))


def kill_tagged(tag: str) -> int:
    """SIGKILL every process carrying E2E_KILL_TAG=tag in its environment (only the job this
    test started: the launcher, msrun, its scheduler and workers inherit the variable)."""
    killed = 0
    for pid in os.listdir("/proc"):
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            with open(f"/proc/{pid}/environ", "rb") as fh:
                env = fh.read().split(b"\0")
        except OSError:
            continue
        if f"E2E_KILL_TAG={tag}".encode() in env:
            try:
                os.kill(int(pid), signal.SIGKILL)
                killed += 1
            except OSError:
                pass
    return killed


def kill_once_committed(proc, tag: str, ckpt_dir: str, reached, timeout: float,
                        poll: float = 0.05) -> None:
    """Wait until `reached(global steps committed in ckpt_dir)` holds (or `proc` ends, or
    `timeout` passes), then SIGKILL every process of the tagged job and reap `proc`: a crash at
    a known point of a real run."""
    from mindformers_st.records.commit import load_committed_entries
    deadline = time.time() + timeout
    try:
        while time.time() < deadline and proc.poll() is None:
            try:
                if reached([e.global_step for e in load_committed_entries(ckpt_dir)]):
                    break
            except Exception:   # the record appears atomically; absent means not yet
                pass
            time.sleep(poll)
    finally:
        kill_tagged(tag)
        proc.wait(timeout=60)


@pytest.fixture(scope="session")
def tiny_run_data(tmp_path_factory):
    """A tokenizer.json and a MindRecord dataset (seq_length 64) for run_mindformer.py runs with
    the tiny configs: `tiny_run_data / "tokenizer.json"`, `tiny_run_data / "wiki.mindrecord"`."""
    import subprocess
    import sys
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = tmp_path_factory.mktemp("tiny_run_data")
    assets = os.path.join(root, "mindformers_st", "data", "assets")
    tok = str(out / "tokenizer.json")
    env = dict(os.environ, PYTHONPATH=root)
    for args in (["train-tokenizer", "--input", f"{assets}/tiny_corpus.txt", "--vocab_size", "512",
                  "--output", tok],
                 ["pretrain", "--input", f"{assets}/tiny_corpus.txt", "--tokenizer", tok,
                  "--seq_length", "64", "--output", str(out / "wiki.mindrecord")]):
        subprocess.run([sys.executable, "-m", "mindformers_st.data", *args], check=True, cwd=root,
                       capture_output=True, timeout=300, env=env)
    return out
