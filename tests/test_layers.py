"""Imports point down only: the allowed edges between the package's layers (docs/architecture.md).

Bottom: `errors`, `fast_init` (records' quick constructor) and `caches` (the process-wide
caches' registry), then the `dtypes` leaf. `storage/` and `layout/` are siblings (layout writes
its strategy files through storage's atomic helper only); `records/` over both; `transform/`
over records; `convert/` over transform; `parallel/`, `models/`, `data/`; `checkpoint/` over
transform, convert, records, parallel; `trainer/` over checkpoint, models, data; `config/` is
typed data that imports none of the layers (its composition with models and layouts lives in
`trainer/resolve.py`); `commands/` and `cli` at the top, never imported by the library.
"""
import ast
import os

PKG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "mindformers_st")

BELOW = {
    "errors": set(),
    "fast_init": set(),
    "caches": set(),
    "dtypes": {"errors"},
    "storage": {"errors", "dtypes", "fast_init", "caches"},
    "layout": {"errors", "dtypes", "storage", "fast_init", "caches"},
    "config": {"errors"},
    "records": {"errors", "dtypes", "storage", "layout", "caches"},
    "transform": {"errors", "dtypes", "storage", "layout", "records", "fast_init", "caches"},
    "convert": {"errors", "dtypes", "storage", "layout", "records", "transform", "config",
                "caches"},
    "parallel": {"errors", "layout"},
    "models": {"errors", "dtypes", "layout", "parallel", "config"},
    "data": {"errors"},
    "checkpoint": {"errors", "dtypes", "storage", "layout", "records", "transform", "convert",
                   "parallel", "config"},
    "trainer": {"errors", "dtypes", "storage", "layout", "records", "transform", "convert",
                "parallel", "models", "data", "checkpoint", "config"},
    "commands": {"errors", "dtypes", "storage", "layout", "records", "transform", "convert",
                 "parallel", "models", "checkpoint", "config"},
    "cli": {"errors", "commands"},
    "__init__": {"checkpoint"},   # the package's two MindSpore entry points, loaded lazily
}
# Edges that still point the wrong way, each with the issue that removes it. The test fails
# when one disappears, so the list only shrinks.
PENDING: dict = {}


def _layer_of(path: str) -> str:
    rel = os.path.relpath(path, PKG)[:-3].split(os.sep)
    return rel[0]


def _imports(path: str):
    rel = os.path.relpath(path, PKG)[:-3].split(os.sep)
    here = ["mindformers_st"] + rel[:-1]          # the package a relative import starts from
    for node in ast.walk(ast.parse(open(path, encoding="utf-8").read())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = here[:len(here) - (node.level - 1)]
                target = base + (node.module.split(".") if node.module else [])
                names = [target] if node.module else [target + [a.name] for a in node.names]
            else:
                names = [(node.module or "").split(".")]
            for t in names:
                if t[0] == "mindformers_st" and len(t) > 1:
                    yield t[1]
        elif isinstance(node, ast.Import):
            for a in node.names:
                t = a.name.split(".")
                if t[0] == "mindformers_st" and len(t) > 1:
                    yield t[1]


def _edges():
    found = {}
    for root, _, files in os.walk(PKG):
        for f in files:
            if f.endswith(".py"):
                path = os.path.join(root, f)
                src = _layer_of(path)
                for dst in _imports(path):
                    if dst != src:
                        found.setdefault((src, dst), path)
    return found


def test_every_import_between_layers_points_down():
    edges = _edges()
    wrong = {e: p for e, p in edges.items()
             if e[1] not in BELOW.get(e[0], set()) and e not in PENDING}
    assert not wrong, "imports against the layers: " + "; ".join(
        f"{a} -> {b} ({os.path.relpath(p, PKG)})" for (a, b), p in sorted(wrong.items()))
    gone = [e for e in PENDING if e not in edges]
    assert not gone, f"pending edges {gone} are gone: delete them from PENDING"


def test_storage_imports_nothing_of_ours_but_the_leaves():
    edges = _edges()
    leaves = {"errors", "dtypes", "fast_init", "caches"}
    assert {b for a, b in edges if a == "storage"} <= leaves
    assert {b for a, b in edges if a == "layout"} <= leaves | {"storage"}
    assert {b for a, b in edges if a in ("fast_init", "caches")} == set()
    for root, _, files in os.walk(os.path.join(PKG, "layout")):
        for f in (f for f in files if f.endswith(".py")):
            text = open(os.path.join(root, f), encoding="utf-8").read()
            assert "storage." not in text.replace("..storage.atomic", ""), f


def test_the_library_never_imports_commands():
    assert not [e for e in _edges() if e[1] in ("commands", "cli") and e[0] not in ("commands", "cli")]
