"""Rollout pieces that need no server: launch command and environment, the servability check,
routed-expert decoding, weight-sync buckets, the client's parsing of ``/generate`` answers,
and the CPU shims' seeded-sampling hash.

The launch command is read back with SGLang's own argument parser, so "the user's argument
wins" is checked the way the server will read it. The hash is checked against a plain-Python
MurmurHash3_x86_32 of the bytes SGLang hashes, itself checked against published test vectors.
"""

from __future__ import annotations

import argparse
import base64
import json
import math
import os
import struct
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from megatron_sapo.models.tiny import TINY_QWEN3_MOE
from megatron_sapo.rollout import cpu_shims
from megatron_sapo.rollout.client import RolloutClient, RolloutError, RoutedExperts, _BadOutput, _Prefix
from megatron_sapo.rollout.routed_experts import decode_routed_experts
from megatron_sapo.rollout.server import (
    CPU_MAX_TOTAL_TOKENS,
    SHIM_DIR,
    ServerOptions,
    UnservableModel,
    check_servable,
    server_command,
    server_env,
)
from megatron_sapo.rollout.weight_sync import buckets
from megatron_sapo.types import Sample

pytestmark = pytest.mark.unit

CPU_ONLY_FLAGS = ("--attention-backend", "--max-total-tokens", "--mem-fraction-static", "--disable-cuda-graph")


# ---- server command and environment ------------------------------------------------------------

@pytest.fixture(scope="module")
def sglang_parser() -> argparse.ArgumentParser:
    from megatron_sapo import torchvision_compat

    torchvision_compat.ensure_importable()  # sglang imports torchvision
    from sglang.srt.server_args import ServerArgs

    parser = argparse.ArgumentParser()
    ServerArgs.add_cli_args(parser)
    return parser


def parsed(parser: argparse.ArgumentParser, cmd: list[str]) -> argparse.Namespace:
    assert cmd[1:3] == ["-m", "sglang.launch_server"]
    return parser.parse_args(cmd[3:])


def test_cpu_command_gets_cpu_defaults_and_no_deterministic_flag(sglang_parser):
    opts = ServerOptions(model="/ckpt", port=31000, device="cpu", dtype="float32", return_routed_experts=True)
    cmd = server_command(opts, python="/py")
    assert cmd[0] == "/py"
    for flag in CPU_ONLY_FLAGS:
        assert cmd.count(flag) == 1, flag
    assert "--enable-deterministic-inference" not in cmd
    args = parsed(sglang_parser, cmd)
    assert (args.model_path, args.port, args.device, args.dtype) == ("/ckpt", 31000, "cpu", "float32")
    assert args.attention_backend == "torch_native"
    assert args.max_total_tokens == CPU_MAX_TOTAL_TOKENS
    assert args.enable_return_routed_experts


def test_cuda_command_adds_no_cpu_defaults_and_is_deterministic_by_default():
    cmd = server_command(ServerOptions(model="/ckpt", port=31000, device="cuda"))
    assert not set(CPU_ONLY_FLAGS) & set(cmd)
    assert "--enable-deterministic-inference" in cmd
    assert "--enable-return-routed-experts" not in cmd
    explicit_off = server_command(ServerOptions(model="/ckpt", port=31000, device="cuda", deterministic=False))
    assert "--enable-deterministic-inference" not in explicit_off


@pytest.mark.parametrize("extra", [
    ["--attention-backend", "triton", "--max-total-tokens", "999", "--mem-fraction-static", "0.5"],
    ["--attention-backend=triton", "--max-total-tokens=999", "--mem-fraction-static=0.5"],
])
def test_user_arguments_win_over_cpu_defaults(sglang_parser, extra):
    opts = ServerOptions(model="/ckpt", port=31000, device="cpu", extra_args=extra + ["--disable-cuda-graph"])
    cmd = server_command(opts)
    assert cmd.count("--disable-cuda-graph") == 1
    assert cmd[-len(opts.extra_args):] == opts.extra_args
    args = parsed(sglang_parser, cmd)
    assert (args.attention_backend, args.max_total_tokens, args.mem_fraction_static) == ("triton", 999, 0.5)


def test_cpu_env_puts_the_shims_first_on_pythonpath():
    base = {"PATH": "/bin", "PYTHONPATH": "/mine:/other"}
    env = server_env(ServerOptions(model="/ckpt", port=1, device="cpu"), base)
    assert env["PYTHONPATH"].split(os.pathsep) == [str(SHIM_DIR), "/mine", "/other"]
    assert env["SGLANG_USE_CPU_ENGINE"] == "1"
    assert env["PATH"] == "/bin"
    assert base == {"PATH": "/bin", "PYTHONPATH": "/mine:/other"}, "the base environment was modified"
    alone = server_env(ServerOptions(model="/ckpt", port=1, device="cpu"), {})
    assert alone["PYTHONPATH"] == str(SHIM_DIR)


