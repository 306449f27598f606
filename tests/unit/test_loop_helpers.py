"""The RL step's small helpers (megatron_sapo/loop.py): a replica's minibatches at DP=2, metric
means over minibatches, per-sample sampling seeds, which groups dynamic sampling keeps, and the
report of the first failed reward call."""

from types import SimpleNamespace

import pytest
import torch

from megatron_sapo.data.rewards import RewardScores
from megatron_sapo.loop import has_spread, mean_metrics, minibatches, report_reward_failure, sample_seed
from megatron_sapo.plan.measure import random_batch
from megatron_sapo.training.shard import assign_rows
from megatron_sapo.types import Group, Prompt, Sample

pytestmark = pytest.mark.unit


@pytest.mark.parametrize("balance", [False, True])
def test_each_replica_trains_its_share_of_each_minibatch_at_dp2(balance):
    lengths = [5, 17, 3, 9, 12, 4, 8, 15, 6, 11, 7, 10]  # 12 rows: 3 minibatches of 4, 2 per replica
    shares = assign_rows(lengths, minibatches=3, dp_size=2, balance=balance)
    trained = [[set() for _ in range(3)] for _ in range(2)]
    for replica, share in enumerate(shares):
        rows = [row for minibatch in share for row in minibatch]
        batch = random_batch([lengths[row] for row in rows], vocab=50, seed=replica)
        batch.tokens[:, 0] = torch.tensor(rows)  # each row says which row of the step it is
        for m, part in enumerate(minibatches(batch, [len(minibatch) for minibatch in share])):
            trained[replica][m] = set(part.tokens[:, 0].tolist())
            assert part.lengths.tolist() == [lengths[row] for row in sorted(trained[replica][m], key=rows.index)]
    for m in range(3):
        assert trained[0][m] | trained[1][m] == set(range(4 * m, 4 * m + 4))  # minibatch m, split
        assert not trained[0][m] & trained[1][m]
        if not balance:  # equal consecutive shares; balanced ones follow the tokens
            assert sorted(trained[0][m]) == [4 * m, 4 * m + 1] and sorted(trained[1][m]) == [4 * m + 2, 4 * m + 3]


def test_mean_metrics_average_each_key_over_the_minibatches_that_have_it():
    means = mean_metrics([{"loss": 1.0, "clip_frac_low": 0.2}, {"loss": 3.0}, {"loss": 2.0, "clip_frac_low": 0.4}])
    assert means == {"loss": pytest.approx(2.0), "clip_frac_low": pytest.approx(0.3)}


def test_sample_seeds_are_reproducible_distinct_and_unset_without_a_base():
    assert sample_seed(None, 1, 0, 0) is None
    assert sample_seed(1234, 3, 5, 7) == sample_seed(1234, 3, 5, 7)
    seeds = {sample_seed(1234, step, prompt, sample) for step in range(4) for prompt in range(8) for sample in range(8)}
    assert len(seeds) == 4 * 8 * 8 and all(0 <= s < 2**62 for s in seeds)
    assert sample_seed(1235, 0, 0, 0) != sample_seed(1234, 0, 0, 0)


def test_the_soft_overlong_penalty_grows_linearly_over_its_buffer():
    """DAPO: 0 up to max_new_tokens - buffer, then (excess / buffer) x penalty, the whole penalty
    at max_new_tokens; off with a buffer of 0."""
    from megatron_sapo.config import ConfigError, RolloutConfig
    from megatron_sapo.loop import overlong_penalty

    cfg = RolloutConfig(max_new_tokens=16, overlong_buffer=4, overlong_penalty=0.5)
    assert [overlong_penalty(n, cfg) for n in (1, 12, 13, 14, 16)] == [0.0, 0.0, 0.125, 0.25, 0.5]
    assert overlong_penalty(16, RolloutConfig(max_new_tokens=16)) == 0.0
    with pytest.raises(ConfigError, match="rollout.overlong_buffer = 16 must be below rollout.max_new_tokens = 16"):
        RolloutConfig(max_new_tokens=16, overlong_buffer=16)


def test_fillers_and_under_mask_truncated_cut_responses_leave_the_loss():
    from megatron_sapo.loop import out_of_loss
    from megatron_sapo.types import Sample

    def sample(finish, in_loss=True):
        return Sample(prompt_ids=[1], response_ids=[2], rollout_logprobs=[-1.0], finish_reason=finish, in_loss=in_loss)

    samples = [sample("stop"), sample("length"), sample("stop", in_loss=False), sample("length", in_loss=False)]
    assert out_of_loss(samples, mask_truncated=False).tolist() == [False, False, True, True]
    assert out_of_loss(samples, mask_truncated=True).tolist() == [False, True, True, True]


def test_dynamic_sampling_keeps_groups_whose_rewards_differ():
    def group(*rewards):
        samples = [Sample(prompt_ids=[1], response_ids=[2], rollout_logprobs=[0.0], finish_reason="stop", reward=r)
                   for r in rewards]
        return Group(prompt=Prompt(index=0, prompt_ids=[1]), samples=samples)

    assert has_spread(group(0.0, 1.0, 1.0)) and has_spread(group(0.2, 0.25))
    assert not has_spread(group(1.0, 1.0, 1.0)) and not has_spread(group(0.0, 0.0))
    with pytest.raises(ValueError, match="samples \\[1\\] have no reward yet"):
        has_spread(group(1.0, None))


def test_the_first_failed_reward_call_is_reported_once_on_stderr_and_in_the_run_folder(tmp_path, capsys):
    rollout = SimpleNamespace(reward_failure_reported=False, scorer=SimpleNamespace(name="mine.py:f"))
    run = SimpleNamespace(step=3, out_dir=tmp_path, rollout=rollout)
    report_reward_failure(run, RewardScores(scores=[1.0], errors=0))
    assert not (tmp_path / "logs").exists() and capsys.readouterr().err == ""
    report_reward_failure(run, RewardScores(scores=[0.0], errors=1, first_error="Traceback ...\nZeroDivisionError"))
    written = (tmp_path / "logs" / "reward_failure.txt").read_text()
    assert written.startswith("step 3: a call of the reward function mine.py:f failed and scored 0")
    assert "ZeroDivisionError" in written and written.strip() == capsys.readouterr().err.strip()
    run.step = 4
    report_reward_failure(run, RewardScores(scores=[0.0], errors=1, first_error="Traceback ...\nKeyError"))
    assert capsys.readouterr().err == "" and "step 3" in (tmp_path / "logs" / "reward_failure.txt").read_text()
