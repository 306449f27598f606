#!/usr/bin/env bash
# The SGLang servers of one rollout node: launch_rl.sh runs this as one srun task per rollout
# node and waits on it.
#   serve_node.sh HF_DIR FIRST_PORT COUNT TP LOG_DIR [megatron-sapo serve options...]
# Server i listens on 0.0.0.0:FIRST_PORT+i and gets GPUs i*TP .. (i+1)*TP-1 of those the task
# sees (CUDA_VISIBLE_DEVICES as SLURM set it); without visible GPUs a single server runs on the
# CPU. Each server has its own process group, so stopping it stops SGLang's workers too.
# SIGTERM stops every server. A server that exits is started again, up to SERVER_RESTARTS [3]
# times per server: the trainer waits for it (rollout.startup_timeout_s), syncs it its current
# weights and samples again what it lost. One more exit stops every server of the node, and the
# trainer then stops naming the server.
set -euo pipefail

model=$1 first_port=$2 count=$3 tp=$4 log_dir=$5
shift 5
max_restarts=${SERVER_RESTARTS:-3}
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

start_server() {  # start_server I SERVE-OPTIONS...: server I in its own session; its pid in pids[I]
  local i=$1 port=$((first_port + $1)) log devices
  shift
  log="$log_dir/sglang-$host-$port.log"
  echo "serve_node: starting $host:$port (TP $tp), log $log"
  if (( ${#gpus[@]} )); then
    devices=$(IFS=,; echo "${gpus[*]:i*tp:tp}")
    CUDA_VISIBLE_DEVICES=$devices setsid megatron-sapo serve --model "$model" --host 0.0.0.0 --port "$port" \
      --tp "$tp" "$@" >> "$log" 2>&1 &
  else
    setsid megatron-sapo serve --model "$model" --host 0.0.0.0 --port "$port" --tp "$tp" "$@" >> "$log" 2>&1 &
  fi
  pids[i]=$!
}

restarts=()
for (( i = 0; i < count; i++ )); do
  start_server "$i" "$@"
  restarts[i]=0
done

while true; do
  wait -n || true
  for (( i = 0; i < count; i++ )); do
    kill -0 "${pids[i]}" 2>/dev/null && continue
    rc=0
    wait "${pids[i]}" || rc=$?
    if (( restarts[i] >= max_restarts )); then
      echo "serve_node: the server on $host:$((first_port + i)) exited (status $rc) after $max_restarts" \
        "restarts; stopping the node's servers" >&2
      stop_servers
      exit $(( rc ? rc : 1 ))
    fi
    restarts[i]=$((restarts[i] + 1))
    echo "serve_node: the server on $host:$((first_port + i)) exited (status $rc); restart" \
      "${restarts[i]} of $max_restarts" >&2
    start_server "$i" "$@"
  done
done
