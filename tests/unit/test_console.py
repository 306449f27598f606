"""What `megatron-sapo train` prints around a run: header, summary, curve, and the library
warnings it leaves out (megatron_sapo/console.py)."""

import json
import warnings
from pathlib import Path

import pytest

from megatron_sapo import console
from megatron_sapo.config_file import load_config

pytestmark = pytest.mark.unit

REPO = Path(__file__).parents[2]


def test_header_names_model_layout_servers_algorithm_and_outputs(tmp_path):
    cfg = load_config(REPO / "examples" / "tiny_cpu" / "sapo.toml", [f"train.out_dir={tmp_path}"])
    text = console.header(cfg, 2, tmp_path)
    assert "built-in tiny-qwen3-moe (fp32)" in text
    assert "2 rank(s): TP2 PP1 EP1, 1 data-parallel replica(s)" in text
    assert "1 colocated SGLang server(s), 16 prompts x 8 samples per step" in text
    assert "SAPO (tau_pos 1.0, tau_neg 1.05), 40 steps of 4 updates" in text and str(tmp_path) in text
    r2 = load_config(REPO / "examples" / "tiny_cpu" / "grpo_r2.toml", [f"train.out_dir={tmp_path}"])
    assert "GRPO with routing replay R2" in console.header(r2, 2, tmp_path)


def test_summary_reports_first_and_last_fifth_pass_at_1_time_and_writes_the_curve(tmp_path):
    rows = [{"step": s, "reward_mean": 0.1 if s <= 2 else 0.6, **({"pass_at_1": s / 20} if s % 5 == 0 else {})}
            for s in range(1, 11)]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    text = console.summary(tmp_path, 271.4)
    assert "0.100 (first fifth of 10 steps) -> 0.600 (last fifth)" in text
    assert "Pass@1    0.250 (step 5) -> 0.500 (step 10)" in text
    assert "time      4 min 31 s" in text and f"curve     {tmp_path / 'curves.png'}" in text
    assert (tmp_path / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_known_harmless_warnings_are_filtered_and_others_are_not():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        console.quiet_known_warnings()
        warnings.warn("Apex is not installed. Falling back to Torch Norm")
        warnings.warn("CUDA_DEVICE_MAX_CONNECTIONS should be set to 1 with sequence parallelism")
        warnings.warn("something the user must see")
    assert [str(w.message) for w in caught] == ["something the user must see"]


def test_summary_of_a_run_without_steps_says_so(tmp_path):
    assert console.summary(tmp_path, 3.0) == f"time      0 min 03 s (no steps in {tmp_path / 'metrics.jsonl'})"
    assert not (tmp_path / "curves.png").exists()
