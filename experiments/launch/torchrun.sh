#!/usr/bin/env bash
# Launch train.py on one or more nodes with torchrun (one process per GPU); Hydra overrides pass through.
#
#   experiments/launch/torchrun.sh llm=vicuna_7b encoder=clip_l14_336 ...                   # 1 node, all GPUs
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=node0 RUN_ID=exp1 experiments/launch/torchrun.sh ...   # on node0
#   NNODES=2 NODE_RANK=1 MASTER_ADDR=node0 RUN_ID=exp1 experiments/launch/torchrun.sh ...   # on node1
#   NPROC=2 experiments/launch/torchrun.sh trainer.accelerator=cpu trainer.precision=32-true  # CPU, gloo
#
# Environment: TRAINER (fsdp2 | ddp | fsdp; default fsdp2), NPROC (processes per node; default: the GPUs
# nvidia-smi lists, else 1), NNODES (1), NODE_RANK (0), MASTER_ADDR / MASTER_PORT (multi-node
# rendezvous; 29500), RUN_ID (the same on every node; default a timestamp, fine for one node).
# VTC_RUN_DIR pins the Hydra run directory, so every rank (and every node, on a shared filesystem)
# writes the same folder: outputs/runs/torchrun-$RUN_ID unless set. Relaunching with the same
# RUN_ID resumes from that folder's checkpoints/last.ckpt when it exists.
# Never pass -m (a Hydra sweep): torchrun starts the processes, each runs exactly one job.
set -euo pipefail
cd "$(dirname "$0")/../.."

PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python
TRAINER=${TRAINER:-fsdp2}
if [ -z "${NPROC:-}" ]; then
  NPROC=$( (command -v nvidia-smi >/dev/null && nvidia-smi -L | grep -c '^GPU') || echo 1)
  [ "$NPROC" -ge 1 ] 2>/dev/null || NPROC=1
fi
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
RUN_ID=${RUN_ID:-$(date +%Y-%m-%d_%H-%M-%S)}
export VTC_RUN_DIR=${VTC_RUN_DIR:-$PWD/outputs/runs/torchrun-$RUN_ID}

RESUME=()
if [ -e "$VTC_RUN_DIR/checkpoints/last.ckpt" ]; then
  RESUME=(ckpt_path=last)
fi

if [ "$NNODES" -eq 1 ]; then
  RDZV=(--standalone)
else
  RDZV=(--rdzv-backend c10d --rdzv-endpoint "${MASTER_ADDR:?set MASTER_ADDR for multi-node}:${MASTER_PORT:-29500}"
        --rdzv-id "$RUN_ID" --node-rank "$NODE_RANK")
fi

echo "torchrun: $NNODES node(s) x $NPROC process(es), trainer=$TRAINER, run dir $VTC_RUN_DIR" >&2
exec "$PY" -m torch.distributed.run "${RDZV[@]}" --nnodes "$NNODES" --nproc-per-node "$NPROC" \
  train.py "trainer=$TRAINER" "trainer.devices=$NPROC" "trainer.num_nodes=$NNODES" "${RESUME[@]}" "$@"
