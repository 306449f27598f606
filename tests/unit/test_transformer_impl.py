"""The one decision of the Megatron layer spec: ``models.use_transformer_engine``.

What the machine has (a CUDA device, the transformer_engine package, whether it imports) is
simulated, so every branch runs on a CPU machine; the last test checks this machine itself.
"""

import importlib
import importlib.util

import pytest
import torch

from megatron_sapo.config import ConfigError
from megatron_sapo.models import use_transformer_engine

pytestmark = pytest.mark.unit

NO_CUDA = "no CUDA device is available"
NOT_INSTALLED = "the transformer_engine package is not installed"


@pytest.fixture
def machine(monkeypatch):
    """``machine(cuda=..., installed=..., import_error=...)`` makes this process see that machine."""

    def simulate(cuda: bool, installed: bool, import_error: Exception | None = None):
        find_spec, import_module = importlib.util.find_spec, importlib.import_module

        def fake_find_spec(name, *args):
            if name == "transformer_engine":
                return object() if installed else None
            return find_spec(name, *args)

        def fake_import(name, *args):
            if name.startswith("transformer_engine"):
                if import_error is not None:
                    raise import_error
                return None
            return import_module(name, *args)

        monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
        monkeypatch.setattr(importlib.util, "find_spec", fake_find_spec)
        monkeypatch.setattr(importlib, "import_module", fake_import)

    return simulate


def test_local_never_and_auto_only_where_cuda_and_the_package_are(machine):
    for cuda, installed in ((False, False), (False, True), (True, False)):
        machine(cuda=cuda, installed=installed)
        assert use_transformer_engine("auto") is False
        assert use_transformer_engine("local") is False
    machine(cuda=True, installed=True)
    assert use_transformer_engine("auto") is True
    assert use_transformer_engine("local") is False
    assert use_transformer_engine("transformer_engine") is True


@pytest.mark.parametrize("cuda, installed, missing", [
    (False, True, NO_CUDA),
    (True, False, NOT_INSTALLED),
    (False, False, f"{NO_CUDA} and {NOT_INSTALLED}"),
])
def test_forcing_transformer_engine_names_what_is_missing(machine, cuda, installed, missing):
    machine(cuda=cuda, installed=installed)
    with pytest.raises(ConfigError) as excinfo:
        use_transformer_engine("transformer_engine")
    assert str(excinfo.value) == f'model.transformer_impl = "transformer_engine", but {missing}'


def test_a_package_that_does_not_import_is_missing_too(machine):
    machine(cuda=True, installed=True, import_error=ImportError("libcudart.so.12: cannot open shared object file"))
    assert use_transformer_engine("auto") is False
    with pytest.raises(ConfigError, match=r"^--transformer-impl = .*does not import \(libcudart.so.12"):
        use_transformer_engine("transformer_engine", key="--transformer-impl")


def test_unknown_values_name_the_key():
    with pytest.raises(ConfigError, match="model.transformer_impl must be one of auto, local, transformer_engine"):
        use_transformer_engine("te")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU machine's resolution")
def test_auto_builds_the_local_spec_on_this_cpu_machine():
    assert use_transformer_engine("auto") is False
    with pytest.raises(ConfigError, match=NO_CUDA):
        use_transformer_engine("transformer_engine")
