#!/usr/bin/env bash
# The GPU checks of the training step, on the lent device machine (one H200; torch 2.11 on
# Python 3.12; no Megatron-Core, TransformerEngine or SGLang; no network): the CUDA tests
# (tests/gpu: vocab-parallel log-probs, one training step on the GPU against the CPU), then
# tools/bench_train_step.py on a Qwen3-30B-A3B-shaped model (padded vs token budget vs packing;
# tokens/s, model TFLOP/s, peak memory), then the planner against measured peaks. A few
# minutes in all. Logs go to $OUT when it is set.
#
# Megatron-Core travels as a wheel in .whl/ (the one package missing there). Its Requires-Dist
# (`unzip -p .whl/megatron_core-*.whl '*/METADATA' | grep ^Requires-Dist | grep -v extra`) is
# torch, numpy and packaging, all on the machine; the optional modules Megatron-Core imports on
# the way (einops, pyyaml, tensorboard, tqdm) are there too. megatron_sapo itself travels in
# the working tree, and neither the benchmark nor tests/gpu imports transformers or sglang.
# Prepare once, in the repository root here:
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 -d .whl megatron-core==0.16.1
# (megatron_core-0.16.1-cp312-cp312-manylinux_2_24_x86_64.manylinux_2_28_x86_64.whl, 2.6 MB)
# then run with the device tool: command `bash tools/gpu_check.sh`, carry [".whl"].
#
# Benchmark size: 4 layers at true widths (128 experts, vocabulary 151,936, bf16) hold about
# 56 GB of weights, fp32 gradients and Adam state (11 GB per layer). Without TransformerEngine
# the local attention keeps fp32 and bf16 softmax probabilities of [rows, 32 heads, S, S] per
# layer, so rows stay at 4,096 tokens (not the job's 16,384) and the padded method takes 2 rows
# per microbatch (4 would need ~130 GB). BENCH_ARGS replaces these arguments.
# Then tools/check_plan_memory.py: `megatron-sapo plan`'s predicted peak against
# torch.cuda.max_memory_allocated for 3 settings of the same 4-layer model (packed 8,192-token
# microbatches with full recompute; a 4,096-token budget without recompute; 2 rows of 1,024
# with selective recompute), each in its own process. PLAN_ARGS replaces its arguments.
set -uo pipefail

logs=${OUT:-/tmp/gpu_check}
mkdir -p "$logs"
bench_args=${BENCH_ARGS:---layers 4 --experts 128 --vocab 151936 --dtype bfloat16 --rows 64 --cap 4096 \
--micro-batch-size 2}

python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  || { echo "installing .whl/*.whl failed (see the top of $0 for how to prepare .whl)"; exit 1; }
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
# The three methods' microbatches differ in shape; growable segments keep fragmentation from
# counting as memory the step needs.
export PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$logs/machine.log"
python3 -c "import sys, torch, megatron.core as mc; print('python', sys.version.split()[0], torch.__version__, mc.__version__)" \
  2>/dev/null | tee -a "$logs/machine.log"

status=0
echo "== python3 -m pytest tests/gpu -q -rs"
python3 -m pytest tests/gpu -q -rs 2>&1 | tee "$logs/pytest.log" || status=1

echo "== python3 tools/bench_train_step.py --device cuda $bench_args"
# shellcheck disable=SC2086  # bench_args is a list of arguments
python3 tools/bench_train_step.py --device cuda $bench_args 2>&1 | tee "$logs/bench.log" || status=1
grep '^{' "$logs/bench.log" | tail -n 1 > "$logs/bench.json"

plan_args=${PLAN_ARGS:---layers 4 --experts 128 --vocab 151936 --seq 4096}
echo "== python3 tools/check_plan_memory.py --device cuda $plan_args"
# shellcheck disable=SC2086  # plan_args is a list of arguments
python3 tools/check_plan_memory.py --device cuda $plan_args 2>&1 | tee "$logs/plan.log" || status=1
grep '^{' "$logs/plan.log" | tail -n 1 > "$logs/plan.json"

exit $status
