#!/usr/bin/env bash
# The body of every megatron-sapo SLURM job: the *.sbatch files in this folder set their
# #SBATCH resources and a default CONFIG, then exec this script inside the allocation.
#
#   sbatch examples/slurm/sapo_30b_a3b.sbatch                          # Qwen3-30B-A3B, 8-GPU nodes
#   HF_MODEL=/models/Qwen3-30B-A3B RUN_ROOT=/scratch/rl sbatch -p gpu -A proj \
#     examples/slurm/gspo_30b_a3b.sbatch
#   STEPS=2 sbatch examples/slurm/tiny_cpu.sbatch                      # the CPU demo, no GPUs
#   DRY_RUN=1 SLURM_JOB_NODELIST='n[1-6]' SLURM_JOB_ID=1 GPUS_PER_NODE=8 ROLLOUT_NODES=2 \
#     CONFIG=examples/qwen3_30b_a3b/sapo.toml bash examples/slurm/launch_rl.sh   # print the steps only
#
# What a job does, in order (each restart of a requeued job does it again):
#   1. plan: which nodes train and which serve rollouts, ranks per node, server addresses, all
#      derived from CONFIG by job_plan.py (the last ROLLOUT_NODES hosts serve, the rest train);
#   2. check the memory plan (`megatron-sapo plan`, GPU jobs): a config that cannot fit the GPUs
#      fails here, in seconds, before anything is converted or started;
#   3. convert the HF checkpoint to a Megatron one (once per model, shared by jobs, skipped when
#      it exists): the checkpoint for parity checks and exports; the trainer itself starts from
#      the HF weights (model.hf_dir), or from this one with SETS="checkpoint.load_dir=MCORE_DIR".
#      A built-in model (the CPU demo's) served by rollout nodes is first written, after its
#      cold start, to RUN_DIR/start_model (`megatron-sapo train --prepare-only`), and that is
#      converted (to RUN_DIR/mcore) and served;
#   4. disaggregated rollout: one srun step per rollout node starting its SGLang servers
#      (serve_node.sh, bound to 0.0.0.0), then wait until every server answers /health;
#   5. srun `megatron-sapo train CONFIG --output RUN_DIR --set rollout.servers=[...]`, with
#      --resume when RUN_DIR/checkpoints/latest exists, so a requeued job continues from its
#      latest checkpoint (RUN_DIR is named after the job id, which a requeue keeps).
# Signals: SIGUSR1 (#SBATCH --signal=B:USR1@T, T seconds before the time limit) asks the trainer
# to stop by creating RUN_DIR/STOP: it finishes its current step, saves a checkpoint of it and
# exits, then the job stops its servers and requeues itself; T must cover one step and a save.
# SIGTERM (scancel, preemption, `scontrol requeue`) is passed on to every step; SLURM signals
# their processes too, colocated servers included, so the trainer's step under way usually
# cannot finish and the restart resumes from the previous checkpoint. Checkpoints are published
# atomically, so one cut short is never loaded.
#
# Environment (defaults in brackets):
#   CONFIG            run config (TOML), relative to the submission folder [set by the .sbatch]
#   HF_MODEL          HF checkpoint folder; sets model.hf_dir [the config's model]
#   RUN_ROOT          folder of all runs [REPO/runs/slurm]; this job's: RUN_ROOT/RUN_NAME
#   RUN_NAME          [JOBNAME-JOBID]; name an existing run to continue it from another job
#   MCORE_DIR         converted checkpoint [RUN_ROOT/mcore/<HF folder name>; a built-in model's:
#                     RUN_DIR/mcore]; CONVERT=0 skips step 3
#   SERVER_RESTARTS   times serve_node.sh restarts a server that exits [3]
#   ROLLOUT_NODES     nodes that serve rollouts [0]; must be > 0 iff rollout.mode = "disaggregated"
#   GPUS_PER_NODE     [SLURM_GPUS_ON_NODE, else 0 = CPU: one model copy's ranks per node]
#   SERVER_PORT       first server port on each rollout node [30000]
#   SERVER_STARTUP_TIMEOUT  seconds to wait for /health [1800]
#   STEPS, SAVE_EVERY  --steps / --save-every of the trainer [the config's]
#   SETS              extra section.key=value overrides, separated by spaces [none]
#   REPO              the megatron-sapo checkout [the folder two levels above this script]
#   VENV              Python environment with megatron-sapo installed [REPO/.venv]
#   PLAN_CHECK        1: check the memory plan before converting (GPU jobs) [1]; 0 skips it
#   DRY_RUN=1         print the commands instead of running them (no SLURM needed)
# Partition, account, QoS: sbatch's own -p/-A/-q or SBATCH_PARTITION / SBATCH_ACCOUNT / SBATCH_QOS.
set -euo pipefail

