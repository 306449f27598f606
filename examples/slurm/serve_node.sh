#!/usr/bin/env bash
# The SGLang servers of one rollout node: launch_rl.sh runs this as one srun task per rollout
# node and waits on it.
#   serve_node.sh HF_DIR FIRST_PORT COUNT TP LOG_DIR [megatron-sapo serve options...]
# Server i listens on 0.0.0.0:FIRST_PORT+i and gets GPUs i*TP .. (i+1)*TP-1 of those the task
# sees (CUDA_VISIBLE_DEVICES as SLURM set it); without visible GPUs a single server runs on the
# CPU. Each server has its own process group, so stopping it stops SGLang's workers too.
# SIGTERM stops every server; a server that exits stops the others (the node is then useless
# to the trainer, and the job should fail rather than limp on).
set -euo pipefail

model=$1 first_port=$2 count=$3 tp=$4 log_dir=$5
shift 5
host=$(hostname -s)
mkdir -p "$log_dir"

gpus=()
if [[ -n ${CUDA_VISIBLE_DEVICES:-} ]]; then
  IFS=, read -ra gpus <<< "$CUDA_VISIBLE_DEVICES"
fi
if (( ${#gpus[@]} )) && (( count * tp > ${#gpus[@]} )); then
  echo "serve_node: $count servers x TP $tp need $((count * tp)) GPUs; $host shows ${#gpus[@]}" >&2
  exit 2
fi
if (( ! ${#gpus[@]} && count != 1 )); then
  echo "serve_node: no GPUs visible on $host: only one (CPU) server can run, not $count" >&2
  exit 2
fi

pids=()
stop_servers() {
  local pid
  for pid in "${pids[@]}"; do
    kill -TERM -- "-$pid" 2>/dev/null || true
  done
  wait || true
}
trap 'stop_servers; exit 143' TERM INT

for (( i = 0; i < count; i++ )); do
  port=$((first_port + i))
  log="$log_dir/sglang-$host-$port.log"
  echo "serve_node: starting $host:$port (TP $tp), log $log"
  if (( ${#gpus[@]} )); then
    devices=$(IFS=,; echo "${gpus[*]:i*tp:tp}")
    CUDA_VISIBLE_DEVICES=$devices setsid megatron-sapo serve --model "$model" --host 0.0.0.0 --port "$port" \
      --tp "$tp" "$@" > "$log" 2>&1 &
  else
    setsid megatron-sapo serve --model "$model" --host 0.0.0.0 --port "$port" --tp "$tp" "$@" > "$log" 2>&1 &
  fi
  pids+=("$!")
done

rc=0
wait -n || rc=$?
echo "serve_node: a server on $host exited (status $rc); stopping the others" >&2
stop_servers
exit $(( rc ? rc : 1 ))
