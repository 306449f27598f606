"""The virtualenv ``tools/setup_env.sh`` builds is usable on its own: a plain Python in it imports
torchvision and transformers' Qwen3 MoE classes with nothing of ours imported first (PyPI's
torchvision is a CUDA build; ``megatron_sapo/torchvision_compat.py``), and start-up stays cheap."""

import os
import subprocess
import sys
import tempfile

import pytest

pytestmark = pytest.mark.unit


def _plain_python(code: str) -> subprocess.CompletedProcess:
    """``code`` in a fresh interpreter of this venv, outside the checkout, without PYTHONPATH."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONSTARTUP")}
    with tempfile.TemporaryDirectory() as cwd:
        return subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True,
                              timeout=300)


def test_torchvision_and_qwen3_classes_import_in_a_plain_python():
    done = _plain_python("import torchvision\n"
                         "from transformers import Qwen3MoeForCausalLM, Qwen3VLMoeForConditionalGeneration\n"
                         "print('imported', torchvision.__name__)")
    assert done.returncode == 0 and "imported torchvision" in done.stdout, done.stderr[-2000:]


def test_start_up_imports_nothing_heavy():
    done = _plain_python("import sys; print(sorted(m for m in ('torch', 'torchvision', 'transformers') "
                         "if m in sys.modules))")
    assert done.returncode == 0 and done.stdout.strip() == "[]", done.stdout + done.stderr


AWK = os.path.join(os.path.dirname(__file__), "..", "..", "tools", "pip_resolver_notes.awk")
RESOLVER = ("ERROR: pip's dependency resolver does not currently take into account all the packages that are "
            "installed. This behaviour is the source of the following dependency conflicts.")


def _filtered(*lines: str) -> list[str]:
    done = subprocess.run(["awk", "-f", AWK], input="\n".join(lines) + "\n", capture_output=True, text=True,
                          check=True)
    return done.stdout.splitlines()


def test_set_up_folds_sglangs_left_out_requirements_into_one_note():
    out = _filtered("Collecting x", RESOLVER, "sglang 0.5.6 requires flashinfer_python==0.5.3, which is not installed.",
                    "sglang 0.5.6 requires torch==2.14.1, but you have torch 2.13.0 which is incompatible.", "done")
    assert out == ["Collecting x", "done", "[setup_env] note: sglang's 2 CUDA-only requirements are left out on "
                                           "purpose (README, \"First commands\")"]


def test_set_up_keeps_any_other_conflict_with_its_header():
    out = _filtered(RESOLVER, "sglang 0.5.6 requires a, which is not installed.",
                    "numpy 2.4.0 requires python>=3.12, but you have python 3.11 which is incompatible.")
    assert out[:2] == [RESOLVER, "numpy 2.4.0 requires python>=3.12, but you have python 3.11 which is incompatible."]
    assert "sglang's 1 CUDA-only requirements" in out[2] and len(out) == 3