REPO=${REPO:-$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)}
VENV=${VENV:-$REPO/.venv}
DRY_RUN=${DRY_RUN:-0}
: "${CONFIG:?set CONFIG to a run config (TOML), e.g. examples/qwen3_30b_a3b/sapo.toml}"
HF_MODEL=${HF_MODEL:-}
RUN_ROOT=$(realpath -m "${RUN_ROOT:-$REPO/runs/slurm}")
RUN_NAME=${RUN_NAME:-${SLURM_JOB_NAME:-job}-${SLURM_JOB_ID:?not inside a SLURM job (SLURM_JOB_ID unset)}}
RUN_DIR=$RUN_ROOT/$RUN_NAME
ATTEMPT_DIR=$RUN_DIR/slurm/attempt-${SLURM_RESTART_COUNT:-0}
CONVERT=${CONVERT:-1}
PLAN_CHECK=${PLAN_CHECK:-1}
ROLLOUT_NODES=${ROLLOUT_NODES:-0}
GPUS_PER_NODE=${GPUS_PER_NODE:-${SLURM_GPUS_ON_NODE:-0}}
CPUS_PER_NODE=${SLURM_CPUS_ON_NODE:-$(nproc)}
SERVER_PORT=${SERVER_PORT:-30000}
SERVER_STARTUP_TIMEOUT=${SERVER_STARTUP_TIMEOUT:-1800}
STEPS=${STEPS:-}
SAVE_EVERY=${SAVE_EVERY:-}
read -ra OVERRIDES <<< "${SETS:-}"
[[ -n $HF_MODEL ]] && OVERRIDES+=("model.hf_dir=$(realpath -m "$HF_MODEL")")
export PATH="$VENV/bin:$PATH"
# Megatron's fused kernels go through torch.compile, which on CPU compiles C++ on first use.
(( GPUS_PER_NODE )) || export TORCHDYNAMO_DISABLE=${TORCHDYNAMO_DISABLE:-1}

log() { echo "[launch_rl $(date +%T)] $*"; }
die() { echo "[launch_rl $(date +%T)] error: $*" >&2; exit 2; }

# What DRY_RUN=1 prints instead of running a command.
show() {
  echo "+ $(printf '%q ' "$@")"
}

# ---- signals ---------------------------------------------------------------------------------

train_pid=
server_pids=()
stop_requested=0
requeue_requested=0

# shellcheck disable=SC2317  # called by the traps below
on_signal() {
  stop_requested=1
  if [[ $1 == USR1 ]]; then
    requeue_requested=1
    if [[ -n $train_pid ]]; then
      # The stop file signals nothing: colocated servers serve until the step is done.
      log "received SIGUSR1: the trainer stops after its current step, with a checkpoint ($RUN_DIR/STOP)"
      touch "$RUN_DIR/STOP"
      return 0  # a bare return in a trap handler returns the interrupted command's status
    fi
  fi
  log "received SIG$1: stopping the job steps"
  local pid
  for pid in $train_pid "${server_pids[@]}"; do
    kill -TERM "$pid" 2>/dev/null || true  # srun passes it on to every task of its step
  done
}
trap 'on_signal USR1' USR1
trap 'on_signal TERM' TERM

# Wait for a background process across trapped signals (a signal interrupts `wait`); its status.
wait_for() {
  local pid=$1 rc
  while true; do
    rc=0
    wait "$pid" || rc=$?
    if (( rc > 128 )) && kill -0 "$pid" 2>/dev/null; then
      continue
    fi
    return "$rc"
  done
}

stop_servers() {
  local pid
  for pid in "${server_pids[@]}"; do
    kill -TERM "$pid" 2>/dev/null || true
  done
  for pid in "${server_pids[@]}"; do
    wait_for "$pid" || true
  done
  server_pids=()
}

# ---- the steps -------------------------------------------------------------------------------

# The config overrides as --set flags, for every megatron-sapo command of the job.
SET_FLAGS=()
for override in "${OVERRIDES[@]}"; do
  SET_FLAGS+=(--set "$override")
done