def test_cuda_env_is_the_base_without_the_image_feature_cache():
    base = {"PATH": "/bin", "PYTHONPATH": "/mine", "SGLANG_VLM_CACHE_SIZE_MB": "4096"}
    # Cached image features would outlive weight updates (see server_env).
    expected = {**base, "SGLANG_VLM_CACHE_SIZE_MB": "0"}
    assert server_env(ServerOptions(model="/ckpt", port=1, device="cuda"), base) == expected


def test_cpu_env_installs_the_shims_in_a_fresh_interpreter():
    """The environment alone (no import of ours in the child) must make the stand-in kernels load."""
    env = server_env(ServerOptions(model="/ckpt", port=1, device="cpu"))
    probe = "import sgl_kernel, torch; print(sgl_kernel.__version__, hasattr(torch.ops.sgl_kernel, 'murmur_hash32_cpu'))"
    out = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["0.0.0+cpu-standin", "True"]


# ---- server processes outlive the thread that started them, not the process ----------------------

# A child started, with the parent-death signal, from a thread that then ends; prints its pid.
LAUNCH_FROM_A_THREAD = """
import threading
from megatron_sapo.rollout.manager import _die_with_parent, _launcher
box = []
thread = threading.Thread(target=lambda: box.append(_launcher.popen(["sleep", "60"], preexec_fn=_die_with_parent)))
thread.start()
thread.join()
print(box[0].pid, flush=True)
"""


def running(pid: int) -> bool:
    try:
        state = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"


def test_a_server_started_for_a_short_lived_thread_lives_until_the_process_ends():
    parent = subprocess.Popen([sys.executable, "-c", LAUNCH_FROM_A_THREAD + "import time; time.sleep(60)"],
                              stdout=subprocess.PIPE, text=True)
    try:
        child = int(parent.stdout.readline())
        time.sleep(1.0)
        assert running(child), "the child died with the thread that asked for it"
    finally:
        parent.kill()
        parent.wait()
    deadline = time.monotonic() + 10
    while running(child) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not running(child), "the child outlived its parent process"


# ---- servability ---------------------------------------------------------------------------------

def write_config(folder, **overrides):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps({**TINY_QWEN3_MOE, **overrides}))
    return folder


@pytest.mark.parametrize("overrides, dense", [
    (dict(mlp_only_layers=[1]), [1]),
    (dict(mlp_only_layers=[0, 3]), [0, 3]),
    (dict(mlp_only_layers=[], decoder_sparse_step=2), [0, 2]),
])
def test_dense_qwen3_moe_layers_are_refused_by_file_and_layer(tmp_path, overrides, dense):
    folder = write_config(tmp_path / "ckpt", **overrides)
    with pytest.raises(UnservableModel) as info:
        check_servable(folder)
    message = str(info.value)
    assert str(folder / "config.json") in message
    assert f"layers {dense} are dense" in message


def test_all_moe_and_other_architectures_are_servable(tmp_path):
    check_servable(write_config(tmp_path / "moe", mlp_only_layers=[]))
    check_servable(write_config(tmp_path / "llama", model_type="llama", architectures=["LlamaForCausalLM"]))


def test_missing_config_names_the_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path)):
        check_servable(tmp_path)


# ---- routed experts ------------------------------------------------------------------------------

def encode(routes: np.ndarray) -> str:
    return base64.b64encode(routes.astype(np.int32).tobytes()).decode("ascii")


def test_decode_keeps_moe_layers_in_order():
    tokens, layers, top_k = 7, 4, 2
    routes = np.arange(tokens * layers * top_k, dtype=np.int32).reshape(tokens, layers, top_k)
    out = decode_routed_experts(encode(routes), num_tokens=tokens, moe_layers=(True, False, True, True), top_k=top_k)
    assert out.dtype == np.int32 and out.flags.c_contiguous
    np.testing.assert_array_equal(out, routes[:, [0, 2, 3], :])


def test_decode_rejects_a_payload_of_the_wrong_size():
    routes = np.zeros((5, 4, 2), dtype=np.int32)
    with pytest.raises(ValueError, match=r"holds 40 values; expected 6 tokens x 4 layers x top-2 = 48"):
        decode_routed_experts(encode(routes), num_tokens=6, moe_layers=(True,) * 4, top_k=2)


