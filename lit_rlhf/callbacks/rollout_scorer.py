"""Score PPO's training rollouts with a second judge the policy never optimises (e.g. a gold scorer)."""

from __future__ import annotations

import lightning as L
from lightning.pytorch.callbacks import Callback

from lit_rlhf.hf.scorers import Scorer, load_scorer
from lit_rlhf.hf.specs import ModelSpec
from lit_rlhf.imports import RewardFn


class RolloutScorer(Callback):
    """Log ``<name>/score``: the mean of a held-out judge's scores over each PPO iteration's rollouts.

    Comparing it with ``objective/score`` (the reward model the policy optimises) shows reward hacking: the
    RM score keeps rising while the held-out judge's score stalls or falls. The quickstart uses VADER, the
    gold judge its labels came from.

    Args:
        reward_fn: ``package.module:function`` (or the callable) of a reward function, called as PPO calls
            ``reward.fn`` (docs/conventions.md#reward-functions), or any :class:`~lit_rlhf.hf.scoring.Scorer`.
        name: metric prefix.
        reward_model: or a reward model (its spec, folder or hub id) as the judge, loaded frozen with its own
            tokenizer (:func:`~lit_rlhf.hf.scorers.load_scorer`), scoring the response texts.
    """

    def __init__(
        self,
        reward_fn: str | RewardFn | Scorer | None = None,
        name: str = "gold",
        reward_model: ModelSpec | str | None = None,
    ) -> None:
        self.scorer = load_scorer(reward_model, reward_fn)
        self.name = name

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx) -> None:
        if not isinstance(outputs, dict) or outputs.get("responses") is None:
            return
        scores = self.scorer.score_texts(
            outputs["prompts"],
            outputs["responses"],
            messages=outputs.get("prompt_messages"),
            columns=outputs.get("prompt_columns"),
        )
        pl_module.log(
            f"{self.name}/score",
            scores.float().mean().to(pl_module.device),
            batch_size=len(scores),
            sync_dist=trainer.world_size > 1,
        )
