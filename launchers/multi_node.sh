#!/usr/bin/env bash
# Several nodes from a DeepSpeed hostfile ("host slots=8" per line); passwordless ssh between nodes and the same
# checkout + venv path on every node are assumed (DeepSpeed's pdsh/ssh launcher).
#   launchers/multi_node.sh HOSTFILE [neuclip-train args...]
#   launchers/multi_node.sh hostfile --preset ViT-L-14 --ds-config ds_configs/vit_l14_8xh100.json ...
set -euo pipefail
if [ $# -lt 1 ]; then echo "usage: $0 HOSTFILE [neuclip-train args...]" >&2; exit 2; fi
HOSTFILE=$1; shift
[ -f "$HOSTFILE" ] || { echo "multi_node.sh: hostfile not found: $HOSTFILE" >&2; exit 2; }
HERE="$(cd "$(dirname "$0")/.." && pwd)"
PY="${PYTHON:-$HERE/.venv/bin/python}"
cd "$HERE"
MASTER_ADDR="${MASTER_ADDR:-$(awk 'NF && $1 !~ /^#/ {print $1; exit}' "$HOSTFILE")}"
exec "$PY" -m deepspeed.launcher.runner --hostfile "$HOSTFILE" --master_addr "$MASTER_ADDR" \
  --master_port "${MASTER_PORT:-29500}" --no_local_rank --module neuclip_ds.train "$@"
