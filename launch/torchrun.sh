#!/usr/bin/env bash
# openbook under torchrun: one process per device on each node. Lightning's TorchElasticEnvironment
# reads torchrun's RANK / LOCAL_RANK / WORLD_SIZE, so the recipe only needs devices and num_nodes,
# which this script sets from its own arguments. Run the same line on every node with its --node_rank:
#
#   launch/torchrun.sh --nnodes 2 --nproc_per_node 4 --node_rank 0 --master_addr HEAD \
#       --config configs/default.yaml [--set KEY=VALUE ...]
#
# PYTHON picks the interpreter (default: python3 on PATH). `openbook launch --target torchrun --dry-run`
# prints the lines for a given cluster shape.
set -euo pipefail

nnodes=1 nproc=1 node_rank=0 master_addr=localhost master_port=29500 config=""
sets=()
while (( $# )); do
  case "$1" in
    --nnodes) nnodes=$2; shift 2 ;;
    --nproc_per_node) nproc=$2; shift 2 ;;
    --node_rank) node_rank=$2; shift 2 ;;
    --master_addr) master_addr=$2; shift 2 ;;
    --master_port) master_port=$2; shift 2 ;;
    --config) config=$2; shift 2 ;;
    --set) sets+=(--set "$2"); shift 2 ;;
    *) echo "torchrun.sh: unknown argument '$1'" >&2; exit 2 ;;
  esac
done
if [[ -z $config ]]; then echo "torchrun.sh: --config is required" >&2; exit 2; fi

strategy=()
if (( nnodes * nproc > 1 )); then strategy=(--set train.strategy=ddp); fi

# torchrun sets OMP_NUM_THREADS=1 by itself only with several processes per node: one per node would run with
# OpenMP's own default, and a run's last bits would depend on the cluster's shape (a 2-host run, one process each,
# differed from the same run as 2 processes on one host). Every shape gets the same: 1 unless set.
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}

exec "${PYTHON:-python3}" -m torch.distributed.run \
  --nnodes "$nnodes" --nproc_per_node "$nproc" --node_rank "$node_rank" \
  --master_addr "$master_addr" --master_port "$master_port" \
  -m openbook.cli train --config "$config" --quiet \
  --set train.devices="$nproc" --set train.num_nodes="$nnodes" "${strategy[@]}" "${sets[@]}"
