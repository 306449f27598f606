"""The installed console script, run as a user would."""

import shutil
import subprocess

import pytest

pytestmark = pytest.mark.slow

SCRIPT = shutil.which("megatron-sapo")


@pytest.fixture(scope="module")
def script():
    if SCRIPT is None:
        pytest.fail("the megatron-sapo console script is not on PATH; run tools/setup_env.sh")
    return SCRIPT


def test_help_lists_subcommands(script):
    out = subprocess.run([script, "--help"], capture_output=True, text=True, check=True).stdout
    assert "selfcheck" in out


def test_selfcheck_passes(script):
    proc = subprocess.run([script, "selfcheck"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "6 passed, 0 failed" in proc.stdout
