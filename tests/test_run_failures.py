"""run_mindformer.py ends every fault in one `error:` line naming the key or path (the same
reporter as the offline tools, mindformers_st/cli.py): a dataset path that is not MindRecord, an
output_dir that is a file, a prompt longer than max_decode_length, a full disk during a training
save and during the online merge into unified_checkpoint (nothing half-built left behind)."""
import os
import re
import shutil
import subprocess
import sys
import uuid

import pytest

from mindformers_st.data.mindrecord import mindrecord_files
from mindformers_st.errors import ConfigError
from mindformers_st.records.commit import load_committed_entries

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PRETRAIN = os.path.join(ROOT, "configs", "llama2", "pretrain_llama2_tiny.yaml")
PREDICT = os.path.join(ROOT, "configs", "llama2", "predict_llama2_tiny.yaml")


def runner():
    from tests.test_run_mindformer import runner as load
    return load()


def _env(**extra):
    return dict(os.environ, PYTHONPATH=ROOT, GLOG_v="3", OMP_NUM_THREADS="1", **extra)


def run_job(data, out, *args, config=PRETRAIN, env=None, timeout=300):
    """run_mindformer.py on one process; returns (exit code, stdout, stderr)."""
    cmd = [sys.executable, os.path.join(ROOT, "run_mindformer.py"), "--config", config,
           "--use_parallel", "False", "--output_dir", str(out),
           "--processor.tokenizer.tokenizer_file", str(data / "tokenizer.json")] + list(args)
    res = subprocess.run(cmd, cwd=str(out.parent if hasattr(out, "parent") else ROOT),
                         capture_output=True, text=True, timeout=timeout, env=_env(**(env or {})))
    return res.returncode, res.stdout, res.stderr


def train_args(data, steps=4, every=2, *extra):
    return ["--run_mode", "train", "--train_dataset_dir", str(data / "wiki.mindrecord"),
            "--runner_config.train_steps", str(steps), "--callbacks.0.per_print_times", "1",
            "--callbacks.1.save_checkpoint_steps", str(every)] + list(extra)


