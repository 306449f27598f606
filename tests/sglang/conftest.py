"""One real SGLang server on CPU for the whole test run, serving a tiny random Qwen3-MoE.

Two tiny models with the same architecture and different weights (A, B) are saved in fp32;
the server starts on A. They have no dense layer: SGLang 0.5.23 cannot serve Qwen3-MoE dense
layers (see megatron_sapo.rollout.server.check_servable). Tests that change the served weights put A back when they finish.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from megatron_sapo.models.tiny import save_tiny_qwen3_moe
from megatron_sapo.parallel.ports import free_port
from megatron_sapo.rollout.manager import ServerManager
from megatron_sapo.rollout.server import ServerOptions

HERE = Path(__file__).parent


def pytest_collection_modifyitems(config, items):
    """Every test in this folder starts or uses a real SGLang server (a conftest's pytestmark
    would mark nothing)."""
    for item in items:
        if item.path.is_relative_to(HERE):
            item.add_marker(pytest.mark.sglang)


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("sglang_models")
    return tuple(save_tiny_qwen3_moe(root / name, seed=seed, dtype=torch.float32, mlp_only_layers=[])
                 for name, seed in (("a", 0), ("b", 1)))


@pytest.fixture(scope="session")
def server_options(tiny_models) -> ServerOptions:
    return ServerOptions(model=str(tiny_models[0]), port=free_port(), return_routed_experts=True, dtype="float32",
                         extra_args=["--skip-tokenizer-init"])


@pytest.fixture(scope="session")
def manager(server_options, tmp_path_factory):
    with ServerManager([server_options], tmp_path_factory.mktemp("sglang_logs"), startup_timeout_s=600) as mgr:
        yield mgr
