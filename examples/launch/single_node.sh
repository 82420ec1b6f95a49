#!/usr/bin/env bash
# One node, every GPU:  bash examples/launch/single_node.sh RECIPE.yaml [key=value ...]
# GPUS_PER_NODE overrides the process count (on a CPU-only machine it defaults to 1).
# MAX_RESTARTS (default 3): a failed or hung rank restarts the job, which resumes from its newest good
# checkpoint by itself (0: a failure ends the job).
set -euo pipefail
[ $# -ge 1 ] || { echo "usage: $0 RECIPE.yaml [key=value ...]" >&2; exit 2; }
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
WORLD_SIZE=$GPUS_PER_NODE ${PYTHON:-python} -m sail_megatron.train --check --config "$RECIPE" "$@"
exec ${TORCHRUN:-torchrun} --standalone --nproc-per-node "$GPUS_PER_NODE" --max-restarts "${MAX_RESTARTS:-3}" \
    -m sail_megatron.train --config "$RECIPE" "$@"
