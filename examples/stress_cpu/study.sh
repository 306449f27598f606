#!/usr/bin/env bash
# The CPU stress study (issue 17): SAPO against GSPO, GRPO-R2, GRPO and GRPO-R3, plus the SAPO
# temperature ablation (tau_neg 1.05 / 1.0 / 0.95 at tau_pos 1.0), in the off-policy regime of
# examples/stress_cpu/*.toml (16 experts top-2, 3-6 digit reversal, 16 minibatch updates per
# rollout batch at lr 5e-4, bounded staleness 1; see sapo.toml for what was measured), over
# SEEDS, then plots and tables.
#   nohup bash examples/stress_cpu/study.sh > study.log 2>&1 &     # the whole study, in the background
#   SEEDS="0" bash examples/stress_cpu/study.sh                     # one seed of each configuration
#   R3=0 ABLATION=0 bash examples/stress_cpu/study.sh               # without GRPO-R3 / the tau ablation
#   SETS="optimizer.lr=4e-4" ROOT=runs/stress_lr4e-4 bash examples/stress_cpu/study.sh   # a milder regime
# (SETS: space-separated section.key=value overrides for every run; give each regime its own ROOT.)
# 7 configurations x 5 seeds = 35 runs of about 3-4 minutes each on 2 otherwise idle cores
# (20 RL steps; more when other work shares the cores), so about 2-2.5 hours; one run at a
# time, at nice 10 (NICE=...). Resumable: a run
# that finished is skipped, one stopped after a checkpoint resumes (--resume), one stopped before
# any checkpoint starts again. Runs go to $ROOT/<label>-seed<S>/; the comparisons, each a
# figure in the style of the paper's figure 4 (compare.png: reward and Pass@1 against step, mean
# over seeds with a min-max band, crosses at each seed's collapse) and tables (compare.md: mean
# ± std and per-seed results, collapse, attenuated / clipped token fractions), to
# $ROOT/compare/ and $ROOT/compare_tau/. The script ends with the diagnostics of both: the share
# of tokens SAPO's gate attenuated (weight < 0.5) and GRPO/GSPO clipped, per configuration.
# Not part of `make test`.
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
ROOT=${ROOT:-runs/stress}
SEEDS=${SEEDS:-"0 1 2 3 4"}
ABLATION=${ABLATION:-1}
R3=${R3:-1}
SETS=${SETS:-}
common=()
for item in $SETS; do common+=(--set "$item"); done
cli=${CLI:-"$repo/.venv/bin/megatron-sapo"}
NICE=${NICE:-10}
examples="$repo/examples/stress_cpu"

run() {  # run NAME CONFIG SEED [--set ...]
  local name=$1 config=$2 seed=$3; shift 3
  local out="$ROOT/$name-seed$seed" steps resume=()
  steps=$(grep -oP '^steps = \K\d+' "$config")
  for item in $SETS; do [[ $item == train.steps=* ]] && steps=${item#train.steps=}; done
  if [[ -f "$out/checkpoints/latest" ]] && grep -q "\"step\": $steps," "$out/metrics.jsonl" 2>/dev/null; then
    echo "== $out: done already"; return
  fi
  if [[ -f "$out/checkpoints/latest" ]]; then
    resume=(--resume)
  elif [[ -e "$out" ]]; then
    echo "== $out: stopped before its first checkpoint; starting it again"
    rm -rf -- "$out"
  fi
  # Every configuration of a seed starts from the same model: the seed's first run makes it (the
  # built-in model and its cold start, which depend only on the seed and the settings every run
  # shares), the others find it in their folder, as a resumed run would, and skip the cold start.
  local start="$ROOT/start_model-seed$seed"
  if [[ ! -e "$out/start_model" && -f "$start/config.json" ]]; then
    mkdir -p "$out"
    cp -r "$start" "$out/start_model"
  fi
  echo "== $out ($(date +%H:%M:%S))"
  nice -n "$NICE" "$cli" train "$config" --output "$out" "${resume[@]}" --set "train.seed=$seed" \
    --set "rollout.sampling_seed=$((1234 + seed))" --set "data.seed=$seed" "${common[@]}" "$@"
  if [[ ! -e "$start" ]]; then
    cp -r "$out/start_model" "$start"
  fi
}

algorithms=()
for seed in $SEEDS; do
  run sapo "$examples/sapo.toml" "$seed"
  run gspo "$examples/gspo.toml" "$seed"
  run grpo_r2 "$examples/grpo_r2.toml" "$seed"
  run grpo "$examples/grpo_r2.toml" "$seed" --set train.routing_replay=none
  algorithms+=("$ROOT/sapo-seed$seed" "$ROOT/gspo-seed$seed" "$ROOT/grpo_r2-seed$seed" "$ROOT/grpo-seed$seed")
  if [[ $R3 == 1 ]]; then
    run grpo_r3 "$examples/grpo_r2.toml" "$seed" --set train.routing_replay=r3
    algorithms+=("$ROOT/grpo_r3-seed$seed")
  fi
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

# Diagnostics: is the regime off-policy enough? (target: SAPO attenuates and GRPO clips >= 5% of tokens)
diagnostics() {  # the label, gate/clip and collapse columns of a compare.md's "By label" table
  awk -F' \\| ' '
    /^## By label/ { on = 1; next }
    /^## / { on = 0 }
    on && /^\| label/ {
      for (i = 1; i <= NF; i++) { gsub(/^\| | \|$/, "", $i); col[$i] = i }
      printf "%-40s %12s %10s %10s %14s\n", "label", "attenuated", "clipped", "max ratio", "collapsed seeds"; next
    }
    on && /^\| / && !/^\|---/ {
      for (i = 1; i <= NF; i++) gsub(/^\| | \|$/, "", $i)
      printf "%-40s %12s %10s %10s %14s\n", $col["label"], $col["attenuated frac"], $col["clip frac"],
             $col["largest ratio"], $col["collapsed seeds"]
    }' "$1"
}
echo
echo "Token fractions attenuated by SAPO's gate (weight < 0.5) and clipped by GRPO/GSPO, means over steps and seeds:"
diagnostics "$ROOT/compare/compare.md"
if [[ $ABLATION == 1 ]]; then diagnostics "$ROOT/compare_tau/compare.md"; fi
