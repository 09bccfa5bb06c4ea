"""The user guide as an executable test: every ```bash block of docs/user-guide.md runs, in order,
in one shell, in a fresh copy of the project (so the flows cannot overwrite a developer's output
and each flow's output folder is the one the guide names). README.md's command summary is held
to the same commands: its run lines must be the guide's, and every flag it shows must exist.

A block preceded by `<!-- guide-test: skip: WHY -->` is not run (installing the venv, running
this very suite); the reason must be given. The only things filled in are the documented
environment variables of the launcher (MF_MASTER_PORT, MF_LAUNCH_TIMEOUT): a free port, a bound.
"""
import os
import re
import shutil
import subprocess
import time

import pytest

from tests.conftest import free_port, kill_tagged

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GUIDE = os.path.join(ROOT, "docs", "user-guide.md")
README = os.path.join(ROOT, "README.md")
SKIP = re.compile(r"^<!-- guide-test: skip: (.+\S) -->$")
COMMANDS = ("inspect", "verify", "merge", "split", "reshard", "convert-hf", "export-hf",
            "ckpt-to-safetensors", "convert-layout")


def shell_blocks(path):
    """[(first line number, text, skip reason or None)] of the ```bash blocks of `path`."""
    blocks, lines = [], open(path, encoding="utf-8").read().splitlines()
    i = 0
    while i < len(lines):
        if lines[i].strip() == "```bash":
            start = i + 1
            j = start
            while lines[j].strip() != "```":
                j += 1
            prev = next((lines[k].strip() for k in range(i - 1, -1, -1) if lines[k].strip()), "")
            m = SKIP.match(prev)
            blocks.append((start + 1, "\n".join(lines[start:j]), m.group(1) if m else None))
            i = j
        i += 1
    return blocks


def commands_of(text):
    """The commands of a shell block: continuation lines joined, comments dropped, whitespace
    collapsed."""
    joined = re.sub(r"\\\n\s*", " ", text)
    out = []
    for line in joined.splitlines():
        line = line.split(" #")[0].strip() if not line.strip().startswith("#") else ""
        if line:
            out.append(" ".join(line.split()))
    return out


def fresh_copy(dst):
    """The project's tracked files (as in a fresh clone), the venv linked."""
    files = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True,
                           check=True).stdout.decode().split("\0")
    for rel in filter(None, files):
        src = os.path.join(ROOT, rel)
        if os.path.isfile(src):
            os.makedirs(os.path.dirname(os.path.join(dst, rel)), exist_ok=True)
            shutil.copy2(src, os.path.join(dst, rel))
    os.symlink(os.path.join(ROOT, ".venv"), os.path.join(dst, ".venv"))


def _children_cpu():
    import resource
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def test_guide_blocks_are_found_and_skips_say_why():
    blocks = shell_blocks(GUIDE)
    assert len(blocks) >= 10 and sum(1 for b in blocks if b[2] is None) >= 10
    assert all(reason for _, _, reason in blocks if reason is not None)


def test_readme_commands_are_the_guides_and_its_flags_exist():
    guide = {c for _, text, _ in shell_blocks(GUIDE) for c in commands_of(text)}
    readme = [c for _, text, _ in shell_blocks(README) for c in commands_of(text)]
    runs = [c for c in readme if "run_mindformer.py" in c]
    assert runs and all(c in guide for c in runs), [c for c in runs if c not in guide]
    tools = [c for c in readme if c.startswith(".venv/bin/mindformers-st ")]
    assert {c.split()[1] for c in tools} == set(COMMANDS)
    helps = {}
    for c in tools:
        cmd = c.split()[1]
        if cmd not in helps:
            res = subprocess.run([os.path.join(ROOT, ".venv", "bin", "python"), "-m",
                                  "mindformers_st.cli", cmd, "--help"], capture_output=True,
                                 text=True, cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT))
            assert res.returncode == 0, res.stderr
            helps[cmd] = res.stdout
        for flag in re.findall(r"(--[a-z][a-z0-9-]*)", c):
            assert flag in helps[cmd], f"README: `{c}` uses {flag}, which `{cmd}` does not have"


