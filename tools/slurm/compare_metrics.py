"""Check a run that was interrupted (server killed, requeued, resumed) against the same run
uninterrupted: ``metrics.jsonl`` of the interrupted one holds steps 1..STEPS once each, and
every step's learning metrics equal the uninterrupted run's exactly (seeded sampling,
deterministic CPU kernels: a resumed or re-sampled step recomputes the same numbers).

    python tools/slurm/compare_metrics.py STRAIGHT/metrics.jsonl INTERRUPTED/metrics.jsonl --steps 4
"""

from __future__ import annotations

import argparse
import json
import sys

# What a step learned and from what. Timings, retries and re-samplings legitimately differ, and
# so does the train/rollout log-prob mismatch (by about 1e-7 in fp32): the server's own
# log-probs depend on how it batched the requests, which a restart changes; the responses and
# everything the trainer computes from them do not.
LEARNING_KEYS = ("reward_mean", "reward_std", "loss", "grad_norm", "lr", "entropy", "gate_mean", "kl_old",
                 "response_length_mean")


def rows(path: str) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def differences(straight: list[dict], interrupted: list[dict], steps: int) -> list[str]:
    found = [r["step"] for r in interrupted]
    if found != list(range(1, steps + 1)):
        return [f"the interrupted run's metrics.jsonl has steps {found}, expected 1..{steps} once each"]
    if [r["step"] for r in straight] != found:
        return [f"the straight run's metrics.jsonl has steps {[r['step'] for r in straight]}"]
    problems = []
    for ours, theirs in zip(interrupted, straight):
        for key in LEARNING_KEYS:
            if key in theirs and ours.get(key) != theirs[key]:
                problems.append(f"step {ours['step']}: {key} = {ours.get(key)!r}, uninterrupted {theirs[key]!r}")
    return problems


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("straight")
    parser.add_argument("interrupted")
    parser.add_argument("--steps", type=int, required=True)
    args = parser.parse_args()
    problems = differences(rows(args.straight), rows(args.interrupted), args.steps)
    for problem in problems:
        print(problem, file=sys.stderr)
    if not problems:
        print(f"steps 1..{args.steps}: {', '.join(LEARNING_KEYS)} equal the uninterrupted run's")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
