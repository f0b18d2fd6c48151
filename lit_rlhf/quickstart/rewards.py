"""Rule-based rewards for PPO: plain Python callables named in YAML as ``reward: {fn: "module:function"}``.

A reward function takes the prompt texts and the decoded responses (special tokens removed, cut after the
first EOS) and returns one score per response, as a list of floats or a tensor ``[B]``. The scores then go
through the same shaping as reward-model scores (optional normalisation, clipping, missing-EOS penalty).
"""

from __future__ import annotations

from collections.abc import Sequence

from lit_rlhf.quickstart.task import gold_scores


def vader_reward(prompts: Sequence[str], responses: Sequence[str]) -> list[float]:
    """The quickstart's gold judge as a reward: VADER compound sentiment of each response, in ``[-1, 1]``.

    Optimising the judge itself is only a smoke test of PPO (there is nothing to over-optimise against);
    the quickstart proper optimises the learned reward model and uses VADER to evaluate.
    """
    return gold_scores(prompts, responses)
