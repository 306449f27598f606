#!/usr/bin/env bash
# Set up .venv (tools/setup_env.sh) and run the CPU test suite:
#   1. single-process tests (unit, sglang, slow, e2e; gpu tests skip with a reason without CUDA)
#   2. multi-rank tests in three `torchrun --nproc_per_node=2` launches over gloo (text models in two, then VL)
# then print one closing line for both: "total: N passed, N failed, N skipped".
# Extra arguments go to the single-process pytest run (e.g. -k loss, -x).
set -uo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo"
bash tools/setup_env.sh || exit 1
# shellcheck disable=SC1091
source .venv/bin/activate

reports=$(mktemp -d)
trap 'rm -rf "$reports"' EXIT
# Megatron's fused kernels go through torch.compile; on CPU that compiles C++ on first use.
export TORCHDYNAMO_DISABLE=1

echo "== single-process tests"
python -m pytest -m "not distributed" --junitxml="$reports/single.xml" --timeout 900 "$@"
single_rc=$?

# Several launches: every model a test builds stays alive (Megatron's DDP holds itself through
# its gradient-accumulator hooks, a cycle through autograd nodes that garbage collection cannot
# break), and with it its gloo groups and their threads (3,000 after half the text tests in one
# process); a process running every layout of every test slows down as the session goes on.
run_multi_rank() {  # NAME PYTEST-ARGS...
  local name=$1; shift
  echo "== multi-rank tests: $name (torchrun, 2 ranks, gloo)"
  timeout --signal=KILL 3000 torchrun --standalone --nproc_per_node=2 \
    -m pytest -m distributed "$@" --junitxml="$reports/distributed-$name.xml" -p no:cacheprovider \
    --timeout 600 --timeout-method thread  # a rank stuck in a gloo call ignores signals
  local rc=$?
  [[ $rc -eq 137 ]] && echo "multi-rank tests ($name) hung and were killed after 50 minutes" >&2
  return $rc
}
run_multi_rank text-model tests/distributed/test_convert_padding.py tests/distributed/test_microbatching.py \
  tests/distributed/test_qwen3_moe_megatron.py tests/distributed/test_recompute.py tests/distributed/test_plan_memory.py
model_rc=$?
run_multi_rank text-training tests/distributed --ignore-glob='tests/distributed/test_qwen3_vl_*' \
  --ignore=tests/distributed/test_convert_padding.py --ignore=tests/distributed/test_microbatching.py \
  --ignore=tests/distributed/test_qwen3_moe_megatron.py --ignore=tests/distributed/test_recompute.py \
  --ignore=tests/distributed/test_plan_memory.py
training_rc=$?
run_multi_rank vl tests/distributed/test_qwen3_vl_*.py  # the pattern the text-training launch leaves out
vl_rc=$?

python tools/test_summary.py "$reports/single.xml" "$reports/distributed-text-model.xml" \
  "$reports/distributed-text-training.xml" "$reports/distributed-vl.xml"
summary_rc=$?
# pytest exits 5 when it collects nothing; that is not a failure of the suite as a whole.
for rc in $single_rc $model_rc $training_rc $vl_rc; do
  [[ $rc -ne 0 && $rc -ne 5 ]] && exit 1
done
exit $summary_rc
