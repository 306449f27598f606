#!/usr/bin/env bash
# Rehearse the multi-node SLURM job on one machine, for real. The script builds a SLURM cluster
# of NODES nodes, each a network and UTS namespace of its own (its own hostname and address,
# joined to the others by a bridge on a private subnet), each running its own slurmd, with
# slurmctld and munge serving them. It submits the CPU demo through the same launcher as the
# Qwen3-30B-A3B jobs (examples/slurm/tiny_cpu_multinode.sbatch -> launch_rl.sh) in their shape:
# the last ROLLOUT_NODES nodes serve rollouts (`megatron-sapo serve`), the others train
# (data-parallel ranks found through srun's variables), and weights are broadcast from the
# trainer to the server on the other node (rollout.weight_sync = "distributed"). Then:
#   - the rollout node's server is killed in the middle of step 2: serve_node.sh starts it
#     again, the trainer waits for it, syncs it the current weights and samples again what it
#     lost;
#   - meanwhile the job gets the SIGUSR1 of a coming time limit: the trainer stops after step 2
#     with a checkpoint, the job requeues itself, and the restart resumes from that checkpoint;
#   - the same job runs again, uninterrupted, and every metric of every step of the
#     interrupted run must equal the uninterrupted one's; metrics.jsonl holds every step once.
# The last line printed is one JSON object: nodes, train_nodes, rollout_nodes, steps, requeued,
# resumed_from, seconds. Needs root (packages, namespaces, munge, daemons); docs/slurm.md.
#
#   bash tools/slurm_rehearsal.sh                     # about 5 minutes on 2 cores
#   NODES=4 ROLLOUT_NODES=2 STEPS=5 KEEP_SLURM=1 bash tools/slurm_rehearsal.sh
#
# Environment (defaults in brackets):
#   REHEARSAL_DIR    config, daemon state and logs, the runs [/tmp/megatron-sapo-slurm]; emptied first
#   NODES            nodes of the cluster and of the job [3]
#   ROLLOUT_NODES    nodes of the job that serve rollouts [1]; the others train, one rank each
#   STEPS            RL steps of the job [3]
#   KILL_AFTER       kill the rollout server, then signal the job, in the step after this one [1]
#   JOB_SETS         config overrides that shorten the demo [see below]
#   SUBNET           the first three octets of the cluster's /24 [10.231.0]; must be unused here
#   SLURMCTLD_PORT, SLURMD_PORT   [6817, 6818]
#   KEEP_SLURM=1     leave the cluster running at the end (SLURM_CONF=REHEARSAL_DIR/etc/slurm.conf sinfo)
#   JOB_TIMEOUT      seconds each job may take [900]
# Nothing outside the script's own namespaces, bridge and REHEARSAL_DIR is changed: /etc/hosts
# and /etc/slurm are left alone (each daemon sees the cluster's hosts file through a mount
# namespace), and the bridge, its links and the namespaces are removed at the end. Daemons this
# script started are stopped at the end, munge too if it was not running.
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
WORK=$(realpath -m "${REHEARSAL_DIR:-/tmp/megatron-sapo-slurm}")
NODES=${NODES:-3}
ROLLOUT_NODES=${ROLLOUT_NODES:-1}
STEPS=${STEPS:-3}
KILL_AFTER=${KILL_AFTER:-1}
# Few prompts, short answers, no evaluation or histograms: the rehearsal checks the launch and
# the recoveries, not the learning. The cold start stays the demo's, so that rewards vary and
# every step really changes the weights (what the comparison with the straight run needs).
JOB_SETS=${JOB_SETS:-"rollout.prompts_per_step=4 rollout.group_size=4 rollout.max_new_tokens=4 \
train.micro_batch_size=16 train.minibatches=2 eval.every=0 logging.histogram_every=0 logging.tensorboard=false \
checkpoint.keep_last=2"}
SUBNET=${SUBNET:-10.231.0}
CTLD_PORT=${SLURMCTLD_PORT:-6817}
SLURMD_PORT=${SLURMD_PORT:-6818}
KEEP_SLURM=${KEEP_SLURM:-0}
JOB_TIMEOUT=${JOB_TIMEOUT:-900}
export SLURM_CONF=$WORK/etc/slurm.conf
STATE=$WORK/state
HOSTS_FILE=$WORK/etc/hosts
PREFIX=msapo  # of every name the script creates: namespaces, links, hosts
BRIDGE=$PREFIX-br
CTLD_HOST=$PREFIX-ctl
CTLD_ADDR=$SUBNET.1