@pytest.mark.parametrize("payload", ["not base64!", base64.b64encode(b"\x01\x02\x03").decode()])
def test_decode_rejects_what_is_not_base64_of_int32(payload):
    with pytest.raises(ValueError, match="not base64 of int32"):
        decode_routed_experts(payload, num_tokens=1, moe_layers=(True,), top_k=1)


# ---- weight-sync buckets -------------------------------------------------------------------------

def named(*sizes_in_floats: int) -> list[tuple[str, torch.Tensor]]:
    return [(f"t{i}", torch.zeros(n)) for i, n in enumerate(sizes_in_floats)]


def test_buckets_respect_the_size_bound_and_keep_order():
    tensors = named(10, 10, 10, 5, 20, 1)  # float32: 40, 40, 40, 20, 80, 4 bytes
    groups = list(buckets(tensors, bucket_bytes=100))
    assert [[n for n, _ in g] for g in groups] == [["t0", "t1"], ["t2", "t3"], ["t4", "t5"]]
    assert all(sum(t.numel() * t.element_size() for _, t in g) <= 100 for g in groups)
    assert [n for g in groups for n, _ in g] == [n for n, _ in tensors]


def test_a_tensor_bigger_than_a_bucket_travels_alone():
    groups = list(buckets(named(5, 100, 5, 5), bucket_bytes=64))
    assert [[n for n, _ in g] for g in groups] == [["t0"], ["t1"], ["t2", "t3"]]
    assert groups[1][0][1].numel() == 100


def test_no_tensors_no_buckets():
    assert list(buckets([], bucket_bytes=64)) == []


# ---- parsing of /generate answers ----------------------------------------------------------------

PROMPT = [5, 6, 7]


def answer(output_ids=(11, 12), logprobs=(-0.5, -1.25), finish="length", **meta) -> dict:
    return {"output_ids": list(output_ids),
            "meta_info": {"output_token_logprobs": [[lp, t, None] for lp, t in zip(logprobs, output_ids)],
                          "finish_reason": {"type": finish} if finish else None, "weight_version": "v3", **meta}}


@pytest.fixture
def client() -> RolloutClient:
    return RolloutClient(["http://127.0.0.1:9/"])


def test_a_good_answer_becomes_a_sample(client):
    sample = client._parse(answer(), PROMPT)
    assert sample.prompt_ids == PROMPT and sample.response_ids == [11, 12]
    assert sample.rollout_logprobs == [-0.5, -1.25]
    assert (sample.finish_reason, sample.weight_version, sample.routed_experts) == ("length", "v3", None)


@pytest.mark.parametrize("bad, message", [
    ({"output_ids": [1]}, "malformed"),
    ({"meta_info": {}, "output_ids": [1]}, "malformed"),
    ({**answer(), "output_ids": ["eleven", 12]}, "malformed"),
    ({**answer(), "meta_info": None}, "malformed"),
    (answer(finish="exploded"), "unknown finish reason 'exploded'"),
    (answer(logprobs=(-0.5,)), "2 output tokens but log-probs for 1"),
    ({**answer(), "output_ids": [11, 99]}, "or for other tokens"),
])
def test_unusable_answers_are_retryable_errors(client, bad, message):
    with pytest.raises(_BadOutput, match=message):
        client._parse(bad, PROMPT)


def test_an_aborted_answer_is_a_partial_sample_for_the_client_to_judge(client):
    """An abort is ours (a pause for a weight sync: sampled again or continued) or a failure;
    ``_sample`` tells them apart, so ``_parse`` keeps what was sampled, without routes."""
    for finish in ("abort", None):
        sample = client._parse(answer(finish=finish), PROMPT)
        assert (sample.finish_reason, sample.response_ids) == ("abort", [11, 12])


