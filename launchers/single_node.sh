#!/usr/bin/env bash
# One node, NPROC ranks, through the DeepSpeed launcher (GPUs when CUDA is present, else CPU ranks over gloo).
#   launchers/single_node.sh NPROC [neuclip-train args...]
#   launchers/single_node.sh 2 --config configs/tiny-neuclip.yaml
#   launchers/single_node.sh 8 --preset ViT-B-32 --train-data '/data/{00000..01023}.tar' ...
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
exec "$PY" -m deepspeed.launcher.runner --num_gpus "$NPROC" --no_local_rank --master_port "$PORT" \
  --module neuclip_ds.train "$@"