started_munge=0
started=$SECONDS
SPOOL=  # the slurmds' spool folders (short: job step sockets live there)
job_id=

say() { echo "[rehearsal $(date +%T)] $*"; }
fail() {
  echo "[rehearsal $(date +%T)] FAILED: $*" >&2
  exit 1
}

node_name() { echo "$PREFIX-n$1"; }
node_addr() { echo "$SUBNET.$((10 + $1))"; }

# ---- 1. packages -----------------------------------------------------------------------------

install_packages() {
  local tool missing=0
  for tool in slurmctld slurmd sbatch munged ip nsenter unshare; do
    command -v "$tool" > /dev/null || missing=1
  done
  if (( ! missing )); then
    say "SLURM and munge are installed"
    return
  fi
  say "installing slurmctld, slurmd, slurm-client and munge from Debian's packages"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
    slurmctld slurmd slurm-client munge iproute2 util-linux > "$WORK/apt.log" 2>&1 \
    || { tail -20 "$WORK/apt.log"; fail "apt-get install"; }
  say "installed"
}

# ---- 2. the network: a bridge, and one namespace per node ------------------------------------

make_network() {
  ip -4 addr show | grep -q "inet $SUBNET\." \
    && fail "the subnet $SUBNET.0/24 is in use on this machine: set SUBNET to an unused one"
  ip link add "$BRIDGE" type bridge
  ip addr add "$CTLD_ADDR/24" dev "$BRIDGE"
  ip link set "$BRIDGE" up
  printf '127.0.0.1 localhost\n%s %s\n' "$CTLD_ADDR" "$CTLD_HOST" > "$HOSTS_FILE"
  local i name
  for (( i = 1; i <= NODES; i++ )); do
    name=$(node_name "$i")
    ip netns add "$name"
    ip link add "$PREFIX-v$i" type veth peer name eth0 netns "$name"
    ip link set "$PREFIX-v$i" master "$BRIDGE" up
    ip -n "$name" addr add "$(node_addr "$i")/24" dev eth0
    ip -n "$name" link set eth0 up
    ip -n "$name" link set lo up
    echo "$(node_addr "$i") $name" >> "$HOSTS_FILE"
  done
  say "network: bridge $BRIDGE $CTLD_ADDR/24, nodes $(node_name 1)..$(node_name "$NODES") at $(node_addr 1).."
}

remove_network() {
  local ns link
  for ns in $(ip netns list 2> /dev/null | grep -o "^$PREFIX-n[0-9]*" || true); do
    ip netns pids "$ns" 2> /dev/null | xargs -r kill -KILL 2> /dev/null || true
    ip netns delete "$ns"
  done
  # Deleting one end of a veth pair deletes the other (the namespace's own would go only once
  # the kernel has released the namespace).
  for link in $(ip -o link show | grep -o ": $PREFIX-[^:@]*" | tr -d ': ' || true); do
    ip link delete "$link" 2> /dev/null || true
  done
}

# Run a command as a daemon of the node (or of the controller): in its network namespace (none
# for the controller, which sits on the bridge), with its own hostname and the cluster's hosts
# file mounted over /etc/hosts. `ip netns exec` would remount /sys, hiding the cgroup file
# system slurmd looks for: nsenter joins the network namespace only.
as_host() {  # as_host NAME [NETNS] -- COMMAND...
  local name=$1 netns=$2
  shift 3
  local enter=()
  [[ -n $netns ]] && enter=(nsenter "--net=/run/netns/$netns")
  "${enter[@]}" unshare --uts --mount --propagation private \
    bash -c 'mount --bind "$1" /etc/hosts && hostname "$2" && shift 2 && exec "$@"' _ "$HOSTS_FILE" "$name" "$@"
}

# ---- 3. configuration and daemons ------------------------------------------------------------

