#!/usr/bin/env bash
# One node, NPROC ranks, through the DeepSpeed launcher (GPUs when CUDA is present, else CPU ranks over gloo).
#   launchers/single_node.sh NPROC [neuclip-train args...]
#   launchers/single_node.sh 2 --config configs/tiny-neuclip.yaml
#   launchers/single_node.sh 8 --preset ViT-B-32 --train-data '/data/{00000..01023}.tar' ...
# Preemption: SIGTERM, SIGINT or SIGUSR1 sent to this script (Kubernetes, a scheduler, Ctrl-C) is forwarded to every
# rank; the ranks save a checkpoint at the next step boundary and exit 0, and `--resume auto` continues the run.
# The launcher runs in a session of its own so that it never gets these signals itself: DeepSpeed's would kill the
# ranks 30 s later, save or not, and the runner would die and leave them running.
set -euo pipefail
if [ $# -lt 1 ]; then echo "usage: $0 NPROC [neuclip-train args...]" >&2; exit 2; fi
NPROC=$1; shift
HERE="$(cd "$(dirname "$0")/.." && pwd)"
PY="${PYTHON:-$HERE/.venv/bin/python}"
[ -x "$PY" ] || PY=python
if ! "$PY" -c "import torch,sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  export DS_ACCELERATOR=cpu          # CPU ranks, gloo backend (neuclip_ds picks it when CUDA is absent)
  export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
fi
PORT="${MASTER_PORT:-$("$PY" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}"
cd "$HERE"
setsid "$PY" -m deepspeed.launcher.runner --num_gpus "$NPROC" --no_local_rank --master_port "$PORT" \
  --module neuclip_ds.train "$@" &
RUNNER=$!

forward() {   # the ranks are the runner's grandchildren: runner -> deepspeed.launcher.launch -> ranks
  local launch ranks
  launch=$(pgrep -P "$RUNNER" | paste -sd, -) && ranks=$(pgrep -P "$launch") && kill -s "$1" $ranks 2>/dev/null
  return 0
}
trap 'forward TERM' TERM
trap 'forward INT' INT
trap 'forward USR1' USR1
while :; do
  rc=0; wait "$RUNNER" || rc=$?
  kill -0 "$RUNNER" 2>/dev/null || exit "$rc"   # still there: `wait` was cut short by a forwarded signal
done
