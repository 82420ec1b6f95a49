#!/usr/bin/env bash
# Many nodes with torchrun's c10d rendezvous. Run the same line on every node:
#   NNODES=4 MASTER_ADDR=node0 bash examples/launch/multi_node.sh RECIPE.yaml [key=value ...]
# MASTER_ADDR is any one node (it hosts the rendezvous store); ranks are assigned in contiguous
# blocks per node, so tensor-parallel groups (consecutive ranks) stay inside a node.
# Optional: MASTER_PORT (29500), GPUS_PER_NODE (all visible GPUs), RDZV_ID (one per job),
# MAX_RESTARTS (3): a failed or hung rank restarts the job on every node, which resumes from its newest
# good checkpoint by itself (0: a failure ends the job).
set -euo pipefail
[ $# -ge 1 ] || { echo "usage: $0 RECIPE.yaml [key=value ...]" >&2; exit 2; }
: "${NNODES:?set NNODES to the number of nodes}" "${MASTER_ADDR:?set MASTER_ADDR to the first node}"
RECIPE=$1; shift
GPUS_PER_NODE=${GPUS_PER_NODE:-$(nvidia-smi -L 2>/dev/null | wc -l || true)}
[ "${GPUS_PER_NODE:-0}" -gt 0 ] || GPUS_PER_NODE=1
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
# A fresh rendezvous store (on a fresh port) for every launch attempt: in torchrun's shared one, ranks
# restarted after a failure could meet under different keys and wait out the process-group timeout.
export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1
# One CUDA hardware queue keeps tensor-parallel communication ahead of compute (megatron-core); it must be
# set before a process creates its CUDA context, so it is set here rather than in the trainer.
export CUDA_DEVICE_MAX_CONNECTIONS=${CUDA_DEVICE_MAX_CONNECTIONS:-1}
# User errors (recipe, data, tokenizer, checkpoints) fail once here, not once per torchrun restart.
WORLD_SIZE=$((NNODES * GPUS_PER_NODE)) ${PYTHON:-python} -m sail_megatron.train --check --config "$RECIPE" "$@"
exec ${TORCHRUN:-torchrun} --nnodes "$NNODES" --nproc-per-node "$GPUS_PER_NODE" \
    --rdzv-backend c10d --rdzv-endpoint "$MASTER_ADDR:${MASTER_PORT:-29500}" --rdzv-id "${RDZV_ID:-sail-train}" \
    --max-restarts "${MAX_RESTARTS:-3}" \
    -m sail_megatron.train --config "$RECIPE" "$@"
