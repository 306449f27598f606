"""`megatron-sapo convert` and `parity` as a user runs them: real processes, real files."""

import json
import shutil
import subprocess

import pytest
import torch

from megatron_sapo.convert.hf_checkpoint import HFCheckpoint
from megatron_sapo.models.tiny import save_tiny_qwen3_moe

pytestmark = pytest.mark.slow


def run(*args, ok=True):
    proc = subprocess.run([shutil.which("megatron-sapo"), *args], capture_output=True, text=True, timeout=600)
    if ok:
        assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    path = save_tiny_qwen3_moe(tmp_path_factory.mktemp("cli") / "hf")
    (path / "tokenizer_config.json").write_text('{"model_max_length": 256}')
    return path


def test_convert_both_ways_and_parity(hf_dir, tmp_path):
    run("convert", "hf-to-mcore", "--hf", str(hf_dir), "--out", str(tmp_path / "mcore"), "--tp", "2", "--ep", "2")
    run("convert", "mcore-to-hf", "--mcore", str(tmp_path / "mcore"), "--out", str(tmp_path / "back"))
    original, back = HFCheckpoint(hf_dir), HFCheckpoint(tmp_path / "back")
    assert sorted(back.names()) == sorted(original.names())
    assert all(torch.equal(original.get(n), back.get(n)) for n in original.names())
    assert (tmp_path / "back" / "tokenizer_config.json").exists()
    assert json.loads((tmp_path / "back" / "config.json").read_text()) == json.loads((hf_dir / "config.json").read_text())

    out = run("parity", "--hf", str(hf_dir), "--mcore", str(tmp_path / "mcore"), "--tp", "2", "--ep", "2").stdout
    report = json.loads(out.strip().splitlines()[-1])
    assert report["max_abs_logit_diff"] <= 1e-4
    assert len(report["hidden_state_max_abs_diff"]) == 4 and max(report["hidden_state_max_abs_diff"]) <= 1e-4


def test_errors_name_the_problem(hf_dir, tmp_path):
    existing = tmp_path / "exists"
    existing.mkdir()
    proc = run("convert", "hf-to-mcore", "--hf", str(hf_dir), "--out", str(existing), ok=False)
    assert proc.returncode == 2 and "exists; pass --force" in proc.stderr

    missing = tmp_path / "missing_shard"
    shutil.copytree(hf_dir, missing)
    (missing / "model.safetensors").unlink()
    proc = run("convert", "hf-to-mcore", "--hf", str(missing), "--out", str(tmp_path / "o1"), ok=False)
    assert proc.returncode == 2 and "model.safetensors" in proc.stderr

    wrong = tmp_path / "wrong_shape"
    shutil.copytree(hf_dir, wrong)
    config = json.loads((wrong / "config.json").read_text())
    config["moe_intermediate_size"] = 24  # the tensors on disk have 20
    (wrong / "config.json").write_text(json.dumps(config))
    proc = run("convert", "hf-to-mcore", "--hf", str(wrong), "--out", str(tmp_path / "o2"), ok=False)
    assert proc.returncode == 2 and "linear_fc1.weight" in proc.stderr and "config.json implies" in proc.stderr
    assert not (tmp_path / "o2").exists()

    proc = run("convert", "hf-to-mcore", "--hf", str(hf_dir), "--out", str(tmp_path / "o3"), "--ep", "3", ok=False)
    assert proc.returncode == 2 and "not divisible by parallel.ep=3" in proc.stderr
