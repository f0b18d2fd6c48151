"""Stage 2 of InstructGPT: a reward model trained on human comparisons (pairwise or K-wise rankings)."""

from __future__ import annotations

import math
import os
from typing import Any

import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import nn
from torchmetrics import MeanMetric

from lit_rlhf.hf.export import save_pretrained_atomic
from lit_rlhf.hf.loading import is_sequence_classifier_checkpoint, load_model, unwrap_peft
from lit_rlhf.hf.reward import reward_model_card
from lit_rlhf.hf.scoring import reward_normalization, score_head, sequence_scores, set_reward_normalization
from lit_rlhf.hf.specs import ModelSpec
from lit_rlhf.models.base import RLHFModule, resumable
from lit_rlhf.rlhf.losses import KwiseLossOutput, center_rewards_penalty, kwise_ranking_loss

_METRICS = ("loss", "accuracy", "margin", "reward_mean", "reward_sq")


def valid_pairs(ranks: torch.Tensor, response_mask: torch.Tensor) -> torch.Tensor:
    """BoolTensor ``[B, K, K]``: ``[b, w, l]`` is True when response ``w`` is ranked strictly above ``l``."""
    real = response_mask.bool()
    return (ranks.unsqueeze(-1) < ranks.unsqueeze(-2)) & real.unsqueeze(-1) & real.unsqueeze(-2)


def split_by_prompt(batch: dict[str, torch.Tensor], micro_batch_size: int | None) -> list[dict[str, torch.Tensor]]:
    """Cut a preference batch (sequences ``[B * K, L]``, per-prompt tensors ``[B, ...]``) into prompt groups."""
    num_prompts, k = batch["ranks"].shape
    step = micro_batch_size or num_prompts
    per_sequence = ("input_ids", "attention_mask", "labels")
    return [
        {key: (v[i * k : (i + step) * k] if key in per_sequence else v[i : i + step]) for key, v in batch.items()}
        for i in range(0, num_prompts, step)
    ]


