#!/usr/bin/env bash
# Launch keye-train with torchrun on one node, or on one node of a multi-node job (c10d rendezvous).
set -euo pipefail

usage() {
  cat <<'EOF'
Usage: launch/torchrun.sh [options] NPROC [hydra overrides...]

Runs `keye-train` under torchrun with NPROC processes on this node (one per GPU).

Single node:
  launch/torchrun.sh 8 recipe=stage2_multitask run_dir=/ckpt/stage2 parallel.tp=2

Multi-node (run the same command on every node; c10d rendezvous):
  RDZV_ENDPOINT=node001:29500 launch/torchrun.sh --nnodes 4 8 recipe=stage3_anneal ...
  MASTER_ADDR=node001 MASTER_PORT=29500 launch/torchrun.sh --nnodes 4 --node-rank 2 8 ...

Options:
  --nnodes N           number of nodes (default: $NNODES or 1; 1 uses torchrun --standalone)
  --node-rank R        this node's rank, forwarded to torchrun (default: $NODE_RANK, $SLURM_NODEID)
  --rdzv-endpoint H:P  rendezvous host:port (default: $RDZV_ENDPOINT, else $MASTER_ADDR:$MASTER_PORT;
                       MASTER_PORT defaults to 29500). Required when N > 1.
  --rdzv-id ID         rendezvous id shared by all nodes of a job (default: $RDZV_ID, $SLURM_JOB_ID, keye)
  --max-restarts K     torchrun worker-group restarts on failure (default: 0)
  -h, --help           show this help

Everything else is passed to keye-train unchanged (Hydra overrides such as recipe=..., run_dir=...,
stage.init_from=..., parallel.tp=2); `--` ends the launcher's options.

Environment:
  DRY_RUN=1               print the command instead of running it
  KEYE_TRAIN_CMD          the trainer executable (default: keye-train)
  KEYE_SIGNALS            signals torchrun forwards to the workers so the trainer can checkpoint
                          (default: SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1; read by torchruns that
                          have --signals-to-handle, e.g. torch 2.13; older ones ignore it)
  KEYE_SHUTDOWN_TIMEOUT   seconds torchrun waits for workers after forwarding a signal before
                          SIGKILL (default: 100, inside the 120 s warning of slurm.sbatch)
  OMP_NUM_THREADS         threads per worker (default: 1 when unset, as torchrun would)
EOF
}

die() {
  echo "torchrun.sh: $*" >&2
  exit 2
}

nnodes="${NNODES:-1}"
node_rank="${NODE_RANK:-${SLURM_NODEID:-}}"
rdzv_endpoint="${RDZV_ENDPOINT:-}"
rdzv_id="${RDZV_ID:-${SLURM_JOB_ID:-keye}}"
max_restarts=0
nproc=""
overrides=()

while (($#)); do
  case "$1" in
    -h | --help)
      usage
      exit 0
      ;;
    --nnodes) nnodes="${2:?--nnodes needs a value}"; shift 2 ;;
    --nnodes=*) nnodes="${1#*=}"; shift ;;
    --node-rank) node_rank="${2:?--node-rank needs a value}"; shift 2 ;;
    --node-rank=*) node_rank="${1#*=}"; shift ;;
    --rdzv-endpoint) rdzv_endpoint="${2:?--rdzv-endpoint needs a value}"; shift 2 ;;
    --rdzv-endpoint=*) rdzv_endpoint="${1#*=}"; shift ;;
    --rdzv-id) rdzv_id="${2:?--rdzv-id needs a value}"; shift 2 ;;
    --rdzv-id=*) rdzv_id="${1#*=}"; shift ;;
    --max-restarts) max_restarts="${2:?--max-restarts needs a value}"; shift 2 ;;
    --max-restarts=*) max_restarts="${1#*=}"; shift ;;
    --)
      shift
      overrides+=("$@")
      break
      ;;
    *)
      if [[ -z "$nproc" ]]; then
        nproc="$1"
      else
        overrides+=("$1")
      fi
      shift
      ;;
  esac
done

[[ -n "$nproc" ]] || { usage >&2; die "NPROC (processes on this node) is required"; }
[[ "$nproc" =~ ^[1-9][0-9]*$ ]] || die "NPROC=$nproc must be a positive integer (processes on this node)"
[[ "$nnodes" =~ ^[1-9][0-9]*$ ]] || die "--nnodes=$nnodes must be a positive integer"
[[ "$max_restarts" =~ ^[0-9]+$ ]] || die "--max-restarts=$max_restarts must be a non-negative integer"
if [[ -n "$node_rank" ]]; then
  [[ "$node_rank" =~ ^[0-9]+$ && "$node_rank" -lt "$nnodes" ]] ||
    die "--node-rank=$node_rank must be an integer in [0, nnodes=$nnodes)"
fi

cmd=(torchrun --nproc-per-node="$nproc" --max-restarts="$max_restarts")
if ((nnodes == 1)); then
  # One node: a private rendezvous on a free port, nothing to coordinate.
  cmd+=(--standalone --nnodes=1)
else
  if [[ -z "$rdzv_endpoint" ]]; then
    [[ -n "${MASTER_ADDR:-}" ]] ||
      die "--nnodes=$nnodes needs a rendezvous endpoint: --rdzv-endpoint, RDZV_ENDPOINT or MASTER_ADDR"
    rdzv_endpoint="${MASTER_ADDR}:${MASTER_PORT:-29500}"
  fi
  [[ "$rdzv_endpoint" == *:* ]] || die "rendezvous endpoint '$rdzv_endpoint' must be HOST:PORT"
  cmd+=(--nnodes="$nnodes" --rdzv-backend=c10d --rdzv-endpoint="$rdzv_endpoint" --rdzv-id="$rdzv_id")
  if [[ -n "$node_rank" ]]; then
    cmd+=(--node-rank="$node_rank")
  fi
fi
# --no-python: run the installed console script directly (the same python environment as torchrun).
cmd+=(--no-python "${KEYE_TRAIN_CMD:-keye-train}" "${overrides[@]}")

# torchrun reads its options from PET_* variables as well; the variables (unlike the flags) are
# ignored by older torchruns that cannot forward extra signals, so the script works with both.
envs=(
  "PET_SIGNALS_TO_HANDLE=${KEYE_SIGNALS:-SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1}"
  "TORCH_ELASTIC_SHUTDOWN_TIMEOUT=${KEYE_SHUTDOWN_TIMEOUT:-100}"
  "OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}"
)
full=(env "${envs[@]}" "${cmd[@]}")

# The exact command, shell-quoted where needed, so that it can be pasted and run.
line="+"
for arg in "${full[@]}"; do
  if [[ "$arg" =~ ^[A-Za-z0-9_./=:,@%+-]+$ ]]; then line+=" $arg"; else line+=" $(printf '%q' "$arg")"; fi
done
echo "$line"
if [[ "${DRY_RUN:-0}" == 1 ]]; then
  exit 0
fi
exec "${full[@]}"
