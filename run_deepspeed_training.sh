#!/usr/bin/env bash
# Launch GraspGPT training with DeepSpeed, from any directory.
#
#   ./run_deepspeed_training.sh [N] [launcher flags] [training flags]
#
# N: ranks on this machine (default: every visible GPU, or 2 CPU ranks without one).
# Launcher flags go to `deepspeed`: --hostfile FILE --num_nodes --master_addr --master_port
#   --include --exclude --no_ssh --node_rank --launcher. With --hostfile, each host's slots
#   decide the ranks (N is ignored).
# On one node a free --master_port is picked when none is given (a busy one given is an error);
#   with --hostfile the given port, or deepspeed's default 29500, is used as is.
# Everything else goes to graspGPT/train_deepspeed.py (see its --help).
# CUDA_VISIBLE_DEVICES is respected as the caller set it.
# SIGTERM, SIGINT (Ctrl-C) or SIGUSR1 to this script reaches every local rank: they agree on a step,
# save a checkpoint and exit 0 (then so does this script). Before the ranks exist it ends the launch.
# (Signalled directly, `deepspeed` itself would SIGTERM the ranks and SIGKILL them 30 s later, exit 1.)
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
python="${PYTHON:-python3}"

ranks=""
if [[ $# -gt 0 && "$1" =~ ^[0-9]+$ ]]; then
  ranks="$1"
  shift
  if [[ "$ranks" -lt 1 ]]; then
    echo "error: the number of ranks must be at least 1 (got $ranks)" >&2
    exit 2
  fi
fi

launcher_args=()
train_args=()
hostfile=""
master_port=""
while [[ $# -gt 0 ]]; do
  case "$1" in
    --hostfile|--num_nodes|--master_addr|--master_port|--include|--exclude|--node_rank|--launcher)
      [[ $# -ge 2 ]] || { echo "error: $1 needs a value" >&2; exit 2; }
      [[ "$1" == --hostfile ]] && hostfile="$2"
      [[ "$1" == --master_port ]] && master_port="$2"
      launcher_args+=("$1" "$2"); shift 2 ;;
    --hostfile=*|--num_nodes=*|--master_addr=*|--master_port=*|--include=*|--exclude=*|--node_rank=*|--launcher=*)
      [[ "$1" == --hostfile=* ]] && hostfile="${1#*=}"
      [[ "$1" == --master_port=* ]] && master_port="${1#*=}"
      launcher_args+=("$1"); shift ;;
    --no_ssh|--no_ssh_check|--no_local_rank)
      launcher_args+=("$1"); shift ;;
    *)
      train_args+=("$1"); shift ;;
  esac
done

if [[ -n "$hostfile" && ! -f "$hostfile" ]]; then
  echo "error: hostfile $hostfile not found; write one line per node, e.g. 'node1 slots=4'" >&2
  exit 2
fi

if [[ -z "$hostfile" ]]; then
  visible_gpus=$("$python" -c 'import torch; print(torch.cuda.device_count() if torch.cuda.is_available() else 0)' 2>/dev/null || echo 0)
  if [[ -z "$ranks" ]]; then
    ranks=$(( visible_gpus > 0 ? visible_gpus : 2 ))
  elif [[ "$visible_gpus" -gt 0 && "$ranks" -gt "$visible_gpus" ]]; then
    echo "error: asked for $ranks ranks but only $visible_gpus GPU(s) are visible (CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES:-unset})" >&2
    exit 2
  fi
  if [[ "$visible_gpus" -gt 0 && -n "${CUDA_VISIBLE_DEVICES:-}" ]]; then
    # deepspeed ignores CUDA_VISIBLE_DEVICES when --num_gpus is given; --include keeps the caller's choice.
    IFS=',' read -r -a devs <<< "$CUDA_VISIBLE_DEVICES"
    launcher_args+=(--include "localhost:$(IFS=,; echo "${devs[*]:0:$ranks}")")
    unset CUDA_VISIBLE_DEVICES  # --include now names the physical devices
  else
    launcher_args+=(--num_gpus "$ranks")
  fi
  # One node: the rendezvous port only has to be free here. Without --master_port take a free one rather
  # than deepspeed's 29500, where another job's ranks may already listen (and ours would join them).
  # (Several nodes keep the given or default port: every node must name the same one.)
  port_check='import socket, sys
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as torch binds it: a port in TIME_WAIT is free
try:
    s.bind(("", int(sys.argv[1])))
except OSError:
    sys.exit(1)
print(s.getsockname()[1])'
  if [[ -z "$master_port" ]]; then
    master_port=$("$python" -c "$port_check" 0)
    launcher_args+=(--master_port "$master_port")
  elif ! "$python" -c "$port_check" "$master_port" >/dev/null 2>&1; then
    echo "error: --master_port $master_port is in use on this machine (another job?); pass a free port, or leave" \
      "--master_port out and a free one is picked" >&2
    exit 2
  fi
  echo "launching $ranks rank(s) on $( [[ "$visible_gpus" -gt 0 ]] && echo GPU || echo CPU ), master port $master_port"
fi

# Own session: a Ctrl-C in the terminal reaches only this script, which forwards it (below).
setsid "$python" -m deepspeed.launcher.runner "${launcher_args[@]}" \
  "$root/graspGPT/train_deepspeed.py" "${train_args[@]}" &
launcher=$!

descendants() {
  local child
  for child in $(pgrep -P "$1"); do echo "$child"; descendants "$child"; done
}
forward() {  # hand the signal to this launch's training ranks, not to deepspeed's launcher (it would kill them)
  local sig=$1 pid found=""
  for pid in $(descendants "$launcher"); do
    # The ranks are the children of deepspeed's per-node launch.py.
    if tr '\0' ' ' < "/proc/$pid/cmdline" 2>/dev/null | grep -q "deepspeed.launcher.launch"; then
      pkill -"$sig" -P "$pid" && found=1
    fi
  done
  [[ -n "$found" ]] || kill -s "$sig" -- "-$launcher" 2>/dev/null || true  # no rank yet: nothing to save
}
trap 'forward TERM' TERM
trap 'forward INT' INT
trap 'forward USR1' USR1

status=0
while true; do
  wait "$launcher" && status=0 || status=$?
  # wait returns >128 when a trapped signal interrupts it; the launcher is still running then.
  kill -0 "$launcher" 2>/dev/null || break
done
exit "$status"
