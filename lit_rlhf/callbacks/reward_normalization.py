"""Post-hoc reward-model normalisation (InstructGPT §3.5, Stiennon et al., Ziegler et al.;
docs/conventions.md#reward-normalisation).

The ranking loss is invariant to a shift of the rewards (and says little about their scale), so after RM
training the offset is arbitrary. InstructGPT: "we normalize the reward model using a bias so that the
labeler demonstrations achieve a mean score of 0 before doing RL". Ziegler et al. also rescale to std 1.
The fitted ``(bias, scale)`` is stored in the model's config (:func:`~lit_rlhf.hf.scoring.
set_reward_normalization`), so checkpoints, the HF export and every reader of
:func:`~lit_rlhf.hf.scoring.sequence_scores` (PPO included) get ``(raw − bias) / scale``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info
from torch import nn

from lit_rlhf.callbacks.export import HFExport
from lit_rlhf.datamodules.base import Row, read_rows
from lit_rlhf.datamodules.formats import Columns, demonstration_of
from lit_rlhf.hf.scoring import sequence_scores, set_reward_normalization
from lit_rlhf.hf.sharding import forwards_of_the_busiest
from lit_rlhf.hf.tokenization import reward_chat_ids, reward_text_ids
from lit_rlhf.rlhf.padding import pad_batch


def normalization_from_moments(count: float, total: float, total_sq: float, scale: bool) -> tuple[float, float]:
    """``(bias, scale)`` from ``n, Σr, Σr²``: bias = mean; scale = population std (OpenAI 2019) or 1."""
    if count <= 0:
        raise ValueError("reward normalisation needs at least one reference score")
    mean = total / count
    if not scale:
        return mean, 1.0
    std = max(total_sq / count - mean**2, 0.0) ** 0.5
    if std <= 0:
        raise ValueError("the reference scores are all equal: their std is 0, the scale cannot be fitted")
    return mean, std


@torch.no_grad()
def score_moments(
    model: nn.Module,
    pad_token_id: int,
    sequences: Sequence[Sequence[int]],
    batch_size: int,
    min_batches: int = 0,
    filler: Sequence[Sequence[int]] = (),
) -> torch.Tensor:
    """``[n, Σr, Σr²]`` (float64) of the **raw** scores of token-id ``sequences``, scored in right-padded batches.

    ``min_batches``: run at least this many forwards, the extra ones on ``filler`` (or ``sequences``) and left out
    of the moments: under FSDP every process must run as many forwards as the busiest one (each forward gathers
    the sharded weights with the others)."""
    device = next(model.parameters()).device
    moments = torch.zeros(3, dtype=torch.float64, device=device)
    was_training = model.training
    model.eval()
    try:
        batches = max(math.ceil(len(sequences) / batch_size), min_batches)
        for b in range(batches):
            chunk = sequences[b * batch_size : (b + 1) * batch_size]
            counted = bool(chunk)
            if not counted:  # a forward only to keep step with the other processes
                chunk = list(filler or sequences)[:batch_size]
            input_ids, attention_mask = pad_batch(chunk, pad_token_id)
            raw = sequence_scores(model, input_ids.to(device), attention_mask.to(device), normalize=False).double()
            if counted:
                moments += torch.stack(
                    [torch.tensor(float(len(chunk)), dtype=torch.float64, device=device), raw.sum(), (raw**2).sum()]
                )
    finally:
        model.train(was_training)
    return moments


def fit_reward_normalization(
    module_or_model: nn.Module,
    tokenizer,
    prompts: Sequence[str],
    responses: Sequence[str],
    batch_size: int = 32,
    scale: bool = False,
) -> tuple[float, float]:
    """Score reference ``prompts``/``responses`` and store ``(bias, scale)`` so they score mean 0 (std 1).

    Args:
        module_or_model: a :class:`~lit_rlhf.models.RewardModule` (its ``model``) or a reward model.
        tokenizer: the model's tokenizer; sequences are built as in RM training
            (:func:`~lit_rlhf.hf.tokenization.reward_text_ids`: ``prompt + response + EOS``, or an encoder's pair).
        prompts: reference prompts (InstructGPT: those of the SFT demonstrations).
        responses: reference responses (the demonstrations).
        batch_size: sequences per forward pass.
        scale: also divide by the population std (Ziegler et al.), not only subtract the mean.

    Returns:
        The stored ``(bias, scale)``.
    """
    if len(prompts) != len(responses):
        raise ValueError(f"got {len(prompts)} prompts but {len(responses)} responses")
    model = module_or_model.model if isinstance(module_or_model, L.LightningModule) else module_or_model
    sequences = [reward_text_ids(tokenizer, p, r) for p, r in zip(prompts, responses)]
    count, total, total_sq = score_moments(model, tokenizer.pad_token_id, sequences, batch_size).tolist()
    bias, std = normalization_from_moments(count, total, total_sq, scale)
    set_reward_normalization(model, bias, std)
    return bias, std


class RewardNormalization(Callback):
    """At the end of ``fit``, normalise the reward model on a reference set (default: SFT demonstrations).

    **Order with HFExport.** Both act in ``on_train_end``; the export must see the fitted bias. This
    callback therefore moves itself before the first :class:`~lit_rlhf.callbacks.HFExport` of the
    Trainer's callback list in ``setup`` (and says so), so the YAML order does not matter. It also
    re-saves the ``last`` checkpoint of each ``ModelCheckpoint`` (``update_last_checkpoint``), which was
    written before training ended, so ``--ckpt_path .../last.ckpt`` carries the normalisation too.

    **In PPO** the running normalisation of scores is the module's own setting, ``reward.normalize`` (with
    ``reward.clip``): this callback refuses a :class:`~lit_rlhf.models.PPOModule` rather than rewrite its
    configuration behind the user's back.

    **Distributed.** Each process scores every ``world_size``-th reference row; the sums ``n, Σr, Σr²`` are
    all-reduced, so every rank stores the same ``(bias, scale)`` (exact, no gather of scores needed). The
    model is called directly (outside DDP), which is fine for DDP but not for sharded strategies (FSDP).

    Args:
        reference_data: file, ``save_to_disk`` folder or hub dataset of reference demonstrations: prompt-completion
            rows, standard or conversational, or chat ``messages`` whose last turn is the assistant's (SFT's
            formats that hold a demonstration, docs/data.md). Required for a reward model.
        prompt_column: prompt column of ``reference_data``.
        completion_column: response column of ``reference_data``.
        messages_column: chat column of ``reference_data``.
        reference_split: split of a hub dataset ``reference_data``.
        scale: also rescale to std 1 (Ziegler et al.; InstructGPT only shifts).
        max_samples: score only the first ``max_samples`` rows (OpenAI 2019 used 256); ``None`` = all.
        batch_size: sequences per forward pass.
        update_last_checkpoint: re-save each ``ModelCheckpoint``'s last checkpoint after normalising.
    """

    def __init__(
        self,
        reference_data: str | None = None,
        prompt_column: str = "prompt",
        completion_column: str = "completion",
        messages_column: str = "messages",
        reference_split: str = "train",
        scale: bool = False,
        max_samples: int | None = None,
        batch_size: int = 32,
        update_last_checkpoint: bool = True,
    ) -> None:
        self.reference_data = reference_data
        self.prompt_column = prompt_column
        self.completion_column = completion_column
        self.messages_column = messages_column
        self.reference_split = reference_split
        self.scale = scale
        self.max_samples = max_samples
        self.batch_size = batch_size
        self.update_last_checkpoint = update_last_checkpoint
        self.bias: float | None = None
        self.std: float | None = None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        from lit_rlhf.models.ppo import PPOModule

        if isinstance(pl_module, PPOModule):
            raise ValueError(
                "RewardNormalization normalises a reward model after its training; for PPO's running score "
                "normalisation set `model.init_args.reward.normalize: true` (and `reward.clip`) instead."
            )
        if self.reference_data is None:
            raise ValueError("RewardNormalization of a reward model needs `reference_data` (e.g. the SFT data)")
        if not hasattr(pl_module, "model") or not hasattr(pl_module, "tokenizer"):
            raise TypeError(f"RewardNormalization needs a reward module, got {type(pl_module).__name__}")
        callbacks = trainer.callbacks
        exports = [i for i, cb in enumerate(callbacks) if isinstance(cb, HFExport)]
        if exports and exports[0] < callbacks.index(self):
            callbacks.remove(self)
            callbacks.insert(exports[0], self)
            rank_zero_info("RewardNormalization moved before HFExport so the export carries the normalisation.")

    def reference_sequences(self, tokenizer) -> list[list[int]]:
        """Token ids of the reference rows, built like the RM's training sequences."""
        rows = read_rows(self.reference_data, self.reference_split)[: self.max_samples]
        return [self._sequence(tokenizer, row) for row in rows]

    def _sequence(self, tokenizer, row: Row) -> list[int]:
        """A reference row's demonstration (:func:`~lit_rlhf.datamodules.formats.demonstration_of`: a
        prompt-completion row, standard or conversational, a ``messages`` conversation ending with the
        assistant's answer, or a ``{prompt, response}`` pair as ``reward.normalize_on`` reads) as the RM reads it."""
        columns = Columns(prompt=self.prompt_column, completion=self.completion_column, messages=self.messages_column)
        prompt, response = demonstration_of(row, columns, response_column="response")
        if isinstance(response, list):
            return reward_chat_ids(tokenizer, prompt, response)
        return reward_text_ids(tokenizer, prompt, response)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.interrupted or self.reference_data is None:
            return
        sequences = self.reference_sequences(pl_module.tokenizer)
        shard = sequences[trainer.global_rank :: trainer.world_size]
        # every process runs as many forwards as the busiest (a sharded model gathers its weights in each one)
        batches = forwards_of_the_busiest(trainer, math.ceil(len(shard) / self.batch_size), pl_module.device)
        moments = score_moments(
            pl_module.model, pl_module.tokenizer.pad_token_id, shard, self.batch_size, batches, sequences[:1]
        )
        count, total, total_sq = trainer.strategy.reduce(moments, reduce_op="sum").tolist()
        self.bias, self.std = normalization_from_moments(count, total, total_sq, self.scale)
        set_reward_normalization(pl_module.model, self.bias, self.std)
        rank_zero_info(
            f"Reward normalisation on {int(count)} reference rows of {self.reference_data}: "
            f"bias {self.bias:.6f}, scale {self.std:.6f}"
        )
        if trainer.logger is not None and trainer.is_global_zero:
            trainer.logger.log_metrics(
                {"reward_norm/bias": self.bias, "reward_norm/scale": self.std}, trainer.global_step
            )
            trainer.logger.save()
        if self.update_last_checkpoint:
            for checkpoint in trainer.checkpoint_callbacks:
                path = getattr(checkpoint, "last_model_path", "")
                if path:
                    trainer.save_checkpoint(path)
