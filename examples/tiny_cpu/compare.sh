#!/usr/bin/env bash
# Compare SAPO with GSPO, GRPO-R2 and GRPO on the CPU demo task, over several seeds, plus the
# SAPO temperature ablation (tau_neg 1.05 / 1.0 / 0.95 at tau_pos 1.0), then plot and tabulate.
#   bash examples/tiny_cpu/compare.sh                 # all runs (about 5 minutes each on 2 cores)
#   SEEDS="0" ABLATION=0 bash examples/tiny_cpu/compare.sh
# Runs go to $ROOT/<label>-seed<S>/ (finished runs are skipped), the comparison to $ROOT/compare*/.
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
ROOT=${ROOT:-runs/compare}
SEEDS=${SEEDS:-"0 1 2"}
ABLATION=${ABLATION:-1}
cli="$repo/.venv/bin/megatron-sapo"
examples="$repo/examples/tiny_cpu"

run() {  # run NAME CONFIG SEED [--set ...]
  local name=$1 config=$2 seed=$3; shift 3
  local out="$ROOT/$name-seed$seed"
  if [[ -f "$out/checkpoints/latest" ]] && grep -q "\"step\": $(grep -oP '^steps = \K\d+' "$config")," "$out/metrics.jsonl" 2>/dev/null; then
    echo "== $out: done already"; return
  fi
  echo "== $out"
  "$cli" train "$config" --output "$out" --set "train.seed=$seed" --set "rollout.sampling_seed=$((1234 + seed))" \
    --set "data.seed=$seed" "$@"
}

algorithms=()
for seed in $SEEDS; do
  run sapo "$examples/sapo.toml" "$seed"
  run gspo "$examples/gspo.toml" "$seed"
  run grpo_r2 "$examples/grpo_r2.toml" "$seed"
  run grpo "$examples/grpo_r2.toml" "$seed" --set train.routing_replay=none
  algorithms+=("$ROOT/sapo-seed$seed" "$ROOT/gspo-seed$seed" "$ROOT/grpo_r2-seed$seed" "$ROOT/grpo-seed$seed")
done
"$cli" compare "${algorithms[@]}" --out "$ROOT/compare"

if [[ $ABLATION == 1 ]]; then
  ablation=()
  for seed in $SEEDS; do
    for tau_neg in 1.0 0.95; do
      run "sapo_tauneg$tau_neg" "$examples/sapo.toml" "$seed" --set "loss.tau_neg=$tau_neg"
      ablation+=("$ROOT/sapo_tauneg$tau_neg-seed$seed")
    done
    ablation+=("$ROOT/sapo-seed$seed")
  done
  "$cli" compare "${ablation[@]}" --out "$ROOT/compare_tau"
fi
