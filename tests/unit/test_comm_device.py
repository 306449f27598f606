"""``comm_device``: the device of a collective's tensors follows the group's backend."""

import pytest
import torch
import torch.distributed as dist

from megatron_sapo.parallel import collectives
from megatron_sapo.parallel.collectives import comm_device

pytestmark = pytest.mark.unit


@pytest.fixture
def gloo_group(tmp_path):
    """A gloo group of this one process (the default group too, if none exists yet)."""
    owned = not dist.is_initialized()
    if owned:
        dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    group = dist.new_group([0], backend="gloo")
    yield group
    dist.destroy_process_group(group)
    if owned:
        dist.destroy_process_group()


def test_a_gloo_group_communicates_on_the_cpu(gloo_group):
    assert comm_device(gloo_group) == torch.device("cpu")
    total = torch.tensor([3.0], device=comm_device(gloo_group))
    dist.all_reduce(total, group=gloo_group)
    assert total.item() == 3.0
    if dist.get_backend() == "gloo":
        assert comm_device() == torch.device("cpu")  # None: the default group


@pytest.mark.parametrize("backend", ["nccl", "cpu:gloo,cuda:nccl"])
def test_an_nccl_group_communicates_on_the_current_cuda_device(monkeypatch, backend):
    monkeypatch.setattr(collectives.dist, "get_backend", lambda group=None: dist.Backend(backend))
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    assert comm_device(object()) == torch.device("cuda", 3)