def test_pieces_sampled_across_syncs_keep_their_tokens_versions_and_log_probs():
    first = Sample(prompt_ids=PROMPT, response_ids=[11, 12], rollout_logprobs=[-0.5, -1.0], finish_reason="abort",
                   weight_version="step-3")
    empty = Sample(prompt_ids=PROMPT, response_ids=[], rollout_logprobs=[], finish_reason="abort",
                   weight_version="step-4")
    last = Sample(prompt_ids=PROMPT, response_ids=[13], rollout_logprobs=[-2.0], finish_reason="stop",
                  weight_version="step-5")
    whole = _Prefix().then(first).then(empty).then(last).finished(PROMPT, "stop")
    assert (whole.response_ids, whole.rollout_logprobs) == ([11, 12, 13], [-0.5, -1.0, -2.0])
    assert whole.weight_version == "step-3" and whole.token_versions == [(0, "step-3"), (2, "step-5")]
    alone = _Prefix().then(last).finished(PROMPT, "stop")
    assert alone.weight_version == "step-5" and alone.token_versions is None
    assert _Prefix().then(empty).then(last).finished(PROMPT, "stop").weight_version == "step-5"
    assert _Prefix().then(empty).finished(PROMPT, "length").weight_version == "step-4"
    restarted = Sample(prompt_ids=PROMPT, response_ids=[14], rollout_logprobs=[-1.5], finish_reason="stop",
                       weight_version="default")  # a server restarted with its start weights continued it
    assert _Prefix().then(first).then(restarted).finished(PROMPT, "stop").weight_version == "default"


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf, None])
def test_non_finite_logprobs_fail_without_retry(client, value):
    with pytest.raises(RolloutError, match="NaN or infinite"):
        client._parse(answer(logprobs=(-0.5, value)), PROMPT)


def test_routed_experts_are_decoded_or_their_absence_is_fatal():
    client = RolloutClient(["http://127.0.0.1:9"], routed_experts=RoutedExperts(moe_layers=(True, False), top_k=2))
    tokens = len(PROMPT) + 2 - 1
    routes = np.arange(tokens * 2 * 2, dtype=np.int32).reshape(tokens, 2, 2)
    sample = client._parse(answer(routed_experts=encode(routes)), PROMPT)
    np.testing.assert_array_equal(sample.routed_experts, routes[:, :1, :])
    with pytest.raises(RolloutError, match="--return-routed-experts"):
        client._parse(answer(), PROMPT)
    with pytest.raises(ValueError, match="expected 4 tokens"):
        client._parse(answer(routed_experts=encode(routes[:-1])), PROMPT)


# ---- seeded-sampling hash of the CPU shims -------------------------------------------------------

def _rotl(x: int, r: int) -> int:
    return ((x << r) | (x >> (32 - r))) & 0xFFFFFFFF


def _scramble(k: int) -> int:
    return (_rotl((k * 0xCC9E2D51) & 0xFFFFFFFF, 15) * 0x1B873593) & 0xFFFFFFFF


def murmur3_x86_32(data: bytes, seed: int = 0) -> int:
    """MurmurHash3_x86_32, written from the algorithm's description: 4-byte little-endian blocks,
    a tail of up to 3 bytes, the length, then the final avalanche."""
    h = seed
    whole = len(data) // 4 * 4
    for (k,) in struct.iter_unpack("<I", data[:whole]):
        h = (_rotl(h ^ _scramble(k), 13) * 5 + 0xE6546B64) & 0xFFFFFFFF
    if len(data) > whole:
        h ^= _scramble(int.from_bytes(data[whole:], "little"))
    h ^= len(data)
    h ^= h >> 16
    h = (h * 0x85EBCA6B) & 0xFFFFFFFF
    h ^= h >> 13
    h = (h * 0xC2B2AE35) & 0xFFFFFFFF
    return h ^ (h >> 16)


@pytest.mark.parametrize("data, seed, expected", [
    (b"", 0, 0),
    (b"", 1, 0x514E28B7),
    (b"", 0xFFFFFFFF, 0x81F16F39),
    (b"\0\0\0\0", 0, 0x2362F9DE),
    (b"aaaa", 0x9747B28C, 0x5A97808A),
    (b"hello", 0, 0x248BFA47),
    (b"Hello, world!", 0x9747B28C, 0x24884CBA),
    (b"The quick brown fox jumps over the lazy dog", 0x9747B28C, 0x2FA826CD),
])
def test_reference_hash_matches_published_vectors(data, seed, expected):
    assert murmur3_x86_32(data, seed) == expected


def test_shim_hash_is_murmur3_of_seed_position_column():
    seeds = [0, 1, 2**32 - 1, 2**32, 123456789012345, 2**63 - 1, 2**63 + 5, 2**64 - 1]
    positions = [0, 1, 7, 2**31, 2**32 - 1, 40000, 3, 999]
    columns = list(range(0, 40)) + [151935, 2**31 + 11, 2**32 - 1]
    # SGLang's sampler passes the seeds as uint64.
    got = cpu_shims.murmur_hash32(torch.tensor(seeds, dtype=torch.uint64), torch.tensor(positions),
                                  torch.tensor(columns))
    assert got.shape == (len(seeds), len(columns)) and got.dtype == torch.int64
    expected = [[murmur3_x86_32(struct.pack("<QII", s, p, c)) for c in columns] for s, p in zip(seeds, positions)]
    assert got.tolist() == expected
