#!/usr/bin/env bash
# Parity of the Megatron models against transformers on a CUDA GPU, fp32 and bf16, for the
# tiny Qwen3-MoE, a 2-layer Qwen3-30B-A3B-shaped model (random weights, true widths) and the tiny
# Qwen3-VL-MoE (an image prompt through the vision tower; TransformerEngine spec where installed).
# Needs an environment where megatron_sapo, megatron-core and transformers import.
#   bash tools/gpu_parity.sh [WORKDIR]
set -euo pipefail
work=${1:-/tmp/megatron_sapo_gpu_parity}
rm -rf "$work"; mkdir -p "$work"
python3 - "$work" <<'PY'
import sys
from pathlib import Path
sys.path.insert(0, "tools")
from bench_convert import write_synthetic_checkpoint
from megatron_sapo.models.tiny import save_tiny_qwen3_moe
from megatron_sapo.models.tiny_vl import save_tiny_qwen3_vl_moe
work = Path(sys.argv[1])
save_tiny_qwen3_moe(work / "tiny")
save_tiny_qwen3_vl_moe(work / "tiny_vl")
write_synthetic_checkpoint(work / "a3b_2layer", layers=2)
PY
cli() { python3 -c "import sys; from megatron_sapo.cli import main; sys.exit(main(sys.argv[1:]))" "$@"; }
for model in tiny a3b_2layer tiny_vl; do
  cli convert hf-to-mcore --hf "$work/$model" --out "$work/$model-mcore" 2>/dev/null
  for dtype in float32 bfloat16; do
    echo "$model $dtype: $(cli parity --hf "$work/$model" --mcore "$work/$model-mcore" --dtype "$dtype" --seq-len 64 2>/dev/null | tail -n 1)"
  done
done
