#!/usr/bin/env bash
# Launch a command on N MindSpore workers with msrun, as MindSpore Transformers' launcher does.
#
#   bash scripts/msrun_launcher.sh "<command>"                       # 8 workers on this machine
#   bash scripts/msrun_launcher.sh "<command>" WORKER_NUM
#   bash scripts/msrun_launcher.sh "<command>" WORKER_NUM MASTER_PORT LOG_DIR JOIN CLUSTER_TIME_OUT
#   bash scripts/msrun_launcher.sh "<command>" WORKER_NUM LOCAL_WORKER MASTER_ADDR MASTER_PORT \
#                                              NODE_RANK LOG_DIR JOIN CLUSTER_TIME_OUT
#
# "<command>" is "run_mindformer.py --config ..." with or without a leading "python".
# Defaults: 8 workers, 127.0.0.1:8118, node 0, log dir output/msrun_log, join True, 7200 s.
# Differences from MindSpore Transformers (docs/runtime.md): JOIN defaults to True so that this
# script waits and exits non-zero when a worker fails (printing the tail of its log);
# MF_LAUNCH_TIMEOUT=SECONDS kills the whole job (exit 124) when it runs longer;
# MF_BIND_CORE=True passes --bind_core=True (off by default: CPU workers share few cores);
# SIGTERM is passed on to the workers (graceful exit: docs/runtime.md), MF_GRACE_SECONDS (300)
# later the job is killed;
# MF_MASTER_PORT changes the default port 8118 of the 1- and 2-argument forms.
set -u

WORKER_NUM=8
LOCAL_WORKER=8
MASTER_ADDR="127.0.0.1"
MASTER_PORT=${MF_MASTER_PORT:-8118}   # MF_MASTER_PORT: default port for the 1/2-argument forms
NODE_RANK=0
LOG_DIR="output/msrun_log"
JOIN="True"
CLUSTER_TIME_OUT=7200

usage() {
  echo "Usage: bash msrun_launcher.sh [EXECUTE_ORDER]                       (8 workers on this machine)"
  echo "Usage: bash msrun_launcher.sh [EXECUTE_ORDER] [WORKER_NUM]"
  echo "Usage: bash msrun_launcher.sh [EXECUTE_ORDER] [WORKER_NUM] [MASTER_PORT] [LOG_DIR] [JOIN] [CLUSTER_TIME_OUT]"
  echo "Usage: bash msrun_launcher.sh [EXECUTE_ORDER] [WORKER_NUM] [LOCAL_WORKER] [MASTER_ADDR] [MASTER_PORT] [NODE_RANK] [LOG_DIR] [JOIN] [CLUSTER_TIME_OUT]"
}

if [ $# != 1 ] && [ $# != 2 ] && [ $# != 6 ] && [ $# != 9 ]; then
  echo "error: expected 1, 2, 6 or 9 arguments, got $#" >&2
  usage >&2
  exit 2
fi

EXECUTE_ORDER=$1
case $# in
  1) echo "No worker number given: running on the default $WORKER_NUM workers." ;;
  2) WORKER_NUM=$2; LOCAL_WORKER=$2 ;;
  6) WORKER_NUM=$2; LOCAL_WORKER=$2; MASTER_PORT=$3; LOG_DIR=$4; JOIN=$5; CLUSTER_TIME_OUT=$6 ;;
  9) WORKER_NUM=$2; LOCAL_WORKER=$3; MASTER_ADDR=$4; MASTER_PORT=$5; NODE_RANK=$6
     LOG_DIR=$7; JOIN=$8; CLUSTER_TIME_OUT=$9 ;;
esac

is_uint() { [[ $1 =~ ^[0-9]+$ ]]; }
for pair in "WORKER_NUM=$WORKER_NUM" "LOCAL_WORKER=$LOCAL_WORKER" "MASTER_PORT=$MASTER_PORT" \
            "NODE_RANK=$NODE_RANK"; do
  if ! is_uint "${pair#*=}"; then
    echo "error: ${pair%%=*}=${pair#*=} is not a non-negative integer" >&2
    exit 2
  fi
done
if ! [[ $CLUSTER_TIME_OUT =~ ^-?[0-9]+$ ]]; then
  echo "error: CLUSTER_TIME_OUT=$CLUSTER_TIME_OUT is not an integer" >&2
  exit 2
fi
if [ "$WORKER_NUM" -lt 1 ] || [ "$LOCAL_WORKER" -lt 1 ] || [ "$LOCAL_WORKER" -gt "$WORKER_NUM" ]; then
  echo "error: need 1 <= LOCAL_WORKER ($LOCAL_WORKER) <= WORKER_NUM ($WORKER_NUM)" >&2
  exit 2
fi
if [ "$MASTER_PORT" -lt 1024 ] || [ "$MASTER_PORT" -gt 65535 ]; then
  echo "error: MASTER_PORT=$MASTER_PORT must be in 1024..65535" >&2
  exit 2