write_config() {
  local hardware lines="" i
  # What slurmd detects on this machine (CPUs, sockets, cores, memory): a node declared with
  # more than that would be drained at registration.
  hardware=$(slurmd -C | head -n 1)
  [[ $hardware == NodeName=* ]] || fail "slurmd -C printed no node line: $hardware"
  hardware=${hardware#NodeName=* }
  SPOOL=$(mktemp -d /tmp/msapo-spool.XXXXXX)
  for (( i = 1; i <= NODES; i++ )); do
    lines+="NodeName=$(node_name "$i") NodeAddr=$(node_addr "$i") $hardware State=UNKNOWN"$'\n'
    mkdir -p "$SPOOL/$(node_name "$i")"
  done
  mkdir -p "$STATE/slurmctld"
  local template
  template=$(< "$repo/tools/slurm/slurm.conf.in")
  template=${template//@NODE_LINES@/${lines%$'\n'}}
  template=${template//@NODE_LIST@/$PREFIX-n[1-$NODES]}
  template=${template//@CTLD_HOST@/$CTLD_HOST}
  template=${template//@CTLD_ADDR@/$CTLD_ADDR}
  template=${template//@CTLD_PORT@/$CTLD_PORT}
  template=${template//@SLURMD_PORT@/$SLURMD_PORT}
  template=${template//@STATE_DIR@/$STATE}
  template=${template//@SPOOL_DIR@/$SPOOL}
  printf '%s\n' "$template" > "$SLURM_CONF"
  say "wrote $SLURM_CONF: $NODES nodes, each $hardware"
}

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
  # The nodes reach munged through its socket file, which every namespace shares.
  as_host "$CTLD_HOST" "" -- slurmctld -f "$SLURM_CONF" \
    || fail "slurmctld did not start: $(tail -5 "$STATE/slurmctld.log" 2> /dev/null)"
  local i name states
  for (( i = 1; i <= NODES; i++ )); do
    name=$(node_name "$i")
    as_host "$name" "$name" -- slurmd -f "$SLURM_CONF" -N "$name" \
      || fail "slurmd of $name did not start: $(tail -5 "$STATE/slurmd-$name.log" 2> /dev/null)"
  done
  for _ in $(seq 60); do
    states=$(sinfo -h -N -o %T 2> /dev/null | sort -u | tr '\n' ' ')
    [[ $states == "idle " ]] && break
    sleep 1
  done
  [[ $states == "idle " ]] || fail "nodes are '$states', not all idle, after 60 s; see $STATE/slurm*.log"
  say "cluster up ($(sinfo --version)): $(sinfo -h -o '%P %D nodes (%N) %c CPUs each, %T')"
}

stop_pidfile() {
  local file=$1 pid
  [[ -f $file ]] || return 0
  pid=$(< "$file")
  kill "$pid" 2> /dev/null || true
  for _ in $(seq 20); do
    # Gone, or a zombie its parent has yet to reap: either way it no longer runs.
    [[ $(ps -o stat= -p "$pid" 2> /dev/null) == [^Z]* ]] || break
    sleep 0.5
  done
  rm -f "$file"
}

stop_cluster() {
  local file
  if [[ -n $job_id ]]; then
    scancel "$job_id" 2> /dev/null || true
  fi
  for file in "$STATE"/slurmd-*.pid "$STATE/slurmctld.pid"; do
    stop_pidfile "$file"
  done
  remove_network
  [[ -n $SPOOL ]] && rm -rf "$SPOOL"
  if (( started_munge )); then
    stop_pidfile /run/munge/munged.pid
  fi
}

cleanup() {
  if (( KEEP_SLURM )); then
    say "cluster left running (SLURM_CONF=$SLURM_CONF sinfo); run the script again to replace it, or remove it" \
      "with: kill \$(cat $STATE/*.pid); ip netns list | grep $PREFIX-n | xargs -n1 ip netns delete; ip link delete $BRIDGE"
  else
    stop_cluster
  fi
}

# ---- 4. the jobs -----------------------------------------------------------------------------

checkpoint_step() {  # checkpoint_step RUN_DIR: the step of its latest checkpoint, 0 without one
  local name
  name=$(cat "$1/checkpoints/latest" 2> /dev/null || true)
  [[ $name =~ ^step_0*([0-9]+)$ ]] && echo "${BASH_REMATCH[1]}" || echo 0
}

job_field() {  # job_field NAME: a field of `scontrol show job`
  scontrol show job "$job_id" | grep -o "\b$1=[^ ]*" | head -n 1 | cut -d= -f2
}

kill_rollout_server() {  # kill_rollout_server RUN_DIR: SIGKILL to the server's whole process group
  local pid
  pid=$(pgrep -f -- "sglang.launch_server.*$1/start_model" | head -n 1 || true)
  [[ -n $pid ]] || fail "no rollout server of $1 is running"
  say "killing the rollout server on $(node_name "$NODES") (pid $pid, its process group)"
  kill -KILL -- "-$(ps -o pgid= -p "$pid" | tr -d ' ')"
}

job_state() {  # job_state: JobState of job_id, "" while scontrol cannot tell
  job_field JobState 2> /dev/null || true
}

job_running() {  # job_running: the job is queued or running (requeues included), not finished
  # A job SLURM could not launch is requeued and held: it would never run.
  if [[ $(job_field Reason 2> /dev/null) == launch_failed* ]]; then
    fail "SLURM could not launch job $job_id: $(grep -h 'error\|fatal' "$STATE"/slurmd-*.log | tail -n 3)"
  fi
  [[ $(job_state) =~ ^(|PENDING|CONFIGURING|RUNNING|COMPLETING|REQUEUED|REQUEUE_FED|RESIZING|SUSPENDED)$ ]]
}

submit() {  # submit RUN_NAME: sets job_id, job_log and deadline
  local name=$1 out
  out=$(cd "$repo" && RUN_ROOT=$WORK/runs RUN_NAME=$name STEPS=$STEPS SAVE_EVERY=1 SETS=$JOB_SETS \
          sbatch --parsable --nodes="$NODES" --output="$WORK/job-$name-%j.out" \
          --export=ALL,ROLLOUT_NODES="$ROLLOUT_NODES" examples/slurm/tiny_cpu_multinode.sbatch 2>&1) \
    || fail "sbatch: $out"
  job_id=${out%%;*}
  job_log=$WORK/job-$name-$job_id.out
  deadline=$((SECONDS + JOB_TIMEOUT))
  say "job $job_id ($name) submitted: $STEPS steps; log $job_log"
}

wait_for_checkpoint() {  # wait_for_checkpoint RUN_DIR STEP
  until (( $(checkpoint_step "$1") >= $2 )); do
    job_running || fail "job $job_id ended ($(job_state)) before its step-$2 checkpoint; see $job_log"
    (( SECONDS < deadline )) || fail "no step-$2 checkpoint after $JOB_TIMEOUT s; see $job_log"
    sleep 1
  done
}

wait_for_job() {  # polled each second (sbatch --wait polls ever more rarely, up to 30 s apart)
  while job_running; do
    (( SECONDS < deadline )) || fail "job $job_id not finished after $JOB_TIMEOUT s; see $job_log"
    sleep 1
  done
  [[ $(job_state) == COMPLETED ]] || fail "job $job_id ended $(job_state) (exit code $(job_field ExitCode)); see $job_log"
}

run_interrupted() {
  local run_dir=$WORK/runs/rehearsal
  submit rehearsal
  wait_for_checkpoint "$run_dir" "$KILL_AFTER"
  kill_rollout_server "$run_dir"
  until grep -q "rollout server http://$(node_name "$NODES"):[0-9]* is not answering" "$job_log" 2> /dev/null; do
    job_running || fail "job $job_id ended ($(job_state)) before the trainer noticed the killed server"
    (( SECONDS < deadline )) || fail "the trainer did not notice the killed server; see $job_log"
    sleep 1
  done
  # The step under way waits for the server. What #SBATCH --signal=B:USR1@T sends before the
  # time limit: the launcher has the trainer stop after this step, with a checkpoint, then
  # requeues the job itself.
  say "the trainer waits for the server: SIGUSR1 to job $job_id's batch shell"
  scancel --signal=USR1 --batch "$job_id"
  # A requeued job may start again only some time later (its begin time is pushed about two
  # minutes ahead); bring it forward so the rehearsal does not wait.
  until [[ $(job_state) == PENDING ]]; do
    (( SECONDS < deadline )) || fail "job $job_id not back in the queue after the requeue"
    sleep 1
  done
  scontrol update JobId="$job_id" StartTime=now
  wait_for_job
  interrupted_job=$job_id interrupted_log=$job_log
  say "job $job_id finished"
}

run_straight() {
  # The same start model, converted (its cold start is the slowest part of a job's start).
  mkdir -p "$WORK/runs/straight"
  cp -r "$WORK/runs/rehearsal/start_model" "$WORK/runs/rehearsal/mcore" "$WORK/runs/straight/"
  submit straight
  wait_for_job
  say "job $job_id (uninterrupted) finished"
}

# ---- 5. checks -------------------------------------------------------------------------------

check_results() {
  local state restarts resumed
  job_id=$interrupted_job
  state=$(job_field JobState)
  restarts=$(job_field Restarts)
  [[ $state == COMPLETED ]] || fail "job $job_id is $state, not COMPLETED"
  [[ $restarts == 1 ]] || fail "job $job_id restarted $restarts times, not once"
  (( $(checkpoint_step "$WORK/runs/rehearsal") == STEPS )) || fail "latest checkpoint is not step $STEPS"
  grep -q 'stopped by the STOP file: latest checkpoint' "$interrupted_log" \
    || fail "the trainer did not report stopping with a checkpoint; see $interrupted_log"
  resumed=$(grep -o 'resuming from checkpoint step_[0-9]*' "$interrupted_log" || true)
  [[ $resumed =~ step_0*([0-9]+)$ ]] && (( BASH_REMATCH[1] == KILL_AFTER + 1 )) \
    || fail "the restarted job did not resume from the checkpoint of step $((KILL_AFTER + 1)) ('$resumed')"
  resumed_from=${BASH_REMATCH[1]}
  grep -q "serve_node: the server on $(node_name "$NODES"):[0-9]* exited (status [0-9]*); restart 1" \
    "$WORK/runs/rehearsal/slurm/attempt-0/serve-$(node_name "$NODES").log" \
    || fail "serve_node.sh did not restart the killed server; see $WORK/runs/rehearsal/slurm/attempt-0/"
  grep -q "rollout server http://$(node_name "$NODES"):[0-9]* answers again" "$interrupted_log" \
    || fail "the trainer did not wait for the restarted server; see $interrupted_log"
  "$repo/.venv/bin/python" "$repo/tools/slurm/compare_metrics.py" "$WORK/runs/straight/metrics.jsonl" \
    "$WORK/runs/rehearsal/metrics.jsonl" --steps "$STEPS" || fail "the interrupted run differs from the straight one"
  say "job $interrupted_job: COMPLETED after 1 requeue, resumed from step $resumed_from; every step equals the" \
    "uninterrupted run's"
}

main() {
  (( EUID == 0 )) || fail "run as root: it installs packages, creates network namespaces and starts the daemons"
  (( NODES - ROLLOUT_NODES >= 1 && ROLLOUT_NODES >= 1 )) || fail "NODES=$NODES, ROLLOUT_NODES=$ROLLOUT_NODES"
  (( 1 <= KILL_AFTER && KILL_AFTER + 1 < STEPS )) \
    || fail "need 1 <= KILL_AFTER < STEPS - 1 (got KILL_AFTER=$KILL_AFTER, STEPS=$STEPS)"
  # A cluster left by an earlier rehearsal (KEEP_SLURM=1) goes first.
  for file in "$STATE"/slurmd-*.pid "$STATE/slurmctld.pid"; do
    stop_pidfile "$file"
  done
  remove_network
  rm -rf "$WORK" /tmp/msapo-spool.*
  mkdir -p "$WORK/etc"
  install_packages
  trap cleanup EXIT
  make_network
  write_config
  start_munge
  start_slurm
  run_interrupted
  run_straight
  check_results
  say "passed"
  printf '{"nodes": %d, "train_nodes": %d, "rollout_nodes": %d, "steps": %d, "requeued": %d, "resumed_from": %d, "seconds": %d}\n' \
    "$NODES" "$((NODES - ROLLOUT_NODES))" "$ROLLOUT_NODES" "$STEPS" 1 "$resumed_from" "$((SECONDS - started))"
}

main "$@"; exit  # one line: bash reads no further, even if this file changes meanwhile
