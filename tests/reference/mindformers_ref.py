"""MindSpore Transformers 2.0.0 as an independent reference, run in a subprocess.

Its package cannot live in our venv (it pins transformers 4.57.1; ours is 5.x) and its
`hyper_parallel` dependency is not on the registry, so `scripts/setup.sh` installs it with
`pip --target .mf-ref` (or set MINDFORMERS_REF_DIR) and the tests run `mf_worker.py` with that
folder and an empty stand-in for `hyper_parallel` (written here, for tests only) first on
PYTHONPATH. Tests using it are skipped, with the reason, when it is not installed."""
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
REF_DIR = os.environ.get("MINDFORMERS_REF_DIR", os.path.join(ROOT, ".mf-ref"))
WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "mf_worker.py")

# hyper_parallel stand-in: every submodule imports, every attribute is an inert class (only the
# PyNative multi-card paths of mindformers use it; the tests never take them).
_STUB = '''
import importlib.abc, importlib.machinery, sys, types

class _Dummy:
    def __init__(self, *args, **kwargs):
        pass

class _Module(types.ModuleType):
    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return type(name, (_Dummy,), {})

class _Finder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, fullname, path, target=None):
        if fullname.startswith("hyper_parallel."):
            return importlib.machinery.ModuleSpec(fullname, self, is_package=True)
        return None
    def create_module(self, spec):
        return _Module(spec.name)
    def exec_module(self, module):
        module.__path__ = []

sys.meta_path.insert(0, _Finder())
sys.modules[__name__].__class__ = _Module
'''


def available() -> bool:
    """True when mindformers 2.0.0 is installed in REF_DIR."""
    return os.path.isfile(os.path.join(REF_DIR, "mindformers", "checkpoint", "checkpoint.py"))


requires_mindformers = pytest.mark.skipif(
    not available(), reason=f"MindSpore Transformers 2.0.0 reference not installed in {REF_DIR} "
                            f"(scripts/setup.sh installs it; or set MINDFORMERS_REF_DIR)")


def run(tmp_path, *commands) -> list:
    """Run `mf_worker.py` on `commands` ((name, {args}) pairs, in order, one process) in
    `tmp_path`; returns their JSON answers. Fails the test with the worker's output when it
    fails."""
    stub = tmp_path / "_hp_stub" / "hyper_parallel"
    stub.mkdir(parents=True, exist_ok=True)
    (stub / "__init__.py").write_text(_STUB)
    env = dict(os.environ)
    # our package is NOT on this path: the answers come from mindformers' code alone
    env["PYTHONPATH"] = os.pathsep.join([REF_DIR, str(tmp_path / "_hp_stub")])
    env.setdefault("GLOG_v", "3")
    proc = subprocess.run([sys.executable, WORKER, json.dumps(commands)], cwd=str(tmp_path),
                          env=env, capture_output=True, text=True, timeout=300)
    if proc.returncode != 0:
        pytest.fail(f"mindformers worker {[c[0] for c in commands]} failed:\n{proc.stdout[-3000:]}\n"
                    f"{proc.stderr[-3000:]}")
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith("MF_RESULT "):
            return json.loads(line[len("MF_RESULT "):])
    pytest.fail(f"mindformers worker {[c[0] for c in commands]} printed no result:\n{proc.stdout[-2000:]}")
