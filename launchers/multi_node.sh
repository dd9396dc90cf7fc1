#!/usr/bin/env bash
# Several nodes from a DeepSpeed hostfile ("host slots=8" per line), the same checkout + venv path on every node.
#   launchers/multi_node.sh HOSTFILE [neuclip-train args...]
#   launchers/multi_node.sh hostfile --preset ViT-L-14 --ds-config vit_l14_8xh100 ...
# From one node, DeepSpeed's pdsh/ssh launcher starts the others (passwordless ssh assumed). Where a scheduler starts
# this script once per node instead (no ssh between nodes), give each its place: NODE_RANK=k (0 = the hostfile's
# first host) and MASTER_ADDR=<first host>, e.g. NODE_RANK=$SLURM_NODEID under srun --ntasks-per-node=1.
set -euo pipefail
if [ $# -lt 1 ]; then echo "usage: $0 HOSTFILE [neuclip-train args...]" >&2; exit 2; fi
HOSTFILE=$1; shift
[ -f "$HOSTFILE" ] || { echo "multi_node.sh: hostfile not found: $HOSTFILE" >&2; exit 2; }
HERE="$(cd "$(dirname "$0")/.." && pwd)"
PY="${PYTHON:-$HERE/.venv/bin/python}"
cd "$HERE"
MASTER_ADDR="${MASTER_ADDR:-$(awk 'NF && $1 !~ /^#/ {print $1; exit}' "$HOSTFILE")}"
NO_SSH=()
if [ -n "${NODE_RANK:-}" ]; then NO_SSH=(--no_ssh --node_rank "$NODE_RANK"); fi
if ! "$PY" -c "import torch,sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  export DS_ACCELERATOR=cpu          # CPU ranks, gloo backend (neuclip_ds picks it when CUDA is absent)
fi
exec "$PY" -m deepspeed.launcher.runner --hostfile "$HOSTFILE" "${NO_SSH[@]}" --master_addr "$MASTER_ADDR" \
  --master_port "${MASTER_PORT:-29500}" --no_local_rank --module neuclip_ds.train "$@"
