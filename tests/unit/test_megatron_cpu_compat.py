"""Guard: the CPU compatibility patches still fit the installed Megatron-Core.

Fails loudly, naming the patch and the attribute, when an upgrade moves or removes something a
patch replaces, or fixes a bug a patch works around (then the patch should be dropped).
"""

import megatron.core
import pytest

from megatron_sapo.parallel import megatron_cpu

pytestmark = pytest.mark.unit


def test_every_patch_target_exists_in_this_megatron_core():
    problems = {name: issues for name, issues in megatron_cpu.check_targets().items() if issues}
    assert not problems, f"megatron-core {megatron.core.__version__}: {problems}"


def test_patches_have_reasons_and_unique_names():
    names = [p.name for p in megatron_cpu.PATCHES]
    assert len(names) == len(set(names)) and all(p.why for p in megatron_cpu.PATCHES)


def test_missing_target_is_reported_by_name(monkeypatch):
    broken = megatron_cpu.Patch("probe", "test", ("megatron.core.transformer.utils:no_such_function",), lambda: None)
    monkeypatch.setattr(megatron_cpu, "PATCHES", (broken,))
    monkeypatch.setattr(megatron_cpu, "_applied", [])
    assert megatron_cpu.check_targets() == {"probe": ["megatron.core.transformer.utils:no_such_function"]}