plan_job() {
  local plan
  plan=$(python "$REPO/examples/slurm/job_plan.py" "$CONFIG" "${SET_FLAGS[@]}" --rollout-nodes "$ROLLOUT_NODES" \
    --gpus-per-node "$GPUS_PER_NODE" --cpus-per-node "$CPUS_PER_NODE" --server-port "$SERVER_PORT") \
    || die "the job does not fit $CONFIG (see above)"
  eval "$plan"
  log "config $CONFIG, run folder $RUN_DIR, restart ${SLURM_RESTART_COUNT:-0}"
  log "training: $TRAIN_NODES node(s) ($TRAIN_HOSTS) x $TASKS_PER_NODE ranks, data-parallel size" \
    "$DATA_PARALLEL"
  if [[ $ROLLOUT_MODE == disaggregated ]]; then
    log "rollout: $SERVERS_PER_NODE server(s) of TP $SERVER_TP on each of $ROLLOUT_HOSTS: $SERVER_ADDRESSES"
  else
    log "rollout: colocated (the trainer starts its own servers)"
  fi
  if (( ! DRY_RUN )); then
    mkdir -p "$ATTEMPT_DIR"
    printf '%s\n' "$plan" > "$ATTEMPT_DIR/plan.sh"
  fi
}

check_memory_plan() {
  if (( ! GPUS_PER_NODE )); then
    log "no GPUs: the memory plan is not checked"
    return
  fi
  if (( ! PLAN_CHECK )); then
    log "PLAN_CHECK=0: the memory plan is not checked"
    return
  fi
  local cmd=(megatron-sapo plan "$CONFIG" "${SET_FLAGS[@]}" --nodes "$TRAIN_NODES" --rollout-nodes "$ROLLOUT_NODES"
             --gpus-per-node "$GPUS_PER_NODE")
  if (( DRY_RUN )); then
    show "${cmd[@]}"
    return
  fi
  log "checking the memory plan ($ATTEMPT_DIR/memory_plan.txt)"
  local rc=0
  "${cmd[@]}" > "$ATTEMPT_DIR/memory_plan.txt" 2>&1 || rc=$?
  if (( rc )); then
    grep -v '^{' "$ATTEMPT_DIR/memory_plan.txt" >&2 || true
    (( rc == 1 )) && die "the run does not fit its GPUs (breakdown above; PLAN_CHECK=0 skips this check)"
    die "megatron-sapo plan failed with status $rc (above); PLAN_CHECK=0 skips the check"
  fi
  log "$(grep -m1 '^  total' "$ATTEMPT_DIR/memory_plan.txt" | sed 's/^ *//' || true)"
}

prepare_start_model() {
  [[ $ROLLOUT_MODE == disaggregated && -z $HF_DIR ]] || return 0
  local cmd=(megatron-sapo train "$CONFIG" --output "$RUN_DIR" "${SET_FLAGS[@]}" --prepare-only)
  MCORE_DIR=${MCORE_DIR:-$RUN_DIR/mcore}
  if (( DRY_RUN )); then
    show "${cmd[@]}"
    HF_DIR=$RUN_DIR/start_model
    return
  fi
  log "built-in model: its start model (written once, cold start included) is what the rollout nodes serve"
  HF_DIR=$("${cmd[@]}" | tail -n 1)
  [[ -f $HF_DIR/config.json ]] || die "megatron-sapo train --prepare-only wrote no checkpoint ('$HF_DIR')"
  log "start model: $HF_DIR"
}

convert_checkpoint() {
  if [[ -z $HF_DIR ]]; then
    log "built-in model: no HF checkpoint to convert"
    return
  fi
  if (( ! CONVERT )); then
    log "CONVERT=0: conversion skipped"
    return
  fi
  local target=${MCORE_DIR:-$RUN_ROOT/mcore/$(basename "$HF_DIR")}
  if (( DRY_RUN )); then
    show megatron-sapo convert hf-to-mcore --hf "$HF_DIR" --out "$target" --tp "$MODEL_TP" --pp "$MODEL_PP" \
      --ep "$MODEL_EP"
    return
  fi
  mkdir -p "$(dirname "$target")"
  # Jobs share the converted checkpoint; the lock makes a second job wait for the first one's
  # conversion and then find it (the converter publishes its output folder atomically).
  exec 9> "$target.lock"
  flock 9
  if [[ -d $target ]]; then
    log "Megatron checkpoint $target exists: conversion skipped"
  else
    log "converting $HF_DIR -> $target (layout checked: TP $MODEL_TP, PP $MODEL_PP, EP $MODEL_EP)"
    megatron-sapo convert hf-to-mcore --hf "$HF_DIR" --out "$target" --tp "$MODEL_TP" --pp "$MODEL_PP" \
      --ep "$MODEL_EP"
  fi
  flock -u 9
  exec 9>&-
  log "to check the conversion: megatron-sapo parity --hf $HF_DIR --mcore $target" \
    "--tp $MODEL_TP --pp $MODEL_PP --ep $MODEL_EP"
}

