"""pass@k against its closed form C(n-c, k) / C(n, k) with math.comb, the set metrics, and the
model folder `megatron-sapo eval` serves."""

from __future__ import annotations

from math import comb

import pytest
import torch
from safetensors.torch import save_file

from megatron_sapo.algo.evaluation import pass_at_k, sample_set_metrics
from megatron_sapo.errors import InputError


@pytest.mark.parametrize("n", [1, 2, 5, 8, 16])
def test_pass_at_k_is_the_closed_form(n):
    for c in range(n + 1):
        for k in range(1, n + 1):
            expected = 1 - comb(n - c, k) / comb(n, k)
            assert pass_at_k(n, c, k) == pytest.approx(expected, abs=1e-12), (n, c, k)
    assert pass_at_k(n, 0, 1) == 0.0 and pass_at_k(n, n, n) == 1.0


def test_pass_at_1_is_the_fraction_correct_and_bad_counts_are_refused():
    assert pass_at_k(8, 3, 1) == pytest.approx(3 / 8)
    with pytest.raises(ValueError, match="0 <= c <= n and 1 <= k <= n"):
        pass_at_k(4, 5, 1)
    with pytest.raises(ValueError, match="0 <= c <= n and 1 <= k <= n"):
        pass_at_k(4, 1, 5)


def test_set_metrics_report_avg_and_pass_at_powers_of_two_and_at_n():
    scores = [[1.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0], [1.0, 1.0, 0.0, 1.0]]
    metrics = sample_set_metrics("toy", scores)
    assert metrics["eval_toy_avg_at_4"] == pytest.approx(4 / 12)
    assert metrics["eval_toy_pass_at_1"] == pytest.approx((1 / 4 + 0 + 3 / 4) / 3)
    assert metrics["eval_toy_pass_at_2"] == pytest.approx((1 - comb(3, 2) / comb(4, 2) + 0 + 1) / 3)
    assert metrics["eval_toy_pass_at_4"] == pytest.approx(2 / 3)
    assert set(metrics) == {"eval_toy_avg_at_4", "eval_toy_problems", "eval_toy_pass_at_1", "eval_toy_pass_at_2",
                            "eval_toy_pass_at_4"}


def test_eval_serves_an_hf_folder_as_it_is_and_names_a_folder_that_is_neither(tmp_path):
    from megatron_sapo.eval_command import served_model

    hf = tmp_path / "hf_model"
    hf.mkdir()
    (hf / "config.json").write_text("{}")
    save_file({"w": torch.zeros(2)}, hf / "model.safetensors")
    assert served_model(hf, tmp_path / "out", cfg=None) == hf  # no conversion, no copy
    (hf / "model.safetensors").write_bytes((hf / "model.safetensors").read_bytes()[:20])
    with pytest.raises(InputError, match="model.safetensors"):  # its header is checked first
        served_model(hf, tmp_path / "out", cfg=None)
    empty = tmp_path / "nothing_here"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="nothing_here: neither an HF folder"):
        served_model(empty, tmp_path / "out", cfg=None)
    assert not (tmp_path / "out" / "hf").exists()


def test_pass_at_n_is_reported_when_n_is_not_a_power_of_two():
    metrics = sample_set_metrics("six", [[0.0] * 5 + [1.0], [0.0] * 6])
    assert sorted(k for k in metrics if "pass_at" in k) == [f"eval_six_pass_at_{k}" for k in (1, 2, 4, 6)]
    assert metrics["eval_six_pass_at_6"] == pytest.approx(0.5)  # one problem of two solved by some response
