#!/usr/bin/env bash
# Multi-node training with torchrun: run this on EVERY node (same arguments, each node its own NODE_RANK).
#
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=node0 MASTER_PORT=29500 NPROC_PER_NODE=4 \
#       bash scripts/torchrun_multinode.sh configs/imaml_omniglot_5w1s.yaml [train.py arguments]
#   (on node1 the same with NODE_RANK=1; add --ckpt_path last to resume after a stop)
#
# Elastic rendezvous instead (no NODE_RANK; nodes may start in any order): RDZV_ENDPOINT=node0:29500 [RDZV_ID=myjob].
#
# It runs  train.py fit --config CONFIG --trainer.num_nodes NNODES --trainer.devices NPROC_PER_NODE
#          --trainer.accelerator ACCELERATOR --trainer.strategy ddp [your arguments, which win]
# under   python -m torch.distributed.run (= torchrun): world size = NNODES x NPROC_PER_NODE processes, one per device.
# The config's data.meta_batch_size is the GLOBAL meta-batch: each process gets meta_batch_size / world size tasks
# (it must divide), and the learning rate is that of the global meta-batch (the same at any world size).
#
# Variables: NNODES (required), NPROC_PER_NODE (default 1: processes = devices per node), NODE_RANK and MASTER_ADDR
# (required without RDZV_ENDPOINT), MASTER_PORT (default 29500), ACCELERATOR (default auto: the GPUs where present;
# cpu for gloo on CPUs), PYTHON (default: python).
set -euo pipefail
cd "$(dirname "$0")/.."
CONFIG=${1:?usage: NNODES=.. NODE_RANK=.. MASTER_ADDR=.. bash scripts/torchrun_multinode.sh CONFIG [arguments]}
shift
NNODES=${NNODES:?set NNODES, the number of nodes}
NPROC_PER_NODE=${NPROC_PER_NODE:-1}
if [ -n "${RDZV_ENDPOINT:-}" ]; then
  rendezvous=(--rdzv_backend c10d --rdzv_endpoint "$RDZV_ENDPOINT" --rdzv_id "${RDZV_ID:-lit-meta}")
else
  rendezvous=(--node_rank "${NODE_RANK:?set NODE_RANK (0 on the node at MASTER_ADDR) or RDZV_ENDPOINT}"
              --master_addr "${MASTER_ADDR:?set MASTER_ADDR, the address of node 0}"
              --master_port "${MASTER_PORT:-29500}")
fi
# Inside a SLURM allocation Lightning would read SLURM_* (srun's task ids), not torchrun's ranks: drop them here
# (under SLURM use scripts/slurm_multinode.sbatch instead).
for name in $(compgen -e | grep '^SLURM_' || true); do unset "$name"; done
exec "${PYTHON:-python}" -m torch.distributed.run --nnodes "$NNODES" --nproc_per_node "$NPROC_PER_NODE" \
  "${rendezvous[@]}" train.py fit --config "$CONFIG" --trainer.num_nodes "$NNODES" --trainer.devices "$NPROC_PER_NODE" \
  --trainer.accelerator "${ACCELERATOR:-auto}" --trainer.strategy ddp "$@"
