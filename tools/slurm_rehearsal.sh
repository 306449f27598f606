#!/usr/bin/env bash
# Rehearse the SLURM launch on one machine, for real: install SLURM and munge from Debian's
# packages, start a one-node cluster, submit the CPU demo through the same launcher as the
# Qwen3-30B-A3B jobs (examples/slurm/tiny_cpu.sbatch -> launch_rl.sh), send it the SIGUSR1 of
# a coming time limit once it has saved a checkpoint (the trainer stops after its step with a
# checkpoint, the job requeues itself), and check that it finished, resumed from the stop's
# checkpoint, and that metrics.jsonl holds every step once. Needs root (packages, munge, daemons); docs/slurm.md.
#
#   bash tools/slurm_rehearsal.sh              # about 5-10 minutes on 2 cores
#   STEPS=6 REQUEUE_AFTER=3 KEEP_SLURM=1 bash tools/slurm_rehearsal.sh
#
# Environment (defaults in brackets):
#   REHEARSAL_DIR    config, daemon state and logs, the run [/tmp/megatron-sapo-slurm]; emptied first
#   STEPS            RL steps of the job [6]
#   REQUEUE_AFTER    signal the job once the checkpoint of this step exists (saved every this many) [2]
#   JOB_SETS         config overrides that shorten the demo [see below]
#   SLURMCTLD_PORT, SLURMD_PORT   [6817, 6818]; change them beside a running SLURM
#   KEEP_SLURM=1     leave the daemons running at the end (sinfo, squeue with SLURM_CONF=...)
#   JOB_TIMEOUT      seconds the whole job may take [1800]
# The cluster reads only REHEARSAL_DIR/etc/slurm.conf (through SLURM_CONF); /etc/slurm is left
# alone. Daemons this script started are stopped at the end, munge too if it was not running.
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
WORK=$(realpath -m "${REHEARSAL_DIR:-/tmp/megatron-sapo-slurm}")
STEPS=${STEPS:-6}
REQUEUE_AFTER=${REQUEUE_AFTER:-2}
# Fewer cold-start steps and prompts, no evaluation or histograms: the rehearsal checks the
# launch, not the learning.
JOB_SETS=${JOB_SETS:-"train.sft_steps=60 rollout.prompts_per_step=8 train.micro_batch_size=16 eval.every=0 \
logging.histogram_every=0 checkpoint.keep_last=2"}
CTLD_PORT=${SLURMCTLD_PORT:-6817}
SLURMD_PORT=${SLURMD_PORT:-6818}
KEEP_SLURM=${KEEP_SLURM:-0}
JOB_TIMEOUT=${JOB_TIMEOUT:-1800}
export SLURM_CONF=$WORK/etc/slurm.conf
STATE=$WORK/state
RUN_DIR=$WORK/runs/rehearsal

started_munge=0
job_id=

say() { echo "[rehearsal $(date +%T)] $*"; }
fail() {
  echo "[rehearsal $(date +%T)] FAILED: $*" >&2
  exit 1
}

# ---- 1. packages -----------------------------------------------------------------------------

install_packages() {
  local tool missing=0
  for tool in slurmctld slurmd sbatch munged; do
    command -v "$tool" > /dev/null || missing=1
  done
  if (( ! missing )); then
    say "SLURM and munge are installed"
    return
  fi
  say "installing slurmctld, slurmd, slurm-client and munge from Debian's packages"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
    slurmctld slurmd slurm-client munge > "$WORK/apt.log" 2>&1 \
    || { tail -20 "$WORK/apt.log"; fail "apt-get install"; }
  say "installed"
}

# ---- 2. configuration ------------------------------------------------------------------------

port_in_use() {
  (exec 3<> "/dev/tcp/127.0.0.1/$1") 2> /dev/null
}

