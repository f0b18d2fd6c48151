"""Stage 1 of InstructGPT: supervised fine-tuning on demonstrations (loss on response tokens only)."""

from __future__ import annotations

import os

import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.utilities import rank_zero_info
from torchmetrics import MeanMetric

from lit_rlhf.hf.engines import RolloutEngine
from lit_rlhf.hf.export import save_pretrained_atomic
from lit_rlhf.hf.generation import SamplingConfig
from lit_rlhf.hf.loading import load_model
from lit_rlhf.hf.specs import ModelSpec
from lit_rlhf.hf.tokenization import prompt_ids
from lit_rlhf.models.base import RLHFModule, resumable, split_batch, trim_padding
from lit_rlhf.rlhf.losses import IGNORE_INDEX, sft_nll
from lit_rlhf.rlhf.padding import pad_batch


class SFTModule(RLHFModule):
    """Supervised fine-tuning of a causal LM.

    The loss is the negative log-likelihood of the supervised tokens (labels ``!= -100``) averaged over all
    supervised tokens of an optimizer step, across micro-batches and processes: every token weighs the same,
    whatever the sequence it is in and however the step is split (docs/conventions.md#loss-normalisation).

    Batches: one DataLoader batch is one optimizer step; it is cut into ``micro_batch_size`` pieces whose
    gradients are accumulated (``trainer.accumulate_grad_batches`` must stay 1).

    Args:
        model: the causal LM to fine-tune (hub id or folder, dtype, LoRA, 4-bit...).
        micro_batch_size: examples per forward/backward pass; ``None`` = the whole batch.
        optimizer: default ``AdamW(lr=1e-5, weight_decay=0)``.
        lr_scheduler: default :class:`~lit_rlhf.models.base.WarmupCosineLR` (no warmup, cosine to 10%).
        max_grad_norm: gradient-norm clipping; ``None`` disables it.
        num_val_samples: prompts of the first validation batch answered and printed at each validation.
        max_new_tokens: length of those sampled answers (and of ``predict``'s).
        engine: where those answers come from (:class:`~lit_rlhf.hf.engines.RolloutEngine`; YAML
            ``class_path``); default :class:`~lit_rlhf.hf.engines.HFEngine`.

    Example (plain Python, in an existing project)::

        module = SFTModule(ModelSpec("Qwen/Qwen2.5-0.5B"), micro_batch_size=2)
        data = SFTDataModule("demos.jsonl", val_fraction=0.05, batch_size=16)
        Trainer(max_epochs=2).fit(module, datamodule=data)
        module.export_hf("sft_export")
    """

    hf_roles = ("model",)
    trainable_roles = ("model",)

    def __init__(
        self,
        model: ModelSpec,
        micro_batch_size: int | None = None,
        optimizer: OptimizerCallable | None = None,
        lr_scheduler: LRSchedulerCallable | None = None,
        max_grad_norm: float | None = 1.0,
        num_val_samples: int = 2,
        max_new_tokens: int = 32,
        engine: RolloutEngine | None = None,
    ) -> None:
        super().__init__(optimizer, lr_scheduler, max_grad_norm)
        # the engine holds the model it serves once bound: configuration, not checkpointed state
        self.save_hyperparameters(ignore=["optimizer", "lr_scheduler", "engine"])
        if engine is not None:
            self.engine = engine
        self.model_spec = model
        self.micro_batch_size = micro_batch_size
        self.num_val_samples = num_val_samples
        self.max_new_tokens = max_new_tokens
        self.model = None
        self.train_loss = resumable(MeanMetric())
        self.val_loss, self.val_accuracy = MeanMetric(), MeanMetric()

    def model_specs(self) -> dict[str, ModelSpec]:
        return {"model": self.model_spec}

    def build_models(self) -> None:
        self.model = load_model(self.model_spec, self.tokenizer, "causal_lm", trainable=True, device=self.load_device)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Logits ``[B, L, V]`` for right-padded ``input_ids`` ``[B, L]``."""
        # no KV cache: a training forward never continues, and under activation checkpointing the recompute would
        # append to the cache a second time (a shape mismatch at the first backward)
        return self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits

    def _nll_and_correct(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        batch = trim_padding(batch)
        logits = self(batch["input_ids"], batch["attention_mask"])
        nll_sum, num_tokens = sft_nll(logits, batch["labels"])
        targets = batch["labels"][:, 1:]
        correct = ((logits[:, :-1].argmax(-1) == targets) & (targets != IGNORE_INDEX)).sum()
        return nll_sum, num_tokens, correct

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        local_tokens = (batch["labels"][:, 1:] != IGNORE_INDEX).sum()
        # DDP averages gradients over processes, so scale by world size to divide by the global token count.
        global_tokens = self.trainer.strategy.reduce(local_tokens.float(), reduce_op="sum")
        world_size = self.trainer.world_size

        def loss_fn(micro: dict[str, torch.Tensor]):
            nll_sum, num_tokens, correct = self._nll_and_correct(micro)
            return nll_sum * world_size / global_tokens, {"nll_sum": nll_sum, "tokens": num_tokens.float()}

        stats = self.accumulate_step(split_batch(batch, self.micro_batch_size), loss_fn)
        self.train_loss.update(stats["nll_sum"] / stats["tokens"], weight=stats["tokens"])
        batch_size = batch["input_ids"].shape[0]
        self.log("train/loss", stats["nll_sum"] / stats["tokens"], prog_bar=True, batch_size=batch_size)
        self.log("train/loss_epoch", self.train_loss, on_step=False, on_epoch=True, batch_size=batch_size)
        self.log_skipped(stats["skipped"])
        self.log("train/lr", self.optimizers().param_groups[0]["lr"], batch_size=batch_size)

    def _evaluate(self, batch: dict[str, torch.Tensor], prefix: str) -> None:
        nll_sum, num_tokens, correct = self._nll_and_correct(batch)
        self.val_loss.update(nll_sum / num_tokens, weight=num_tokens)
        self.val_accuracy.update(correct / num_tokens, weight=num_tokens)
        kwargs = dict(on_step=False, on_epoch=True, batch_size=batch["input_ids"].shape[0])
        self.log(f"{prefix}/loss", self.val_loss, prog_bar=True, **kwargs)
        self.log(f"{prefix}/token_accuracy", self.val_accuracy, **kwargs)

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._evaluate(batch, "val")
        # sharded weights are gathered inside every forward, a collective: then every process samples (rank 0 prints)
        samples = self.trainer.is_global_zero or self.sharded_sampling
        if batch_idx == 0 and self.num_val_samples and samples and not self.trainer.sanity_checking:
            self._print_samples(batch)

    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._evaluate(batch, "test")

    def on_validation_epoch_end(self) -> None:
        # perplexity of the epoch's token-mean loss (torchmetrics has already synced it across processes)
        if self.val_loss.update_called:
            self.log("val/perplexity", torch.exp(self.val_loss.compute()))

    def _print_samples(self, batch: dict[str, torch.Tensor]) -> None:
        prompts = []
        for ids, labels in zip(batch["input_ids"][: self.num_val_samples], batch["labels"][: self.num_val_samples]):
            prompt_len = int((labels != IGNORE_INDEX).int().argmax())
            prompts.append(self.tokenizer.decode(ids[:prompt_len], skip_special_tokens=True))
        ids, mask = pad_batch([prompt_ids(self.tokenizer, p) for p in prompts], self.tokenizer.pad_token_id, "left")
        answers = self.sample(ids.to(self.device), mask.to(self.device), seed=self.global_step)
        for prompt, answer in zip(prompts, answers):
            rank_zero_info(f"[sample step {self.global_step}] {prompt!r} → {answer!r}")

    def sample(self, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, seed: int) -> list[str]:
        """Sampled completions (temperature 1, ``max_new_tokens``) of left-padded prompts ``[B, P]``, decoded."""
        sampling = SamplingConfig(max_new_tokens=self.max_new_tokens)
        # the model changes with every optimizer step: an engine with its own weights gets them before sampling
        engine = self.rollout_engine(self.model)
        engine.sync_weights(self.model)
        responses = engine.generate(prompt_ids, prompt_mask, sampling, seed).responses
        return self.tokenizer.batch_decode(responses, skip_special_tokens=True)

    @torch.no_grad()
    def predict_step(self, batch: dict, batch_idx: int) -> list[str]:
        """Sampled completions of the batch's left-padded prompts ``[B, P]`` (seeded by the batch index)."""
        return self.sample(batch["prompt_input_ids"], batch["prompt_attention_mask"], seed=batch_idx)

    def export_hf(self, dirpath: str | os.PathLike, merge_adapters: bool = True) -> None:
        """Write the fine-tuned model and tokenizer as a Hugging Face folder (see ``save_pretrained_atomic``)."""
        save_pretrained_atomic(self.model, self.tokenizer, dirpath, self.model_spec, "causal_lm", merge_adapters)