fi
case $JOIN in
  True|true) JOIN=True ;;
  False|false) JOIN=False ;;
  *) echo "error: JOIN=$JOIN must be True or False" >&2; exit 2 ;;
esac

# The project root on PYTHONPATH (as MindSpore Transformers does), so run_mindformer.py and
# mindformers_st import from this checkout.
SCRIPTS_DIR=$(cd "$(dirname "$0")" && pwd)
ROOT_DIR=$(dirname "$SCRIPTS_DIR")
export PYTHONPATH="$ROOT_DIR${PYTHONPATH:+:$PYTHONPATH}"

# msrun from PATH, else from the venv next to this script. msrun starts workers with the
# `python` found on PATH, so that venv's bin goes first too.
if ! command -v msrun >/dev/null 2>&1; then
  if [ -x "$ROOT_DIR/.venv/bin/msrun" ]; then
    export PATH="$ROOT_DIR/.venv/bin:$PATH"
  else
    echo "error: msrun not found on PATH nor in $ROOT_DIR/.venv/bin; run: bash scripts/setup.sh" >&2
    exit 127
  fi
fi

# A leading python interpreter is optional: msrun adds `python` itself. An interpreter given by
# path (e.g. .venv/bin/python) is honoured by putting its folder first on PATH.
read -r -a CMD_WORDS <<< "$EXECUTE_ORDER"
if [ ${#CMD_WORDS[@]} -eq 0 ]; then
  echo "error: empty command" >&2
  exit 2
fi
FIRST=${CMD_WORDS[0]}
case $(basename "$FIRST") in
  python|python3|python3.*)
    if [[ $FIRST == */* ]]; then
      export PATH="$(cd "$(dirname "$FIRST")" && pwd):$PATH"
    fi
    EXECUTE_ORDER=${EXECUTE_ORDER#*"$FIRST"}
    ;;
esac

# MindSpore C++ warnings (cluster building retries) drown the job output; ERROR level unless set.
export GLOG_v=${GLOG_v:-3}

# A tag in every worker's environment: lets the timeout find exactly this job's processes.
export MF_LAUNCH_ID="mfst-$$-$RANDOM$RANDOM"

MSRUN_ARGS=(--worker_num="$WORKER_NUM" --local_worker_num="$LOCAL_WORKER"
            --master_addr="$MASTER_ADDR" --master_port="$MASTER_PORT" --node_rank="$NODE_RANK"
            --log_dir="$LOG_DIR" --join="$JOIN" --cluster_time_out="$CLUSTER_TIME_OUT")
if [ "${MF_BIND_CORE:-False}" = "True" ]; then
  MSRUN_ARGS+=(--bind_core=True)
fi
if [ "$WORKER_NUM" != "$LOCAL_WORKER" ]; then
  echo "worker_num=$WORKER_NUM, local_worker=$LOCAL_WORKER: run this script on the other nodes" \
       "with a different NODE_RANK."
fi

# msrun starts the scheduler on every node whose address is MASTER_ADDR. Several "nodes" on one
# machine (MASTER_ADDR local to all of them) would each start one and all but the first fail,
# so in the multi-node form only NODE_RANK 0 may host the scheduler.
MSRUN=(msrun)
if [ "$WORKER_NUM" != "$LOCAL_WORKER" ] && [ "$NODE_RANK" != 0 ]; then
  MSRUN_PY="$(dirname "$(command -v msrun)")/python"
  [ -x "$MSRUN_PY" ] || MSRUN_PY=python
  MSRUN=("$MSRUN_PY" -c "import mindspore.parallel.cluster.process_entity._api as api
api._is_local_ip = lambda _addr: False  # this node (rank > 0) never hosts the scheduler
from mindspore.parallel.cluster.run import main
main()")
fi

mkdir -p "$LOG_DIR"
echo "Running Command: msrun ${MSRUN_ARGS[*]} $EXECUTE_ORDER"
echo "Please check log files in $LOG_DIR"

# eval, as MindSpore Transformers does: quotes inside the command keep prompts with spaces whole.
eval "\"\${MSRUN[@]}\" \"\${MSRUN_ARGS[@]}\" $EXECUTE_ORDER" &
MSRUN_PID=$!

kill_job() {
  # msrun kills its workers on SIGINT; then anything still carrying our tag (workers run in
  # their own sessions) is killed by pid.
  kill -INT "$MSRUN_PID" 2>/dev/null
  sleep 3
  kill -KILL "$MSRUN_PID" 2>/dev/null
  local f pid
  for f in /proc/[0-9]*/environ; do
    pid=${f#/proc/}; pid=${pid%/environ}
    [ "$pid" = "$$" ] && continue
    if tr '\0' '\n' < "$f" 2>/dev/null | grep -qx "MF_LAUNCH_ID=$MF_LAUNCH_ID"; then
      kill -KILL "$pid" 2>/dev/null
    fi
  done
}
trap 'kill_job; exit 130' INT

# SIGTERM (a preempted cluster's notice) goes on to the workers only — not msrun, not the
# scheduler — so a run with use_graceful_exit: True finishes its step, saves, commits and exits
# 0 on every rank (the others exit 143 with one line). After MF_GRACE_SECONDS (default 300) the
# job is killed as on SIGINT.
GOT_TERM=0
forward_term() {
  [ "$GOT_TERM" = 1 ] && return
  GOT_TERM=1
  echo "SIGTERM: passing it on to the workers (use_graceful_exit saves the current step);" \
       "killing the job after ${MF_GRACE_SECONDS:-300} s" >&2
  local f pid env
  for f in /proc/[0-9]*/environ; do
    pid=${f#/proc/}; pid=${pid%/environ}
    [ "$pid" = "$$" ] && continue
    env=$(tr '\0' '\n' < "$f" 2>/dev/null) || continue
    if grep -qx "MF_LAUNCH_ID=$MF_LAUNCH_ID" <<< "$env" && grep -qx "MS_ROLE=MS_WORKER" <<< "$env" \
       && [ "$(cat "/proc/$pid/comm" 2>/dev/null)" != tail ]; then
      kill -TERM "$pid" 2>/dev/null
    fi
  done
  ( sleep "${MF_GRACE_SECONDS:-300}" && kill -USR2 $$ 2>/dev/null ) </dev/null >/dev/null 2>&1 &
  GRACE_PID=$!
}
trap forward_term TERM
trap 'kill_job' USR2

TIMED_OUT=0
if [ -n "${MF_LAUNCH_TIMEOUT:-}" ]; then
  # Detached from our stdout/stderr: a caller reading this script's output through a pipe must
  # not wait for the watchdog's sleep.
  ( sleep "$MF_LAUNCH_TIMEOUT" && kill -USR1 $$ 2>/dev/null ) </dev/null >/dev/null 2>&1 &
  WATCHDOG_PID=$!
  trap 'TIMED_OUT=1; kill_job' USR1
fi

wait "$MSRUN_PID"
RC=$?
# `wait` returns early (>128) when a trapped signal arrives; wait again for msrun itself.
while kill -0 "$MSRUN_PID" 2>/dev/null; do
  wait "$MSRUN_PID"
  RC=$?
done
if [ -n "${WATCHDOG_PID:-}" ]; then
  pkill -P "$WATCHDOG_PID" sleep 2>/dev/null   # its sleep first, or it outlives us
  kill "$WATCHDOG_PID" 2>/dev/null
  wait "$WATCHDOG_PID" 2>/dev/null
fi

if [ -n "${GRACE_PID:-}" ]; then
  pkill -P "$GRACE_PID" sleep 2>/dev/null
  kill "$GRACE_PID" 2>/dev/null
  wait "$GRACE_PID" 2>/dev/null
fi

if [ "$TIMED_OUT" = 1 ]; then
  echo "error: the job ran longer than MF_LAUNCH_TIMEOUT=${MF_LAUNCH_TIMEOUT}s and was killed" >&2
  RC=124
fi

if [ "$RC" != 0 ] && [ "$JOIN" = True ]; then
  # Show the workers whose log has an error first; if none says why, show every worker's tail.
  shown=0
  for log in "$LOG_DIR"/worker_*.log; do
    [ -f "$log" ] || continue
    if grep -qE "Traceback|Error|error:" "$log"; then
      echo "----- tail of $log -----" >&2
      tail -n 30 "$log" >&2
      shown=1
    fi
  done
  if [ "$shown" = 0 ]; then
    for log in "$LOG_DIR"/worker_*.log "$LOG_DIR"/scheduler.log; do
      [ -f "$log" ] || continue
      echo "----- tail of $log -----" >&2
      tail -n 15 "$log" >&2
    done
  fi
  # The workers' own one-line reasons (run_mindformer.py prints one `error:` line), each once, last.
  grep -h "^error: " "$LOG_DIR"/worker_*.log 2>/dev/null | sort -u | sed 's/^error: /error: worker: /' >&2
  if [ "$GOT_TERM" = 1 ] && [ "$RC" != 124 ]; then
    echo "error: terminated (SIGTERM) before every worker had saved and stopped; logs in $LOG_DIR" >&2
    RC=143
  else
    echo "error: distributed job failed (exit $RC); logs in $LOG_DIR" >&2
    [ "$RC" = 124 ] || RC=1
  fi
elif [ "$GOT_TERM" = 1 ] && [ "$RC" = 0 ]; then
  echo "SIGTERM: every worker saved and stopped (graceful exit)"
fi
exit "$RC"
