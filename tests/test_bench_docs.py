"""The docs' benchmark figures are the JSONs' figures, and docs/bench/README.md is what run_all writes.

Figures quoted in docs/*.md sit in blocks that name their JSON (and, for a multi-run JSON, the
run):

    <!-- figures: docs/bench/reshard.json runs.2GiB -->
    | merge mp4 → complete | 7.14 / 4.60 / 4.32 | 4.60 | 152 MiB | ... |
    <!-- /figures -->

Every number in a block (outside `code`) must be a value of that JSON (sub)tree at the precision
written, in the unit written (MiB: a *_mib value or bytes / 2**20; GB: bytes / 1e9; ...), and the
JSON must carry the provenance header of benchmarks/provenance.py. The benchmark sections may not
quote a decimal figure outside such a block.
"""
import json
import os
import re
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import provenance  # noqa: E402
import run_all  # noqa: E402

BLOCK = re.compile(r"<!-- figures: (\S+)(?: (\S+))? -->\n(.*?)<!-- /figures -->", re.S)
NUMBER = re.compile(r"(?<![\w.])(\d+(?:\.\d+)?)(?![\d.]*\w)(?:\s*(MiB|GiB|GB|MB|ms)\b)?")
SCALES = {None: (1,), "MiB": (1, 2 ** -20), "GiB": (1, 2 ** -30), "GB": (1e-9,), "MB": (1, 1e-6),
          "ms": (1, 1e3)}
# The sections whose figures must all come from a block: (doc, heading).
SECTIONS = [("docs/transform.md", "## Benchmark"), ("docs/transform.md", "## What verification costs"),
            ("docs/transform.md", "## Worker processes (`--processes N`, `transform_process_num`)"),
            ("docs/checkpoint-saving.md", "## Benchmark"), ("docs/checkpoint-loading.md", "## Benchmark"),
            ("docs/checkpoint-saving.md", "## Crash stress")]


def _numbers(text):
    """(value, decimals, unit) of every figure in `text`, code spans and comments left out."""
    text = re.sub(r"`[^`]*`", " ", re.sub(r"<!--.*?-->", " ", text, flags=re.S))
    return [(float(n), len(n.split(".")[1]) if "." in n else 0, unit)
            for n, unit in NUMBER.findall(text)]


def _leaves(node):
    if isinstance(node, bool):
        return
    if isinstance(node, (int, float)):
        yield float(node)
    elif isinstance(node, dict):
        for v in node.values():
            yield from _leaves(v)
    elif isinstance(node, list):
        for v in node:
            yield from _leaves(v)


def unmatched(text, data):
    """The figures of `text` that no value of `data` gives at the precision and unit written."""
    leaves = list(_leaves(data))
    bad = []
    for value, decimals, unit in _numbers(text):
        tol = 0.5 * 10 ** -decimals + 1e-9
        if not any(abs(v * s - value) <= tol for v in leaves for s in SCALES[unit or None]):
            bad.append(f"{value:.{decimals}f}{' ' + unit if unit else ''}")
    return bad


def _subtree(data, path):
    for part in (path.split(".") if path else []):
        data = data[part]
    return data


def _blocks():
    out = []
    for name in sorted(os.listdir(os.path.join(ROOT, "docs"))):
        if name.endswith(".md"):
            text = open(os.path.join(ROOT, "docs", name)).read()
            out += [(f"docs/{name}", m.group(1), m.group(2), m.group(3)) for m in BLOCK.finditer(text)]
    return out


def _section(doc, heading):
    text = open(os.path.join(ROOT, doc)).read()
    start = text.index("\n" + heading + "\n")
    end = text.find("\n## ", start + 1)
    return text[start:end if end > 0 else len(text)]


def test_the_benchmark_sections_quote_their_figures_in_blocks():
    for doc, heading in SECTIONS:
        section = _section(doc, heading)
        assert BLOCK.search(section), f"{doc} {heading}: no figures block"
        loose = [f"{v:.{d}f}" for v, d, _ in _numbers(BLOCK.sub(" ", section)) if d]
        assert not loose, f"{doc} {heading}: figures outside a figures block: {loose}"


@pytest.mark.parametrize("doc,json_path,subtree,text", _blocks(),
                         ids=lambda x: x if isinstance(x, str) and x.startswith("docs/") else None)
def test_every_figure_in_a_block_is_in_its_json_with_provenance(doc, json_path, subtree, text):
    path = os.path.join(ROOT, json_path)
    assert os.path.exists(path), f"{doc} quotes {json_path}, which is not in the repository"
    data = _subtree(json.load(open(path)), subtree)
    missing = [f for f in provenance.FIELDS if f not in (data.get("provenance") or {})]
    assert not missing, f"{json_path} {subtree or ''}: no provenance fields {missing} (re-run it)"
    assert not unmatched(text, data), (f"{doc}: figures not in {json_path} {subtree or ''}: "
                                      f"{unmatched(text, data)}")


def test_a_figure_that_is_not_in_the_json_is_caught():
    data = {"ops": {"merge": {"median": 4.604, "peak_pss_mib": 151.7}}, "model": {"bytes": 2183258112}}
    assert unmatched("| merge | 4.60 | 152 MiB | 2.18 GB |", data) == []
    assert unmatched("| merge | 4.61 | 152 MiB | 2.18 GB |", data) == ["4.61"]
    assert unmatched("| merge | 4.60 | 150 MiB | 2.2 GB | 9 |", data) == ["150 MiB", "9"]
    assert unmatched("`--size 7GiB` mp4 dp2×mp2 fp32 <!-- 3.33 -->", data) == []


def test_the_readme_is_what_run_all_writes_from_the_jsons():
    readme = open(os.path.join(ROOT, "docs", "bench", "README.md")).read()
    assert readme == run_all.readme_text(), "re-run: .venv/bin/python benchmarks/run_all.py --readme-only"
    quoted = {os.path.basename(json_path) for _, json_path, _, _ in _blocks()}
    listed = {b.json for b in run_all.BENCHES}
    assert quoted <= listed, f"quoted in docs but not run by run_all: {sorted(quoted - listed)}"


def test_fewer_rounds_replace_the_commands_own_count():
    by_name = {b.name: b for b in run_all.BENCHES}
    for name, flag in (("reshard-2GiB", "--reps"), ("save", "--rounds"), ("crash_stress", "--trials")):
        cmd = by_name[name].command("/out", False, 2)
        assert cmd.count(flag) == 1 and cmd[cmd.index(flag) + 1] == "2", cmd
        assert cmd[-2:] == [by_name[name].json_flag, os.path.join("/out", by_name[name].json)]
    bare = run_all.Bench("x", "x.py", "x.json", "--json", ("--size", "1GiB"), None, "docs/x.md")
    assert bare.command("/out", False)[2:4] == ["--size", "1GiB"]
    with pytest.raises(SystemExit, match="--reps: x has no"):
        bare.command("/out", False, 2)
