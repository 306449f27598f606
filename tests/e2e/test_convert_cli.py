"""`megatron-sapo convert` and `parity` as a user runs them: real processes, real files.

Run as a script under torchrun, this file saves the tiny model at a layout with ``save_model``
(real Megatron-Core over gloo), as training does: those checkpoints carry the saving layout's
vocabulary padding, which ``convert mcore-to-hf`` must read.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp

from megatron_sapo.convert.hf_checkpoint import HFCheckpoint
from megatron_sapo.models import use_transformer_engine
from megatron_sapo.models.tiny import save_tiny_qwen3_moe

pytestmark = pytest.mark.slow

# The console script of the interpreter running the tests, whether or not its folder is on PATH.
CLI = shutil.which("megatron-sapo") or str(Path(sys.executable).with_name("megatron-sapo"))
REPO = Path(__file__).resolve().parents[2]
# The spec "auto" builds on this machine: local without CUDA and TransformerEngine.
AUTO_SPEC = "transformer_engine" if use_transformer_engine("auto") else "local"


def run(*args, ok=True):
    proc = subprocess.run([CLI, *args], capture_output=True, text=True, timeout=600)
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
    lines = out.strip().splitlines()
    report = json.loads(lines[-1])
    assert f"spec: {AUTO_SPEC}" in lines and report["transformer_impl"] == AUTO_SPEC
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

    if AUTO_SPEC == "local":  # TransformerEngine cannot be built here: forcing it names what is missing
        proc = run("convert", "hf-to-mcore", "--hf", str(hf_dir), "--out", str(tmp_path / "o4"),
                   "--transformer-impl", "transformer_engine", ok=False)
        assert proc.returncode == 2 and '--transformer-impl = "transformer_engine", but' in proc.stderr
        assert not (tmp_path / "o4").exists()


@pytest.mark.parametrize("damage", ["header length", "header json", "truncated data"])
def test_a_corrupt_safetensors_file_is_one_line_naming_it(hf_dir, tmp_path, damage):
    """In each command that reads an HF checkpoint: convert, parity, serve, eval, and the loader
    train uses."""
    broken = tmp_path / "broken"
    shutil.copytree(hf_dir, broken)
    path = broken / "model.safetensors"
    data = path.read_bytes()
    length = int.from_bytes(data[:8], "little")
    if damage == "header length":
        data = (2**63).to_bytes(8, "little") + data[8:]  # used to be an OverflowError traceback
        expected = "corrupt or truncated safetensors header"
    elif damage == "header json":
        data = data[:8] + b"{not json" + data[17:]
        expected = "corrupt safetensors header (not JSON"
    else:
        data = data[:8 + length + 100]
        expected = "do not fit its size or the file's 100 data bytes"
    path.write_bytes(data)
    for args in (["convert", "hf-to-mcore", "--hf", str(broken), "--out", str(tmp_path / "out")],
                 ["parity", "--hf", str(broken), "--mcore", str(tmp_path / "unused")],
                 ["serve", "--model", str(broken), "--port", "1", "--print-command"],
                 ["eval", str(eval_config(tmp_path)), "--checkpoint", str(broken), "--output", str(tmp_path / "ev")]):
        proc = run(*args, ok=False)
        last = proc.stderr.strip().splitlines()[-1]
        assert proc.returncode == 2 and str(path) in last and expected in last, proc.stderr[-2000:]
        assert "Traceback" not in proc.stderr
    with pytest.raises(ValueError, match=expected.replace("(", r"\(")):
        HFCheckpoint(broken).get(HFCheckpoint(hf_dir).names()[0])


def eval_config(folder: Path) -> Path:
    """The demo config with one eval set (the shipped math example)."""
    config = folder / "eval.toml"
    config.write_text((REPO / "examples/tiny_cpu/sapo.toml").read_text() + f"""