class RewardModule(RLHFModule):
    """Reward model: a backbone with a scalar head, trained with InstructGPT's K-wise ranking loss (Eq. 1).

    The backbone is any Hugging Face model loaded as a sequence classifier (``num_labels=1``): a causal LM
    whose unembedding is replaced by a fresh scalar ``score`` head (InstructGPT starts from the SFT export),
    an existing reward model, a classifier with several labels (its head replaced by a fresh scalar one), or an
    encoder such as BERT, DeBERTa or MiniLM (a tokenizer without EOS is accepted here). Scores come from
    :func:`~lit_rlhf.hf.scoring.sequence_scores`, the same read-out PPO uses: decoders at the last real token
    (the EOS), encoders their pooled output on ``[CLS] prompt [SEP] response [SEP]``
    (docs/conventions.md#reward-model-read-out).

    One batch element is one prompt with its K ranked responses; a micro-batch's responses are scored in
    **one** forward pass. The loss is ``−log σ(r_w − r_l − margin)`` over every non-tied pair, averaged over
    a prompt's pairs, then over the prompts of the whole optimizer step (across micro-batches and processes),
    so each prompt weighs the same whatever its K. Pairwise data is K = 2 (Llama 2 margins supported).
    Training and metrics use the raw head output; the stored normalisation (see
    :class:`~lit_rlhf.callbacks.RewardNormalization`) is applied by :meth:`forward` and ``predict``, travels
    in checkpoints (``on_save_checkpoint``) and in the exported config (``reward_bias``/``reward_scale``).

    Args:
        model: the backbone (hub id or folder, dtype, LoRA, 4-bit...).
        micro_batch_size: **prompts** per forward/backward pass (each brings its K responses); ``None`` = the
            whole batch.
        center_rewards_coef: adds ``coef · mean((r_w + r_l)²)`` per prompt (TRL's
            ``center_rewards_coefficient``, recommended 0.01); ``None`` disables it.
        optimizer: default ``AdamW(lr=1e-5, weight_decay=0)``.
        lr_scheduler: default :class:`~lit_rlhf.models.base.WarmupCosineLR` (no warmup, cosine to 10%).
        max_grad_norm: gradient-norm clipping; ``None`` disables it.
        head_init_std: std of the fresh scalar head's weights (bias 0) when the backbone is not already a
            reward model; ``None`` = ``1/sqrt(d_model + 1)`` (OpenAI 2019, N+). An existing head is kept.
    """

    hf_roles = ("model",)
    trainable_roles = ("model",)
    tokenizer_role = "reward_model"

    def __init__(
        self,
        model: ModelSpec,
        micro_batch_size: int | None = None,
        center_rewards_coef: float | None = None,
        optimizer: OptimizerCallable | None = None,
        lr_scheduler: LRSchedulerCallable | None = None,
        max_grad_norm: float | None = 1.0,
        head_init_std: float | None = None,
    ) -> None:
        super().__init__(optimizer, lr_scheduler, max_grad_norm)
        self.save_hyperparameters(ignore=["optimizer", "lr_scheduler"])
        self.model_spec = model
        self.micro_batch_size = micro_batch_size
        self.center_rewards_coef = center_rewards_coef
        self.head_init_std = head_init_std
        self.model = None
        self._pending_normalization: dict[str, float] | None = None
        # weighted means, one set per phase (ModuleDict keys may not shadow nn.Module.train, hence two attrs)
        self.train_metrics = nn.ModuleDict({name: resumable(MeanMetric()) for name in _METRICS})
        self.val_metrics = nn.ModuleDict({name: MeanMetric() for name in _METRICS})

    # ---- models -------------------------------------------------------------------------------------
    def model_specs(self) -> dict[str, ModelSpec]:
        return {"model": self.model_spec}

    def build_models(self) -> None:
        spec = self.model_spec
        is_reward_model = is_sequence_classifier_checkpoint(spec)
        self.model = load_model(
            spec, self.tokenizer, "sequence_classifier", trainable=True, device=self.load_device, new_head=True
        )
        if not is_reward_model:
            self._init_head()
        if self._pending_normalization is not None:
            set_reward_normalization(self.model, **self._pending_normalization)

    def _init_head(self) -> None:
        # transformers gives a fresh head its generic init (std 0.02); OpenAI/N+ use N(0, 1/sqrt(d+1)), bias 0.
        head = score_head(self.model)
        if head is None:  # encoders (BERT...) call their head `classifier`
            head = getattr(unwrap_peft(self.model), "classifier", None)
        linears = [m for m in head.modules() if type(m) is nn.Linear] if head is not None else []
        for linear in linears:  # under LoRA: peft's trainable copy of the head and the original
            std = self.head_init_std if self.head_init_std is not None else 1 / math.sqrt(linear.in_features + 1)
            with torch.no_grad():
                linear.weight.normal_(0.0, std)
                if linear.bias is not None:
                    linear.bias.zero_()

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        """Scores ``[N]`` of sequences ``[N, L]`` (any padding side), normalised unless ``normalize=False``."""
        return sequence_scores(self.model, input_ids, attention_mask, normalize=normalize)

    def score_batch(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Raw rewards ``[B, K]`` of a preference batch (0 at padded slots), from ONE forward pass."""
        num_prompts, k = batch["ranks"].shape
        real = batch["response_mask"].reshape(-1)
        input_ids, attention_mask = batch["input_ids"][real], batch["attention_mask"][real]
        keep = attention_mask.bool().any(0)  # drop columns that are padding in every row (either side)
        scores = self(input_ids[:, keep], attention_mask[:, keep], normalize=False)
        index = real.nonzero().squeeze(1)
        return scores.new_zeros(num_prompts * k).index_put((index,), scores).view(num_prompts, k)

    def _loss_terms(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, KwiseLossOutput, dict]:
        """Summed per-prompt loss (ranking + center term), the ranking loss output and detached stats."""
        rewards = self.score_batch(batch)
        out = kwise_ranking_loss(rewards, batch["ranks"], batch["response_mask"], batch.get("margin"))
        num_prompts = (out.num_pairs > 0).sum()
        loss_sum = out.loss * num_prompts
        if self.center_rewards_coef:
            pairs = valid_pairs(batch["ranks"], batch["response_mask"])
            # per prompt, like the ranking loss, so every prompt weighs the same whatever its K
            penalties = [
                center_rewards_penalty(rewards[b][winners], rewards[b][losers])
                for b, (winners, losers) in enumerate(p.nonzero(as_tuple=True) for p in pairs)
                if len(winners)
            ]
            if penalties:
                loss_sum = loss_sum + self.center_rewards_coef * torch.stack(penalties).sum()
        real = batch["response_mask"].bool()
        r = rewards.detach()[real].double()
        stats = {
            "ranking_loss_sum": out.per_prompt_loss.sum(),
            "prompts": num_prompts.float(),
            "pairs": out.num_pairs.sum().float(),
            "correct": out.pair_correct.sum().float(),
            "margin_sum": out.pair_margin_sum.sum(),
            "reward_sum": r.sum(),
            "reward_sq_sum": (r**2).sum(),
            "responses": real.sum().float(),
        }
        return loss_sum, out, stats

    # ---- steps --------------------------------------------------------------------------------------
    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        local_prompts = (valid_pairs(batch["ranks"], batch["response_mask"]).sum((1, 2)) > 0).sum()
        # DDP averages gradients over processes, so scale by world size to divide by the global prompt count.
        global_prompts = self.trainer.strategy.reduce(local_prompts.float(), reduce_op="sum").clamp(min=1)
        world_size = self.trainer.world_size

        def loss_fn(micro: dict[str, torch.Tensor]):
            loss_sum, _, stats = self._loss_terms(micro)
            return loss_sum * world_size / global_prompts, stats

        stats = self.accumulate_step(split_by_prompt(batch, self.micro_batch_size), loss_fn)
        step = self._update_metrics("train", stats)
        kwargs = dict(batch_size=batch["ranks"].shape[0])
        self.log("train/loss", stats["loss"], prog_bar=True, **kwargs)
        self.log("train/accuracy", step["accuracy"], prog_bar=True, **kwargs)
        for name in ("loss", "accuracy", "margin", "reward_mean"):
            self.log(f"train/{name}_epoch", self.train_metrics[name], on_step=False, on_epoch=True, **kwargs)
        self.log_skipped(stats["skipped"])
        self.log("train/lr", self.optimizers().param_groups[0]["lr"], **kwargs)

    def _evaluate(self, batch: dict[str, torch.Tensor], prefix: str) -> None:
        _, _, stats = self._loss_terms(batch)
        self._update_metrics("val", stats)  # validation and test never run at the same time: one metric set
        kwargs = dict(on_step=False, on_epoch=True, batch_size=batch["ranks"].shape[0])
        for name in ("loss", "accuracy", "margin", "reward_mean"):
            self.log(f"{prefix}/{name}", self.val_metrics[name], prog_bar=name == "accuracy", **kwargs)

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._evaluate(batch, "val")

    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._evaluate(batch, "test")

    def _phase_metrics(self, phase: str) -> nn.ModuleDict:
        return self.train_metrics if phase == "train" else self.val_metrics

    def _update_metrics(self, phase: str, stats: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Update the phase's weighted means; return this batch's values (accuracy: a tie counts as wrong)."""
        values = {
            "loss": (stats["ranking_loss_sum"] / stats["prompts"].clamp(min=1), stats["prompts"]),
            "accuracy": (stats["correct"] / stats["pairs"].clamp(min=1), stats["pairs"]),
            "margin": (stats["margin_sum"] / stats["pairs"].clamp(min=1), stats["pairs"]),
            "reward_mean": (stats["reward_sum"] / stats["responses"].clamp(min=1), stats["responses"]),
            "reward_sq": (stats["reward_sq_sum"] / stats["responses"].clamp(min=1), stats["responses"]),
        }
        for name, (value, weight) in values.items():
            if weight > 0:
                self._phase_metrics(phase)[name].update(value.float(), weight=weight.float())
        return {name: value for name, (value, _) in values.items()}

    def _log_reward_std(self, phase: str, prefix: str) -> None:
        # population std over the epoch from the weighted first and second moments
        mean_metric, sq_metric = self._phase_metrics(phase)["reward_mean"], self._phase_metrics(phase)["reward_sq"]
        if not sq_metric.update_called:
            return
        mean, sq = mean_metric.compute(), sq_metric.compute()
        self.log(f"{prefix}/reward_std", (sq - mean**2).clamp(min=0).sqrt())
        sq_metric.reset()

    def on_train_epoch_end(self) -> None:
        self._log_reward_std("train", "train")

    def on_validation_epoch_end(self) -> None:
        self._log_reward_std("val", "val")

    def on_test_epoch_end(self) -> None:
        self._log_reward_std("val", "test")

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor | list[float | list[float]]:
        """Normalised scores of a batch of ``predict_data`` rows (``collate_predict``): a tensor ``[B]`` when
        every row is scored once, else per row its score or, for a pair or ranking row, the list of its
        responses' scores (``score_groups``)."""
        scores = self(batch["input_ids"], batch["attention_mask"])
        groups = batch.get("score_groups")
        if groups is None or all(g is None for g in groups):
            return scores
        values, out = iter(scores.tolist()), []
        for group in groups:
            out.append(next(values) if group is None else [next(values) for _ in range(group)])
        return out

    # ---- checkpoints and export ---------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        # Lightning checkpoints do not hold the HF config, where the normalisation lives: save it alongside.
        if self.model is not None:
            bias, scale = reward_normalization(self.model)
            checkpoint["reward_normalization"] = {"bias": bias, "scale": scale}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        normalization = checkpoint.get("reward_normalization")
        if normalization is None:
            return
        if self.model is not None:
            set_reward_normalization(self.model, **normalization)
        else:  # restored before configure_model (e.g. load_from_checkpoint): applied in build_models
            self._pending_normalization = dict(normalization)

    def export_hf(self, dirpath: str | os.PathLike, merge_adapters: bool = True) -> None:
        """Write the reward model (with its normalisation in ``config.json``) and tokenizer as an HF folder.

        It reloads with ``AutoModelForSequenceClassification`` or :func:`~lit_rlhf.hf.load_model`
        (``kind="sequence_classifier"``); :func:`~lit_rlhf.hf.scoring.sequence_scores` applies the stored
        ``reward_bias``/``reward_scale``. Plain transformers gives the same raw score
        (docs/conventions.md#reward-model-export), and the folder's ``README.md`` says how.
        """
        card = reward_model_card(self.model, self.tokenizer, self.model_spec.name_or_path, self._training_summary())
        save_pretrained_atomic(
            self.model, self.tokenizer, dirpath, self.model_spec, "sequence_classifier", merge_adapters, card
        )

    def _training_summary(self) -> str:
        trainer = self._trainer
        data = getattr(getattr(trainer, "datamodule", None), "train_data", None) if trainer is not None else None
        steps = f"{trainer.global_step} optimizer steps" if trainer is not None else "no Trainer"
        source = f" on `{data}`" if data else ""
        return (
            f"InstructGPT's K-wise ranking loss, −log σ(r_w − r_l) over every ranked pair{source}, {steps}; "
            "then normalised so the reference demonstrations score mean 0 when `RewardNormalization` ran."
        )