write_config() {
  local host node_line
  host=$(hostname -s)
  # What slurmd detects on this machine (CPUs, sockets, cores, memory): a node declared with
  # more than that would be drained at registration.
  node_line=$(slurmd -C | head -n 1)
  [[ $node_line == NodeName=* ]] || fail "slurmd -C printed no node line: $node_line"
  node_line="NodeName=$host ${node_line#NodeName=* }"
  for port in "$CTLD_PORT" "$SLURMD_PORT"; do
    ! port_in_use "$port" \
      || fail "port $port is in use (a SLURM already running?): set SLURMCTLD_PORT / SLURMD_PORT"
  done
  mkdir -p "$WORK/etc" "$STATE/slurmctld" "$STATE/slurmd"
  sed -e "s|@HOST@|$host|g" -e "s|@CTLD_PORT@|$CTLD_PORT|" -e "s|@SLURMD_PORT@|$SLURMD_PORT|" \
      -e "s|@STATE_DIR@|$STATE|g" -e "s|@NODE_LINE@|$node_line|" \
      "$repo/tools/slurm/slurm.conf.in" > "$SLURM_CONF"
  say "wrote $SLURM_CONF: $node_line"
}

# ---- 3. daemons ------------------------------------------------------------------------------

start_munge() {
  if munge -n 2> /dev/null | unmunge > /dev/null 2>&1; then
    say "munged is running"
    return
  fi
  if [[ ! -s /etc/munge/munge.key ]]; then
    say "creating /etc/munge/munge.key"
    mungekey --create --keyfile=/etc/munge/munge.key
    chown munge:munge /etc/munge/munge.key
    chmod 0400 /etc/munge/munge.key
  fi
  mkdir -p /run/munge /var/lib/munge /var/log/munge
  chown munge:munge /run/munge /var/lib/munge /var/log/munge
  runuser -u munge -- /usr/sbin/munged
  started_munge=1
  munge -n | unmunge > /dev/null || fail "munged started but a credential does not round-trip"
  say "started munged"
}

start_slurm() {
  slurmctld -f "$SLURM_CONF" || fail "slurmctld did not start: $(tail -5 "$STATE/slurmctld.log" 2> /dev/null)"
  slurmd -f "$SLURM_CONF" || fail "slurmd did not start: $(tail -5 "$STATE/slurmd.log" 2> /dev/null)"
  local state
  for _ in $(seq 60); do
    state=$(sinfo -h -o %T 2> /dev/null || true)
    [[ $state == idle ]] && break
    sleep 1
  done
  [[ $state == idle ]] || fail "the node is '$state', not idle, after 60 s; see $STATE/slurm*.log"
  say "cluster up ($(sinfo --version)): $(sinfo -h -o '%P %D node(s) %c CPUs %T')"
}

stop_pidfile() {
  local file=$1 pid
  [[ -f $file ]] || return 0
  pid=$(< "$file")
  kill "$pid" 2> /dev/null || true
  for _ in $(seq 20); do
    # Gone, or a zombie its parent has yet to reap (daemons are reparented, often to an init
    # that reaps late): either way it no longer runs.
    [[ $(ps -o stat= -p "$pid" 2> /dev/null) == [^Z]* ]] || break
    sleep 0.5
  done
  rm -f "$file"
}

stop_slurm() {
  if [[ -n $job_id ]]; then
    scancel "$job_id" 2> /dev/null || true
  fi
  stop_pidfile "$STATE/slurmd.pid"
  stop_pidfile "$STATE/slurmctld.pid"
  if (( started_munge )); then
    stop_pidfile /run/munge/munged.pid
  fi
}

cleanup() {
  if (( KEEP_SLURM )); then
    say "daemons left running (SLURM_CONF=$SLURM_CONF sinfo);" \
      "stop them with: kill \$(cat $STATE/slurmctld.pid $STATE/slurmd.pid)"
  else
    stop_slurm
  fi
}

# ---- 4. the job ------------------------------------------------------------------------------

checkpoint_step() {
  local name
  name=$(cat "$RUN_DIR/checkpoints/latest" 2> /dev/null || true)
  [[ $name =~ ^step_0*([0-9]+)$ ]] && echo "${BASH_REMATCH[1]}" || echo 0
}

job_field() {  # job_field NAME: a field of `scontrol show job`
  scontrol show job "$job_id" | grep -o "\b$1=[^ ]*" | head -n 1 | cut -d= -f2
}