[[eval.sets]]
name = "math"
path = "{REPO / 'examples/my_data/math_tiny.jsonl'}"
prompt_key = "problem"
""")
    return config


@pytest.fixture(scope="module")
def vl_dir(tmp_path_factory):
    from megatron_sapo.models.tiny_vl import save_tiny_qwen3_vl_moe

    return save_tiny_qwen3_vl_moe(tmp_path_factory.mktemp("cli_vl") / "hf")


def test_vision_language_model_converts_and_matches_transformers(vl_dir, tmp_path):
    run("convert", "hf-to-mcore", "--hf", str(vl_dir), "--out", str(tmp_path / "mcore"), "--tp", "2", "--ep", "2")
    run("convert", "mcore-to-hf", "--mcore", str(tmp_path / "mcore"), "--out", str(tmp_path / "back"))
    original, back = HFCheckpoint(vl_dir), HFCheckpoint(tmp_path / "back")
    assert sorted(back.names()) == sorted(original.names())
    assert all(torch.equal(original.get(n), back.get(n)) for n in original.names())
    assert back.shape("model.language_model.layers.0.mlp.experts.gate_up_proj") == (4, 48, 80)  # [E, H, 2I]

    # The built-in synthetic image, then a non-square image file (8 x 12 patches).
    from megatron_sapo.models.tiny_vl import synthetic_image

    synthetic_image(5, 48).crop((0, 0, 48, 32)).save(tmp_path / "image.png")
    for flags, grid in ((["--tp", "2", "--ep", "2"], [[1, 8, 8]]),
                        (["--pp", "2", "--image", str(tmp_path / "image.png")], [[1, 8, 12]])):
        out = run("parity", "--hf", str(vl_dir), "--mcore", str(tmp_path / "mcore"), *flags).stdout
        report = json.loads(out.strip().splitlines()[-1])
        assert report["images"] == 1 and report["image_grid_thw"] == grid
        assert report["max_abs_logit_diff"] <= 1e-4
        assert len(report["hidden_state_max_abs_diff"]) == 6 and max(report["hidden_state_max_abs_diff"]) <= 1e-4


def test_parity_refuses_an_image_for_a_text_model(hf_dir, tmp_path):
    run("convert", "hf-to-mcore", "--hf", str(hf_dir), "--out", str(tmp_path / "mcore"))
    proc = run("parity", "--hf", str(hf_dir), "--mcore", str(tmp_path / "mcore"), "--image", "x.png", ok=False)
    assert proc.returncode != 0 and "holds a text-only model" in proc.stderr


def save_at_layout(hf_dir: str, out: str, tp: int, ep: int, pp: int) -> None:
    """Under torchrun: load the HF checkpoint at this layout and write it with ``save_model``."""
    import torch.distributed as dist

    from megatron_sapo.config import ParallelConfig
    from megatron_sapo.convert.load import load_hf_into_model
    from megatron_sapo.convert.mcore_checkpoint import save_model
    from megatron_sapo import models
    from megatron_sapo.parallel.groups import destroy_model_parallel, initialize_model_parallel

    dist.init_process_group("gloo")
    parallel = ParallelConfig(tp=tp, ep=ep, pp=pp)
    pg = initialize_model_parallel(parallel)
    hf_config = models.read_hf_config(hf_dir)
    family = models.model_family(hf_config)
    spec = family.from_hf_config(hf_config, parallel)
    model = family.build_model(spec, pg, pp_rank=dist.get_rank(pg.pp))
    load_hf_into_model(model, HFCheckpoint(Path(hf_dir)), models.weight_table(family, spec), pg)
    save_model(model, out, hf_config, extra_files_from=Path(hf_dir))
    destroy_model_parallel()
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def saved_at_tp2_ep2(hf_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("saved") / "mcore"
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    proc = subprocess.run([*torchrun, __file__, str(hf_dir), str(out), "2", "2", "1"], capture_output=True,
                          text=True, env={**os.environ, "TORCHDYNAMO_DISABLE": "1"}, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out


def stored_rows(ckpt, key: str) -> int:
    return dcp.FileSystemReader(str(ckpt)).read_metadata().state_dict_metadata[key].size[0]


def test_checkpoint_saved_at_tp2_ep2_converts_back(hf_dir, saved_at_tp2_ep2, tmp_path):
    # 301 tokens padded for TP=2: 512 rows (TP=1 would give 384).
    assert stored_rows(saved_at_tp2_ep2, "embedding.word_embeddings.weight") == 512
    assert stored_rows(saved_at_tp2_ep2, "output_layer.weight") == 512
    run("convert", "mcore-to-hf", "--mcore", str(saved_at_tp2_ep2), "--out", str(tmp_path / "back"))
    original, back = HFCheckpoint(hf_dir), HFCheckpoint(tmp_path / "back")
    assert sorted(back.names()) == sorted(original.names())
    for name in original.names():
        a, b = original.get(name), back.get(name)
        assert a.dtype == b.dtype and torch.equal(a, b), f"{name} differs after mcore-to-hf"
    assert (tmp_path / "back" / "tokenizer_config.json").exists()


def test_too_few_vocabulary_rows_are_refused(saved_at_tp2_ep2, tmp_path):
    ckpt = tmp_path / "mcore"
    shutil.copytree(saved_at_tp2_ep2, ckpt)
    config = json.loads((ckpt / "hf_config.json").read_text())
    config["vocab_size"] = 600  # the checkpoint stores 512 rows
    (ckpt / "hf_config.json").write_text(json.dumps(config))
    proc = run("convert", "mcore-to-hf", "--mcore", str(ckpt), "--out", str(tmp_path / "back"), ok=False)
    assert proc.returncode == 2
    assert "'embedding.word_embeddings.weight' has shape (512, 48)" in proc.stderr
    assert "vocab_size=600" in proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mcore"]  # neither the output nor a partial folder


if __name__ == "__main__":  # guarded: dist_checkpointing starts a helper process that re-imports this file
    save_at_layout(sys.argv[1], sys.argv[2], *map(int, sys.argv[3:6]))
