#!/usr/bin/env bash
# One node, every GPU:  bash examples/launch/single_node.sh RECIPE.yaml [key=value ...]
# GPUS_PER_NODE overrides the process count (on a CPU-only machine it defaults to 1).
set -euo pipefail
[ $# -ge 1 ] || { echo "usage: $0 RECIPE.yaml [key=value ...]" >&2; exit 2; }
RECIPE=$1; shift
GPUS_PER_NODE=${GPUS_PER_NODE:-$(nvidia-smi -L 2>/dev/null | wc -l || true)}
[ "${GPUS_PER_NODE:-0}" -gt 0 ] || GPUS_PER_NODE=1
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
exec ${TORCHRUN:-torchrun} --standalone --nproc-per-node "$GPUS_PER_NODE" \
    -m sail_megatron.train --config "$RECIPE" "$@"
