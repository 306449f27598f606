"""An example reward plugin (``data.reward = "examples/my_data/boxed_reward.py:boxed_math"``).

Scores 1 when the last ``\\boxed{...}`` of the response equals the row's answer as a number or
fraction (the built-in "math" reward's comparison), and reports two extras: whether the answer
was boxed at all (``reward_boxed_mean``) and the problem's level (``reward_level_mean``, from the
row's ``level`` field), so a run's log shows format and difficulty beside the score.
"""

from megatron_sapo.data.math_answers import extract_final_answer, math_reward


def boxed_math(response: str, answer: str | None, fields: dict) -> dict:
    return {"score": math_reward(response, answer),
            "boxed": float("\\boxed" in response and extract_final_answer(response) is not None),
            "level": float(fields.get("level", 0))}
