#!/usr/bin/env bash
# Build (or refresh) the project's virtual environment at <repo>/.venv.
#
#   tools/setup_env.sh            # CPU machine: everything the tests and the demo need
#   tools/setup_env.sh --gpu      # GPU machine: also transformer-engine (extra "gpu")
#
# Order matters: torch 2.13.0 (CPU build on this platform's disk) first, then sglang without
# its dependencies (its metadata pins torch 2.14.1 and CUDA kernels), then everything else
# under a constraint that keeps torch at 2.13.0, then this package in editable mode.
# Idempotent: a stamp keyed on the pinned files makes a second run return in about a second.
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
venv="$repo/.venv"
python=${PYTHON:-python3.11}
gpu=0
[[ "${1:-}" == "--gpu" ]] && gpu=1

log() { printf '[setup_env] %s\n' "$*" >&2; }

stamp_inputs=("$repo/pyproject.toml" "$repo/tools/setup_env.sh" "$repo"/requirements/*.txt)
want_stamp="$(cat "${stamp_inputs[@]}" | sha256sum | cut -d' ' -f1)-gpu$gpu"
stamp_file="$venv/.setup-stamp"
if [[ -f "$stamp_file" && "$(cat "$stamp_file")" == "$want_stamp" ]]; then
  exit 0
fi

install_mpi() {
  command -v mpicc >/dev/null && command -v mpirun >/dev/null && return 0
  log "installing the MPI system packages (openmpi) for mpi4py"
  local sudo=""
  if [[ $(id -u) -ne 0 ]]; then
    command -v sudo >/dev/null || { log "error: mpicc not found and not root; install libopenmpi-dev and openmpi-bin"; exit 1; }
    sudo="sudo"
  fi
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq libopenmpi-dev openmpi-bin >/dev/null
}

install_mpi

# SLURM and munge for the test suite's rehearsal of the cluster job (tools/slurm_rehearsal.sh),
# which also needs root for its namespaces and daemons: installed only when running as root with
# apt; elsewhere that one test skips, saying why.
install_slurm() {
  command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v sbatch >/dev/null \
    && command -v munged >/dev/null && return 0
  if [[ $(id -u) -ne 0 ]] || ! command -v apt-get >/dev/null; then
    log "SLURM is not installed and this is not root with apt: the SLURM rehearsal test will skip"
    return 0
  fi
  log "installing SLURM and munge (Debian packages) for the SLURM rehearsal test"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
    slurmctld slurmd slurm-client munge iproute2 util-linux >/dev/null \
    || log "warning: installing SLURM failed: the SLURM rehearsal test will skip"
}

install_slurm

if [[ ! -x "$venv/bin/python" ]]; then
  command -v "$python" >/dev/null || { log "error: $python not found (Python 3.11 is required; set PYTHON=...)"; exit 1; }
  log "creating $venv with $python"
  "$python" -m venv "$venv"
fi
pip=("$venv/bin/python" -m pip --disable-pip-version-check --no-input)
constraints=(-c "$repo/requirements/constraints.txt")
# Some machines' pip configuration names local package folders that may be absent; pip warns
# once per package about each. Drop those lines, fold pip's expected complaints about sglang's
# left-out requirements into one note (tools/pip_resolver_notes.awk), keep every other message
# and pip's status.
pip_install() {
  "${pip[@]}" install -q "$@" 2> >(grep -v "is ignored: it is neither a file nor a directory" \
    | awk -f "$repo/tools/pip_resolver_notes.awk" >&2)
}

log "installing torch 2.13.0"
pip_install torch==2.13.0
log "installing sglang without its CUDA pins"
pip_install "${constraints[@]}" --no-deps -r "$repo/requirements/sglang.txt"
log "installing runtime and test dependencies"
pip_install "${constraints[@]}" -r "$repo/requirements/runtime.txt" -r "$repo/requirements/dev.txt"
if [[ $gpu -eq 1 ]]; then
  log "installing GPU extras (transformer-engine)"
  pip_install "${constraints[@]}" -r "$repo/requirements/gpu.txt"
fi
log "installing megatron-sapo (editable)"
pip_install "${constraints[@]}" --no-deps -e "$repo"

# PyPI's torchvision is a CUDA build that fails to import beside CPU torch; this start-up hook
# makes `import torchvision` (and so transformers' model classes) work in a plain Python of the
# venv (megatron_sapo/torchvision_compat.py). It runs after the editable install's own .pth.
site_packages=$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
printf '%s\n' 'import importlib.util as _u; _u.find_spec("megatron_sapo") and getattr(__import__("megatron_sapo.torchvision_compat").torchvision_compat, "install_import_hook", lambda: None)()' \
  > "$site_packages/megatron_sapo_torchvision.pth"

"$venv/bin/python" - <<'PY'
import torch
assert torch.__version__.startswith("2.13.0"), f"torch {torch.__version__} installed; 2.13.0 is required"
from transformers import Qwen3MoeForCausalLM, Qwen3VLMoeForConditionalGeneration  # noqa: F401  (the hook above)
PY
echo "$want_stamp" > "$stamp_file"
log "ready: $venv"
