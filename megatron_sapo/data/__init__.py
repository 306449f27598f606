"""Prompts and verifiers: what the policy is asked, and how its answers are scored.

- ``records``: one problem as read from a file or generated (prompt text or messages, answer);
- ``datasets``: JSONL / parquet prompt files, and the seeded data-parallel prompt order;
- ``chat``: prompts (and supervised cold-start pairs) through the tokenizer's chat template;
- ``rewards``, ``math_answers``: the reward registry, the math verifier, scoring with timeouts;
- ``synthetic``: the built-in verifiable tasks of the CPU demo, split into val / sft / train;
- ``tiny_tokenizer``: the character tokenizer saved beside the tiny demo model.

``records``, ``rewards``, ``math_answers`` and ``synthetic`` are plain Python, because loading a
config checks task and reward names against them; transformers and pyarrow are imported only
where used.
"""