def one_error_line(err):
    """The single `error:` line of stderr (asserts there is exactly one and no traceback)."""
    lines = [l for l in err.splitlines() if l.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in err, err[-3000:]
    return lines[0]


# ---- fast --------------------------------------------------------------------------------------

def test_a_dataset_file_that_is_not_mindrecord_names_the_key(tmp_path):
    text = tmp_path / "data.txt"
    text.write_text("just words, no MindRecord header\n" * 10)
    with pytest.raises(ConfigError, match=r"--train_dataset_dir.*data.txt is not a MindRecord file "
                                          r"\(no MindRecord header\)"):
        mindrecord_files(str(text))
    # a real header whose .db index is gone: named too (MindSpore would fail deep inside)
    fake = tmp_path / "wiki.mindrecord"
    fake.write_bytes((32).to_bytes(8, "little") + b'{"header_size":1}'.ljust(32) + b"\0" * 64)
    with pytest.raises(ConfigError, match=r"wiki.mindrecord.db is missing"):
        mindrecord_files(str(fake))
    (tmp_path / "wiki.mindrecord.db").write_bytes(b"")
    assert mindrecord_files(str(fake)) == [str(fake)]


def test_an_output_dir_that_is_a_file_is_one_line(tmp_path, capsys):
    afile = tmp_path / "out"
    afile.write_text("x")
    assert runner().main(["--config", PRETRAIN, "--use_parallel", "False",
                          "--output_dir", str(afile)]) == 1
    line = one_error_line(capsys.readouterr().err)
    assert "'output_dir' (--output_dir)" in line and str(afile) in line and "is a file" in line


# ---- through the real script -------------------------------------------------------------------

@pytest.mark.slow
def test_a_wrong_train_dataset_dir_and_an_over_long_prompt_are_one_line(tiny_run_data, tmp_path):
    code, _, err = run_job(tiny_run_data, tmp_path / "o1", "--run_mode", "train",
                           "--train_dataset_dir", str(tiny_run_data / "tokenizer.json"))
    assert code == 1
    assert "--train_dataset_dir" in one_error_line(err) and "tokenizer.json" in err
    # As MindSpore Transformers: a prompt longer than max_decode_length is an error (it used
    # to exit 0 having generated nothing)
    code, out, err = run_job(tiny_run_data, tmp_path / "o2", "--run_mode", "predict",
                             "--predict_data", "short one", "the red fox lives in the forest " * 20,
                             config=PREDICT)
    assert code == 1 and "text_generation_text" not in out
    line = one_error_line(err)
    assert "--predict_data prompt 2 of 2" in line and "max_decode_length" in line


@pytest.fixture
def small_disk(tmp_path):
    """A 3 MiB tmpfs (root can mount one; skipped elsewhere)."""
    mnt = tmp_path / f"disk-{uuid.uuid4().hex[:6]}"
    mnt.mkdir()
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mnt)],
                         capture_output=True)
    if res.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {res.stderr.decode(errors='replace').strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


@pytest.mark.slow
def test_a_full_disk_names_the_path_and_what_was_written(tiny_run_data, tmp_path, small_disk):
    # training save: step 2 fits, step 4 does not -> one line naming the file; step 2 stays
    out = small_disk / "run"
    code, _, err = run_job(tiny_run_data, out, *train_args(tiny_run_data, 4, 2))
    assert code == 1
    line = one_error_line(err)
    assert "training save of global step 4" in line and "No space left on device (ENOSPC)" in line
    assert os.path.join(str(out), "checkpoint", "rank_0", "llama2_tiny_rank_0-1_4.safetensors") in line
    assert [e.global_step for e in load_committed_entries(str(out / "checkpoint"))] == [2]
    # online merge into unified_checkpoint on the full disk: one line, no half-built folder
    src = tmp_path / "ckpt"
    shutil.copytree(out / "checkpoint", src)
    shutil.rmtree(out)
    filler = small_disk / "filler"
    filler.write_bytes(b"\0" * (2 * 1024 * 1024 + 512 * 1024))
    code, _, err = run_job(tiny_run_data, small_disk / "run2", *train_args(tiny_run_data, 4, 2),
                           "--load_checkpoint", str(src), "--auto_trans_ckpt", "True",
                           "--derived_write", "first")
    assert code == 1
    line = one_error_line(err)
    assert "online merge of distributed weights into unified_checkpoint" in line
    assert "ENOSPC" in line and str(small_disk / "run2") in line
    assert not [n for n in os.listdir(small_disk / "run2") if n.endswith(".building")]
    # a read-only disk: the first write (the strategy files) names itself and EROFS
    res = subprocess.run(["mount", "-o", "remount,ro", str(small_disk)], capture_output=True)
    if res.returncode == 0:
        code, _, err = run_job(tiny_run_data, small_disk / "run3", *train_args(tiny_run_data, 4, 2))
        assert code == 1
        line = one_error_line(err)
        assert "strategy files" in line and "Read-only file system (EROFS)" in line
        assert str(small_disk / "run3") in line


@pytest.mark.slow
def test_under_the_msrun_launcher_the_workers_line_comes_last(tmp_path):
    from tests.conftest import free_port
    afile = tmp_path / "out"
    afile.write_text("x")
    cmd = " ".join([os.path.join(ROOT, "run_mindformer.py"), "--config", PRETRAIN,
                    "--use_parallel", "True", "--output_dir", str(afile)])
    env = dict(_env(), PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"])
    res = subprocess.run(["bash", os.path.join(ROOT, "scripts", "msrun_launcher.sh"), cmd, "2",
                          str(free_port()), str(tmp_path / "log"), "True", "60"],
                         cwd=str(tmp_path), env=env, capture_output=True, text=True, timeout=180)
    assert res.returncode == 1
    last = res.stderr.strip().splitlines()[-1]   # the launcher's one line: first failing rank
    assert re.match(r"error: rank [01] failed: config key 'output_dir' \(--output_dir\)", last), last