@pytest.mark.slow
def test_the_user_guide_runs_top_to_bottom(tmp_path):
    work = tmp_path / "project"
    fresh_copy(str(work))
    parts = ["set -euo pipefail"]
    ran = 0
    for line, text, skip in shell_blocks(GUIDE):
        if skip is None:
            parts.append(f"echo \"### docs/user-guide.md block at line {line} at $(date +%s)\"\n"
                         f"{text}")
            ran += 1
    script = "\n".join(parts) + "\n"
    (tmp_path / "guide.sh").write_text(script)
    tag = f"guide-{os.getpid()}-{time.time_ns()}"
    env = dict(os.environ, PYTHONPATH=str(work), MF_MASTER_PORT=str(free_port()),
               MF_LAUNCH_TIMEOUT="300", E2E_KILL_TAG=tag)
    t0, cpu0 = time.time(), _children_cpu()
    with open(tmp_path / "guide.out", "wb") as out:   # a file: a leftover process keeps no pipe
        proc = subprocess.Popen(["bash", str(tmp_path / "guide.sh")], cwd=work, env=env,
                                stdout=out, stderr=subprocess.STDOUT)
        try:
            proc.wait(timeout=840)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        finally:
            kill_tagged(tag)
    took, cpu = time.time() - t0, _children_cpu() - cpu0
    log = (tmp_path / "guide.out").read_text(errors="replace")
    assert proc.returncode == 0, f"the guide failed after {took:.0f} s:\n{log[-6000:]}"
    marks = [(int(m.group(1)), int(m.group(2)))
             for m in re.finditer(r"^### docs/user-guide.md block at line (\d+) at (\d+)$", log, re.M)]
    spans = [(line, end - start) for (line, start), (_, end) in zip(marks, marks[1:] + [(0, t0 + took)])]
    # CPU seconds of every process the guide ran: what the wall time comes to on an idle machine
    # (2 cores) whatever else shares this one
    print(f"user guide: {ran} blocks in {took:.0f} s wall, {cpu:.0f} s CPU; seconds per block "
          f"(by first line): {spans}")
    # what the guide says each flow writes, each in its own output folder
    out = work / "output"
    for path in ("strategy/ckpt_strategy_rank_1.ckpt", "checkpoint/committed.json",
                 "qwen2/checkpoint/committed.json", "qwen2_predict/predict/results.json",
                 "plan_7b/strategy/ckpt_strategy_rank_7.ckpt", "merged/param_name_map.json",
                 "predict_hf/ms_safetensors/param_name_map.json",
                 "predict_recut/unified_checkpoint/param_name_map.json",
                 "resume_mp2/checkpoint/committed.json", "v2/latest_checkpointed_iteration.txt",
                 "legacy/param_name_map.json", "mlp_dp2/merged/param_name_map.json"):
        assert (out / path).exists(), f"{path} missing:\n{log[-3000:]}"
    # the strategy folder of the 2-rank run holds its 2 files only (the 7B plan wrote its 8
    # elsewhere), and one line per event on the console
    assert sorted(os.listdir(out / "strategy")) == ["ckpt_strategy_rank_0.ckpt",
                                                    "ckpt_strategy_rank_1.ckpt"]
    assert log.count("training done: 40 steps in this run (global step 40)") == 1
    assert log.count("global step:[40/40], loss") == 1      # rank 0 prints it, rank 1 logs it
    assert "Event base dispatch" not in log and "Traceback" not in log
    assert "another prefix" not in log and "another run" not in log
    # the seed's finetune command (README; section 3) on 2 workers builds Qwen2 and trains to
    # its train_steps (tests/test_run_mindformer.py runs the seed's predict command)
    finetune = block_output(log, "finetune_qwen2_tiny.yaml")
    assert "Qwen2ForCausalLM" in finetune and "global step:[10/10]" in finetune, finetune[-3000:]
    # section 6: the same step-40 weights, complete and cut online for mp2, and distributed
    # loaded as they are on dp2, train with the same losses (same global batch, fp32 tolerance)
    cut, same = block_output(log, "output/ft_cut"), block_output(log, "output/ft_same")
    assert "mode cut" in load_line(cut) and "missing 0" in load_line(cut)
    assert "mode same_layout" in load_line(same)
    a, b = losses(cut), losses(same)
    assert sorted(a) == sorted(b) == [5, 10], (a, b)
    for step in a:
        assert abs(float(a[step]) - float(b[step])) < 1e-4, (a, b)


def losses(output):
    """{global step: printed loss} of the MFLossMonitor lines in `output`."""
    return {int(m.group(1)): m.group(2)
            for m in re.finditer(r"global step:\[(\d+)/\d+\], loss: ([0-9.]+)", output)}


def load_line(output):
    """The last `[load_checkpoint]` report in `output`."""
    lines = [line for line in output.splitlines() if "[load_checkpoint]" in line]
    assert lines, "no [load_checkpoint] report in:\n" + output[-3000:]
    return lines[-1]


def block_output(log, needle):
    """The console output of the one run block of the guide whose text contains `needle`."""
    lines = [line for line, text, skip in shell_blocks(GUIDE) if skip is None and needle in text]
    assert len(lines) == 1, (needle, lines)
    marks = list(re.finditer(r"^### docs/user-guide.md block at line (\d+) at \d+$", log, re.M))
    for m, nxt in zip(marks, marks[1:] + [None]):
        if int(m.group(1)) == lines[0]:
            return log[m.end():nxt.start() if nxt else len(log)]
    raise AssertionError(f"the block at line {lines[0]} did not run")
