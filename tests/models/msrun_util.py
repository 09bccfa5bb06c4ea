"""Run a script under msrun with a free port, a hard timeout and the venv's python on PATH."""
import os
import signal
import subprocess
import sys
from tests.conftest import free_port


def run_msrun(script, args, workers, log_dir, timeout=300):
    """Launch `script args` on `workers` msrun workers; returns (returncode, tail of the logs).

    The whole process group is killed on timeout so a hung worker never hangs the test suite."""
    bindir = os.path.dirname(sys.executable)
    env = dict(os.environ, PATH=bindir + os.pathsep + os.environ.get("PATH", ""),
               GLOG_v="3", OMP_NUM_THREADS="1")
    cmd = [os.path.join(bindir, "msrun"), "--worker_num", str(workers), "--local_worker_num",
           str(workers), "--master_port", str(free_port()), "--log_dir", str(log_dir),
           "--join", "True", "--cluster_time_out", str(timeout), script] + [str(a) for a in args]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        return -1, _logs(log_dir, out)
    return proc.returncode, _logs(log_dir, out)


def _logs(log_dir, out) -> str:
    text = out.decode(errors="replace")[-3000:]
    if os.path.isdir(log_dir):
        for name in sorted(os.listdir(log_dir)):
            with open(os.path.join(log_dir, name), errors="replace") as f:
                lines = [l for l in f if "[WARNING]" not in l and "[INFO]" not in l]
            text += f"\n--- {name} ---\n" + "".join(lines[-40:])
    return text
