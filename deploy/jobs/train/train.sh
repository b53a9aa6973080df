#!/bin/sh
# Runs one node of a multi-node torchrun job in a pod of an Indexed Job:
#   sh /scripts/train.sh torchrun --rdzv-endpoint=HOST:PORT --rdzv-conf=... ... --out DIR ...
#
# - The pod of completion index 0 hosts the c10d rendezvous store: `is_host=true|false` is added
#   to --rdzv-conf from JOB_COMPLETION_INDEX, so no pod has to guess it from its own hostname.
# - Every other pod waits until HOST (pod 0's DNS name on the headless Service) resolves.
# - SIGTERM (preemption, drain, deletion) goes to the training processes themselves: they stop at
#   the end of the step on every rank, rank 0 writes the checkpoint and all exit 0, so every node's
#   torchrun finishes together instead of waiting for this one at its exit barrier.
# - Exit status: 0 when the run is finished (its checkpoint says so); 75 when training stopped
#   before the end with a checkpoint written (here or on another node): the Job's podFailurePolicy
#   ignores it and recreates the pod, which resumes (--resume); otherwise torchrun's own status.
set -u
STOPPED_EARLY=75

index=${JOB_COMPLETION_INDEX:?JOB_COMPLETION_INDEX is not set: run this in an Indexed Job}
is_host=false
[ "$index" = 0 ] && is_host=true

host="" out=""
n=$#
prev=""
while [ "$n" -gt 0 ]; do
  a=$1
  shift
  n=$((n - 1))
  case $a in
    --rdzv-endpoint=*) host=${a#--rdzv-endpoint=}; host=${host%:*} ;;
    --out=*) out=${a#--out=} ;;
  esac
  [ "$prev" = --out ] && out=$a
  prev=$a
  case $a in
    --rdzv-conf=*) a="$a,is_host=$is_host" ;;
  esac
  set -- "$@" "$a"
done
[ -n "$out" ] || { echo "train.sh: the command has no --out" >&2; exit 2; }
PYTHON=${PYTHON:-python3}

child="" signalled=""
stop_training() {
  signalled=TERM
  [ -n "$child" ] || exit 143   # nothing started yet: no checkpoint to write
  # the training processes are torchrun's children; without /proc/PID/task/PID/children,
  # torchrun itself forwards the signal to them
  kids=$(cat "/proc/$child/task/$child/children" 2>/dev/null)
  kill -TERM ${kids:-$child} 2>/dev/null
}
trap stop_training TERM INT

if [ "$is_host" = false ] && [ -n "$host" ]; then
  waited=0
  until "$PYTHON" -c 'import socket, sys; socket.getaddrinfo(sys.argv[1], None)' "$host" 2>/dev/null; do
    if [ "$waited" -ge "${DNS_WAIT_S:-900}" ]; then
      echo "train.sh: $host does not resolve after ${waited} s (is pod 0 running? is the headless Service there?)" >&2
      exit 1
    fi
    sleep 5
    waited=$((waited + 5))
  done
fi

"$@" &
child=$!
rc=0
while :; do
  wait "$child"
  rc=$?
  # wait returns early (status > 128) when a trapped signal arrives; wait again for the exit
  kill -0 "$child" 2>/dev/null || break
done

if [ "$rc" -ne 0 ]; then
  exit "$rc"
fi
"$PYTHON" - "$out/checkpoint.pt" <<'PY'
import sys

import torch

ckpt = torch.load(sys.argv[1], map_location="cpu", mmap=True, weights_only=False)
resume = ckpt.get("resume")
sys.exit(0 if resume is None or resume.get("finished") else 10)
PY
state=$?
if [ "$state" -eq 0 ]; then
  echo "train.sh: run finished: $out/checkpoint.pt"
  exit 0
fi
if [ "$state" -ne 10 ]; then
  echo "train.sh: training exited 0 but $out/checkpoint.pt cannot be read" >&2
  exit 1
fi
echo "train.sh: stopped before the end${signalled:+ on SIG$signalled}; checkpoint $out/checkpoint.pt; exit $STOPPED_EARLY to be restarted" >&2
exit "$STOPPED_EARLY"
