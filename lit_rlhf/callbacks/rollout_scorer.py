"""Score PPO's training rollouts with a second judge the policy never optimises (e.g. a gold scorer)."""

from __future__ import annotations

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback

from lit_rlhf.imports import RewardFn, call_reward_fn, import_callable


class RolloutScorer(Callback):
    """Log ``<name>/score``: the mean of ``reward_fn``'s scores over each PPO iteration's rollouts.

    Comparing it with ``objective/score`` (the reward model the policy optimises) shows reward hacking: the
    RM score keeps rising while the held-out judge's score stalls or falls. The quickstart uses VADER, the
    gold judge its labels came from.

    Args:
        reward_fn: ``package.module:function`` (or the callable) of a reward function, called as PPO calls
            ``reward.fn`` (docs/conventions.md#reward-functions).
        name: metric prefix.
    """

    def __init__(self, reward_fn: str | RewardFn, name: str = "gold") -> None:
        self.reward_fn = import_callable(reward_fn) if isinstance(reward_fn, str) else reward_fn
        self.name = name

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx) -> None:
        if not isinstance(outputs, dict) or outputs.get("responses") is None:
            return
        scores = torch.tensor(
            call_reward_fn(
                self.reward_fn,
                outputs["prompts"],
                outputs["responses"],
                messages=outputs.get("prompt_messages"),
                columns=outputs.get("prompt_columns"),
            ),
            dtype=torch.float32,
        )
        pl_module.log(
            f"{self.name}/score",
            scores.mean().to(pl_module.device),
            batch_size=len(scores),
            sync_dist=trainer.world_size > 1,
        )
