"""The built-in verifiable tasks of the CPU demo: generated from a seed, no files.

A tiny random model has to learn the task within minutes on a CPU, and the RL phase has to
improve on what a short supervised cold start left, so:

* answers are short: at most 3 characters then EOS (4 tokens under the character tokenizer;
  "tiny-reverse-long" below goes to 6);
* difficulty is graded within one format (2 or 3 digits; one digit or two plus one), so a
  partly trained model has a reward between 0 and 1 rather than all or nothing;
* the skill is a rule shared by all problems, so a policy-gradient step on some prompts helps
  the others: "tiny-reverse" (reverse 2 or 3 digits: "rev 407=" -> "704"). Measured on the
  tiny Qwen3-MoE with transformers (cold start: batches of 64 "sft" pairs, Adam lr 1e-3; RL: a
  plain group-normalised policy gradient, 16 prompts x 8 samples, 4 updates per batch, fresh
  Adam lr 3e-4): after 110-160 cold-start steps the sampled reward on "train" prompts was
  0.09-0.49, and 40 RL steps raised it by 0.20-0.22 (two model seeds). "tiny-add" (a
  two-digit plus a one-digit number) needs addition facts that do not follow from one another;
  the same recipe left it near 0.05 (0.04 -> 0.07), so it serves tests and experiments, not
  the demo.

"tiny-reverse-long" is the same rule on 3 to 6 digits (answers of 4-7 tokens with EOS), for the
CPU stress regime (``examples/stress_cpu``): longer answers hold more tokens whose ratios can
drift within one response. Measured the same way with the stress model (16 experts, top-2) and
160 cold-start steps, the sampled reward on "train" prompts was 0.29, 0.43 and 0.35 (model
seeds 0, 1, 2; 0.07 after 130 steps, 0.60 after 200), falling with the width (seed 0: 0.40,
0.35, 0.26, 0.15 for 3, 4, 5, 6 digits).

The image tasks (a vision-language model counting squares) live in ``synthetic_vl``; both
are found by ``data.tasks.get_task``.

Each task's problem set is finite and enumerated; a seeded shuffle splits it into three
disjoint parts: "val" (evaluation), "sft" (worked pairs for the cold start) and "train" (the
RL prompts). Keeping the cold-start problems out of the RL prompts means the reward the RL run
starts from is what the cold start generalised, not what it memorised. The "sft" records become
token pairs with ``chat.encode_sft_examples``. Both tasks are scored by the registry's
"exact_match": the stripped response must equal the answer.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Callable, ClassVar, Literal

from megatron_sapo.data.records import PromptRecord


Split = Literal["train", "val", "sft"]
SPLITS: tuple[str, ...] = ("train", "val", "sft")


def reversal_problems() -> list[tuple[str, str]]:
    """("rev 407=", "704") for every string of 2 or 3 digits (1100 problems)."""
    digits = [str(n).zfill(width) for width in (2, 3) for n in range(10**width)]
    return [(f"rev {d}=", d[::-1]) for d in digits]


LONG_REVERSAL_WIDTHS: tuple[int, ...] = (3, 4, 5, 6)
LONG_REVERSAL_PER_WIDTH = 1000


def long_reversal_problems() -> list[tuple[str, str]]:
    """("rev 40719=", "91704") for 1000 strings of each width 3, 4, 5 and 6 (4000 problems):
    every 3-digit string, and 1000 of each longer width drawn by a generator seeded with the
    width, so the set is the same everywhere."""
    problems = []
    for width in LONG_REVERSAL_WIDTHS:
        numbers = random.Random(width).sample(range(10**width), LONG_REVERSAL_PER_WIDTH)
        problems += [(f"rev {d}=", d[::-1]) for d in (str(n).zfill(width) for n in sorted(numbers))]
    return problems


def addition_problems() -> list[tuple[str, str]]:
    """("47+5=", "52") for a in 0..99 and b in 0..9 (1000 problems, 10% one digit each, about
    half of the rest with a carry)."""
    return [(f"{a}+{b}=", str(a + b)) for a in range(100) for b in range(10)]


@dataclass(frozen=True)
class SyntheticTask:
    """A finite, enumerated problem set split three ways by a seeded shuffle."""

    name: str
    enumerate_problems: Callable[[], list[tuple[str, str]]]
    """All (prompt, answer) pairs, in a fixed order."""
    val_fraction: float = 0.2
    """Share of the problems held out for evaluation."""
    sft_fraction: float = 0.2
    """Share of the problems used only for the supervised cold start."""
    reward: str = "exact_match"
    """Registry name of the task's verifier."""
    has_images: ClassVar[bool] = False

    def split_problems(self, split: Split, seed: int) -> list[tuple[str, str]]:
        """The problems of one split, in a seeded order; the three splits never overlap."""
        return split_items(self.enumerate_problems(), split, seed, self.val_fraction, self.sft_fraction, self.name)

    def records(self, split: Split, seed: int) -> list[PromptRecord]:
        return [PromptRecord(index=i, prompt=prompt, answer=answer, source=f"{self.name}[{split}] {prompt}")
                for i, (prompt, answer) in enumerate(self.split_problems(split, seed))]


def split_items(items: list, split: Split, seed: int, val_fraction: float, sft_fraction: float,
                task_name: str) -> list:
    """One split of a task's enumerated problems: a seeded shuffle cut into val, sft, train."""
    if split not in SPLITS:
        raise ValueError(f"task {task_name!r} has splits {', '.join(SPLITS)}, not {split!r}")
    items = list(items)
    random.Random(seed).shuffle(items)
    n_val = round(len(items) * val_fraction)
    n_sft = round(len(items) * sft_fraction)
    bounds = {"val": (0, n_val), "sft": (n_val, n_val + n_sft), "train": (n_val + n_sft, len(items))}
    start, end = bounds[split]
    return items[start:end]


TASKS: dict[str, SyntheticTask] = {
    task.name: task for task in (
        SyntheticTask("tiny-reverse", reversal_problems),
        SyntheticTask("tiny-add", addition_problems),
        SyntheticTask("tiny-reverse-long", long_reversal_problems),
    )
}
