#!/bin/bash
# The torchrun way: on each node, the same line. torchrun starts one process per GPU and
# sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT; layerwise reads them. Rank 0
# (the coordinator) listens on MASTER_PORT + 1 (torchrun's own store holds MASTER_PORT),
# or on LAYERWISE_PORT.
#   node 0: NODE_RANK=0 MASTER_ADDR=node0 deploy/torchrun.sh configs/cifar10-vgg8b-predsim.json
#   node 1: NODE_RANK=1 MASTER_ADDR=node0 deploy/torchrun.sh configs/cifar10-vgg8b-predsim.json
set -euo pipefail
CONFIG=${1:?usage: deploy/torchrun.sh CONFIG [RUN_DIR]}
RUN_DIR=${2:-$PWD/runs/$(basename "$CONFIG" .json)}   # on a shared filesystem
: "${LAYERWISE_SECRET:?set LAYERWISE_SECRET (the same on every node, 16 bytes or more)}"
exec torchrun --nnodes="${NNODES:-2}" --nproc-per-node="${GPUS_PER_NODE:-4}" --node-rank="${NODE_RANK:?}" \
    --master-addr="${MASTER_ADDR:?}" --master-port="${MASTER_PORT:-29500}" \
    --no-python layerwise train "$CONFIG" --run-dir "$RUN_DIR" --resume
