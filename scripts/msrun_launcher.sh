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
# Console: only worker 0's log is shown live (MF_TAIL_WORKER_LOG=all shows every worker's,
# MF_TAIL_WORKER_LOG=K worker K's); MindSpore's own INFO/DEBUG lines are dropped from the console
# unless GLOG_v asks for them (0 or 1); a failed job ends within seconds of its first failing
# worker with one line: `error: rank R failed: <its error>` (msrun's traceback is dropped).
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
# One worker's log on the console (each rank's output stays in its own file): every worker
# tailed at once printed each loss line once per rank and interleaved their lines.
TAIL_WORKER_LOG=${MF_TAIL_WORKER_LOG:-0}
if [ "$TAIL_WORKER_LOG" != all ]; then
  if ! is_uint "$TAIL_WORKER_LOG" || [ "$TAIL_WORKER_LOG" -ge "$LOCAL_WORKER" ]; then
    echo "error: MF_TAIL_WORKER_LOG=$TAIL_WORKER_LOG must be 'all' or a local worker 0..$((LOCAL_WORKER - 1))" >&2
    exit 2
  fi
  MSRUN_ARGS+=(--tail_worker_log="$TAIL_WORKER_LOG")
fi
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

# The console filter: MindSpore's own INFO/DEBUG lines (`[INFO] DISTRIBUTED(pid,...)`, printed
# by the workers' C++ side at exit whatever GLOG_v says) are dropped unless GLOG_v <= 1 asks for
# them; on msrun's stderr its report of a failed worker signals this script (ALRM) and msrun's
# own traceback ("Distributed job exited with exception") is dropped; once a worker failed,
# msrun's dump of the scheduler log is dropped too (the summary line below says what failed).
FAIL_FLAG=$(mktemp "${TMPDIR:-/tmp}/mfst-launch-XXXXXX")
rm -f "$FAIL_FLAG"
LAUNCHER_PID=$$
SHOW_MS_INFO=0
[ "$GLOG_v" -le 1 ] 2>/dev/null && SHOW_MS_INFO=1
console_filter() {  # $1: "out" or "err"; line by line (awk implementations buffer pipes)
  local line held="" holding=0
  while IFS= read -r line || [ -n "$line" ]; do
    if [ "$SHOW_MS_INFO" = 0 ] && [[ $line =~ ^\[(DEBUG|INFO)\]\ [A-Z_]+\( ]]; then
      continue
    fi
    if [ "$1" = err ]; then
      if [[ $line =~ ^\[ERROR\]\ ME\(.*(Worker|Scheduler)\ process\ [0-9]+\ exit\ with\ exception ]]; then
        if [ ! -e "$FAIL_FLAG" ]; then : > "$FAIL_FLAG"; kill -ALRM "$LAUNCHER_PID" 2>/dev/null; fi
        continue
      fi
      [[ $line =~ ^\[WARNING\]\ ME\(.*(kill\ all\ other\ workers|terminating\ all\ workers) ]] && continue
      if [[ $line == "Traceback (most recent call last):" ]]; then
        held=$line$'\n'; holding=1; continue
      fi
      if [ "$holding" = 1 ]; then
        held+=$line$'\n'
        if [[ $line == "RuntimeError: Distributed job exited with exception"* ]]; then
          held=""; holding=0   # msrun's own traceback: the summary line says what failed
        elif [[ $line =~ ^[A-Za-z_][A-Za-z0-9_.]*(Error|Exception) ]]; then
          printf '%s' "$held"; held=""; holding=0
        fi
        continue
      fi
    elif [ -e "$FAIL_FLAG" ]; then
      continue   # after a failure: msrun's dump of the scheduler log
    elif [ "$JOIN" = True ] && [[ $line == "error: "* ]]; then
      continue   # a worker's error line: said once, with its rank, by the summary below
    fi
    printf '%s\n' "$line"
  done
  [ -n "$held" ] && printf '%s' "$held"
  return 0
}

# eval, as MindSpore Transformers does: quotes inside the command keep prompts with spaces whole.
exec 3> >(console_filter out)
OUT_FILTER_PID=$!
exec 4> >(console_filter err >&2)
ERR_FILTER_PID=$!
eval "\"\${MSRUN[@]}\" \"\${MSRUN_ARGS[@]}\" $EXECUTE_ORDER" >&3 2>&4 3>&- 4>&- &
MSRUN_PID=$!
exec 3>&- 4>&-

kill_job() {
  # msrun kills its workers on SIGINT; then anything still carrying our tag (workers run in
  # their own sessions) is killed by pid.
  kill -INT "$MSRUN_PID" 2>/dev/null
  local i
  for i in 1 2 3 4 5 6; do
    kill -0 "$MSRUN_PID" 2>/dev/null || break
    sleep 0.5
  done
  kill -KILL "$MSRUN_PID" 2>/dev/null
  local f pid
  for f in /proc/[0-9]*/environ; do
    pid=${f#/proc/}; pid=${pid%/environ}
    [ "$pid" = "$$" ] && continue
    if tr '\0' '\n' 2>/dev/null < "$f" | grep -qx "MF_LAUNCH_ID=$MF_LAUNCH_ID"; then
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
    env=$(tr '\0' '\n' 2>/dev/null < "$f") || continue
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

# A worker failed (msrun reported it): msrun would wait for the scheduler, which may sit out its
# cluster timeout waiting for the dead worker; end the job now. Not after a SIGTERM: then the
# other workers are finishing their graceful exit and MF_GRACE_SECONDS bounds the wait.
WORKER_FAILED=0
trap '[ "$GOT_TERM" = 1 ] || { WORKER_FAILED=1; kill_job; }' ALRM

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

[ "$WORKER_FAILED" = 1 ] && [ "$RC" = 0 ] && RC=1   # killed on purpose: msrun's 0 means nothing
# The console filters end when the job's last writer closes; their last lines come first.
for _ in $(seq 30); do
  kill -0 "$OUT_FILTER_PID" 2>/dev/null || kill -0 "$ERR_FILTER_PID" 2>/dev/null || break
  sleep 0.1
done

# The error line of a worker log: our one-line `error: ...`, else the last exception line of a
# traceback; empty when the log says no error.
error_of() {
  local line
  line=$(grep -m1 -E '^error: ' "$1")
  [ -n "$line" ] || line=$(grep -E '^[A-Za-z_][A-Za-z0-9_.]*(Error|Exception|Interrupt)(: |$)' "$1" | tail -n 1)
  printf '%s' "${line#error: }"
}

if [ "$RC" != 0 ] && [ "$JOIN" = True ] && [ "$GOT_TERM" = 0 ]; then
  # The first failing rank: of the logs that hold an error, the one written last the earliest
  # (the workers msrun killed afterwards wrote no error).
  first="" others=0
  for log in $(ls -tr "$LOG_DIR"/worker_*.log 2>/dev/null); do
    [ -n "$(error_of "$log")" ] || continue
    if [ -z "$first" ]; then first=$log; else others=$((others + 1)); fi
  done
  if [ -n "$first" ]; then
    rank=${first##*_}; rank=${rank%.log}
    more=""
    [ "$others" -gt 0 ] && more="; $others other rank(s) failed too"
    echo "error: rank $rank failed: $(error_of "$first") (log $first$more)" >&2
    [ "$RC" = 124 ] || RC=1
    rm -f "$FAIL_FLAG"
    exit "$RC"
  fi
fi
if [ "$RC" != 0 ] && [ "$JOIN" = True ]; then
  # No worker log says why (or a SIGTERM ended the job): show every worker's tail.
  for log in "$LOG_DIR"/worker_*.log "$LOG_DIR"/scheduler.log; do
    [ -f "$log" ] || continue
    echo "----- tail of $log -----" >&2
    tail -n 15 "$log" >&2
  done
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
rm -f "$FAIL_FLAG"
exit "$RC"