start_servers() {
  [[ $ROLLOUT_MODE == disaggregated ]] || return 0
  [[ -n $HF_DIR ]] || die "disaggregated rollout needs an HF checkpoint to serve (HF_MODEL or model.hf_dir)"
  local host step flags=(--dtype "$SERVER_DTYPE")
  (( RETURN_ROUTED_EXPERTS )) && flags+=(--return-routed-experts)
  for host in $ROLLOUT_HOSTS; do
    log "starting the servers of $host"
    step=(srun --nodes=1 --ntasks=1 --ntasks-per-node=1 --nodelist="$host" --cpus-per-task="$CPUS_PER_NODE"
          --kill-on-bad-exit=1 bash "$REPO/examples/slurm/serve_node.sh" "$HF_DIR" "$SERVER_PORT"
          "$SERVERS_PER_NODE" "$SERVER_TP" "$ATTEMPT_DIR/servers" "${flags[@]}")
    if (( DRY_RUN )); then
      show "${step[@]}"
      continue
    fi
    "${step[@]}" > "$ATTEMPT_DIR/serve-$host.log" 2>&1 &
    server_pids+=("$!")
  done
}

wait_for_servers() {
  [[ $ROLLOUT_MODE == disaggregated ]] && (( ! DRY_RUN )) || return 0
  local address pid deadline=$((SECONDS + SERVER_STARTUP_TIMEOUT))
  for address in $SERVER_ADDRESSES; do
    until curl -sf -o /dev/null --max-time 5 "http://$address/health"; do
      (( ! stop_requested )) || return 1
      for pid in "${server_pids[@]}"; do
        kill -0 "$pid" 2>/dev/null || die "a server step exited during start-up; see $ATTEMPT_DIR/serve-*.log"
      done
      (( SECONDS < deadline )) \
        || die "$address not healthy after $SERVER_STARTUP_TIMEOUT s; see $ATTEMPT_DIR/servers/"
      sleep 5
    done
    log "$address is healthy"
  done
}

train() {
  local args=(train "$CONFIG" --output "$RUN_DIR" "${SET_FLAGS[@]}")
  [[ -n $STEPS ]] && args+=(--steps "$STEPS")
  [[ -n $SAVE_EVERY ]] && args+=(--save-every "$SAVE_EVERY")
  (( PLAN_CHECK )) || args+=(--no-plan-check)
  [[ $ROLLOUT_MODE == disaggregated ]] && args+=(--set "rollout.servers=$SERVERS_TOML")
  if [[ -f $RUN_DIR/checkpoints/latest ]]; then
    log "resuming from checkpoint $(< "$RUN_DIR/checkpoints/latest")"
    args+=(--resume)
  fi
  local srun_args=(--nodes="$TRAIN_NODES" --ntasks=$((TRAIN_NODES * TASKS_PER_NODE))
                   --ntasks-per-node="$TASKS_PER_NODE" --cpus-per-task="$CPUS_PER_TASK"
                   --nodelist="$TRAIN_NODELIST" --kill-on-bad-exit=1)
  if (( DRY_RUN )); then
    show srun "${srun_args[@]}" megatron-sapo "${args[@]}"
    return 0
  fi
  OMP_NUM_THREADS=${OMP_NUM_THREADS:-$CPUS_PER_TASK} srun "${srun_args[@]}" megatron-sapo "${args[@]}" &
  train_pid=$!
  local rc=0
  wait_for "$train_pid" || rc=$?
  train_pid=
  return "$rc"
}

main() {
  plan_job
  check_memory_plan
  prepare_start_model
  convert_checkpoint
  start_servers
  local rc=0
  if wait_for_servers; then
    train || rc=$?
  else
    rc=143  # stopped by a signal while the servers were starting
  fi
  stop_servers
  if (( DRY_RUN )); then
    log "dry run: nothing was started"
    exit 0
  fi
  if (( requeue_requested )); then
    log "requeueing job $SLURM_JOB_ID; the next start resumes from $RUN_DIR/checkpoints"
    scontrol requeue "$SLURM_JOB_ID"
    exit 0
  fi
  (( stop_requested )) && log "stopped by a signal (training exit status $rc)"
  log "training finished with status $rc; metrics in $RUN_DIR/metrics.jsonl"
  exit "$rc"
}

main