run_job() {
  say "submitting examples/slurm/tiny_cpu.sbatch: $STEPS steps, a checkpoint every $REQUEUE_AFTER"
  (cd "$repo" && RUN_ROOT=$WORK/runs RUN_NAME=rehearsal STEPS=$STEPS SAVE_EVERY=$REQUEUE_AFTER \
     SETS=$JOB_SETS exec sbatch --wait --parsable --output="$WORK/job-%j.out" \
     examples/slurm/tiny_cpu.sbatch) > "$WORK/sbatch.out" 2>&1 &
  local sbatch_pid=$! deadline=$((SECONDS + JOB_TIMEOUT))
  until [[ $(head -n 1 "$WORK/sbatch.out") =~ ^[0-9]+$ ]]; do
    kill -0 "$sbatch_pid" 2> /dev/null || fail "sbatch: $(cat "$WORK/sbatch.out")"
    sleep 1
  done
  job_id=$(head -n 1 "$WORK/sbatch.out")
  say "job $job_id submitted; log $WORK/job-$job_id.out"

  until (( $(checkpoint_step) >= REQUEUE_AFTER )); do
    kill -0 "$sbatch_pid" 2> /dev/null || fail "job $job_id ended before its step-$REQUEUE_AFTER checkpoint"
    (( SECONDS < deadline )) || fail "no step-$REQUEUE_AFTER checkpoint after $JOB_TIMEOUT s"
    sleep 2
  done
  # What #SBATCH --signal=B:USR1@T sends before the time limit: the launcher has the trainer
  # stop after its step, with a checkpoint, then requeues the job itself.
  say "checkpoint of step $(checkpoint_step) saved: SIGUSR1 to job $job_id's batch shell"
  scancel --signal=USR1 --batch "$job_id"
  # A requeued job may start again only some time later (its begin time is pushed about two
  # minutes ahead); bring it forward so the rehearsal does not wait.
  until [[ $(job_field JobState) == PENDING ]]; do
    (( SECONDS < deadline )) || fail "job $job_id not back in the queue after the requeue"
    sleep 1
  done
  scontrol update JobId="$job_id" StartTime=now

  local rc=0
  while kill -0 "$sbatch_pid" 2> /dev/null; do
    (( SECONDS < deadline )) || fail "job $job_id not finished after $JOB_TIMEOUT s"
    sleep 5
  done
  wait "$sbatch_pid" || rc=$?
  (( rc == 0 )) || fail "sbatch --wait exited with $rc; see $WORK/job-$job_id.out"
  say "sbatch --wait returned 0"
}

# ---- 5. checks -------------------------------------------------------------------------------

check_results() {
  local state restarts steps expected resumed
  state=$(job_field JobState)
  restarts=$(job_field Restarts)
  [[ $state == COMPLETED ]] || fail "job $job_id is $state, not COMPLETED"
  [[ $restarts == 1 ]] || fail "job $job_id restarted $restarts times, not once"
  steps=$("$repo/.venv/bin/python" -c \
    'import json, sys; print(*[json.loads(l)["step"] for l in open(sys.argv[1]) if l.strip()])' \
    "$RUN_DIR/metrics.jsonl")
  expected=$(seq -s ' ' 1 "$STEPS")
  [[ $steps == "$expected" ]] || fail "metrics.jsonl has steps '$steps', expected '$expected'"
  (( $(checkpoint_step) == STEPS )) || fail "latest checkpoint is step $(checkpoint_step), expected $STEPS"
  # The trainer finishes the step under way and checkpoints it: the restart resumes from that
  # step, the signal's or a later one.
  grep -q 'stopped by the STOP file: latest checkpoint' "$WORK/job-$job_id.out" \
    || fail "the trainer did not report stopping with a checkpoint"
  resumed=$(grep -o 'resuming from checkpoint step_[0-9]*' "$WORK/job-$job_id.out" || true)
  [[ $resumed =~ step_0*([0-9]+)$ ]] && (( BASH_REMATCH[1] >= REQUEUE_AFTER && BASH_REMATCH[1] < STEPS )) \
    || fail "the restarted job did not resume from a checkpoint of step $REQUEUE_AFTER..$((STEPS - 1)) ('$resumed')"
  say "job $job_id: $state after $restarts requeue; $resumed; metrics.jsonl steps: $steps"
  say "passed"
}

main() {
  (( EUID == 0 )) || fail "run as root: it installs packages and starts munge and the SLURM daemons"
  # Daemons left by an earlier rehearsal (KEEP_SLURM=1) in this folder go first.
  stop_pidfile "$STATE/slurmd.pid"
  stop_pidfile "$STATE/slurmctld.pid"
  rm -rf "$WORK"
  mkdir -p "$WORK"
  install_packages
  write_config
  trap cleanup EXIT
  start_munge
  start_slurm
  run_job
  check_results
}

main
