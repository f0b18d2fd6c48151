"""Direct preference optimisation: the policy learns from rankings without a reward model or sampling.

DPO (Rafailov et al. 2023) replaces InstructGPT's stages 2 and 3 by one supervised loss on comparisons. Its
variants here: conservative DPO (label smoothing), IPO and the reference-free SimPO
(:mod:`lit_rlhf.rlhf.preference_losses`; docs/conventions.md#dpo-losses).
"""

from __future__ import annotations

import hashlib
import os
from typing import Any, Literal

import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor, nn
from torchmetrics import MeanMetric

from lit_rlhf.hf.export import save_pretrained_atomic
from lit_rlhf.hf.forwards import completion_logprobs
from lit_rlhf.hf.loading import load_model
from lit_rlhf.hf.sharding import forwards_of_the_busiest
from lit_rlhf.hf.specs import ModelSpec
from lit_rlhf.models.base import RLHFModule
from lit_rlhf.models.reward import split_by_prompt, valid_pairs
from lit_rlhf.models.roles import Roles
from lit_rlhf.rlhf.losses import IGNORE_INDEX
from lit_rlhf.rlhf.preference_losses import REFERENCE_LOSSES, kwise_preference_loss, ranked_pairs, top_ranked_nll

_METRICS = ("loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins")


def sequence_key(input_ids: Tensor, attention_mask: Tensor, labels: Tensor) -> bytes:
    """A digest of one sequence's real tokens and where its response starts: the key of a cached reference
    log-prob (independent of padding, batch composition, shuffling and process)."""
    real = attention_mask.bool()
    ids = input_ids[real].to(torch.int64).cpu().numpy().tobytes()
    response_tokens = int((labels[real] != IGNORE_INDEX).sum())
    return hashlib.blake2b(ids + response_tokens.to_bytes(8, "little"), digest_size=16).digest()


class DPOModule(RLHFModule):
    """Direct preference optimisation of a causal LM on pairwise or K-wise rankings.

    Data: :class:`~lit_rlhf.datamodules.PreferenceDataModule` batches (one element = one prompt with its K
    ranked responses; ``labels`` mark each response's tokens). A micro-batch's responses go through **one**
    batched forward pass of the policy (and one of the reference), giving ``log π(y|x)`` summed over each
    response's tokens, EOS included. Every non-tied pair ``(w, l)`` of a prompt's ranking is a preference pair
    (``C(K, 2)`` pairs without ties; pairwise data is K = 2). The loss averages over a prompt's pairs, then over
    the prompts of the whole optimizer step (across micro-batches and processes), so each prompt weighs the
    same whatever its K and ties, as in the reward model (docs/conventions.md#k-wise-dpo). RM ``margin``
    columns are not used.

    Reference: ``None`` = the policy's own weights with the LoRA adapter disabled (no second copy, TRL's
    convention), or a frozen copy loaded from the policy's spec when the policy is not LoRA. ``simpo`` needs no
    reference. With ``precompute_ref_logprobs`` the reference log-probs of every training and validation
    sequence are computed once at the start of ``fit`` (shared out over processes, then gathered) and looked up
    by the sequence's content, so shuffling, resume and DDP sharding need no bookkeeping; the reference then
    takes no memory traffic during training (it is frozen, so the cache equals recomputation).

    Logged (TRL's names): ``train/loss``, ``rewards/{chosen,rejected,accuracies,margins}`` (implicit rewards
    ``β·(log π − log π_ref)``, or ``β·log π/|y|`` for SimPO, averaged over pairs; an accuracy counts a tie as
    wrong), ``logps/{chosen,rejected}``, and the same under ``val/``.

    Args:
        policy: the model to optimise, normally the SFT export (full or LoRA; 4-bit base with LoRA).
        reference: an explicit frozen reference; ``None`` as above.
        loss_type: ``sigmoid`` (DPO, with ``label_smoothing`` cDPO), ``ipo`` or ``simpo``.
        beta: β of the loss (DPO/IPO: KL strength, TRL default 0.1; SimPO: reward scale, the paper's 2–2.5).
        label_smoothing: ε ∈ [0, 0.5), the assumed share of flipped labels (cDPO; ``sigmoid`` and ``simpo``).
        simpo_gamma: γ, SimPO's target reward margin.
        rpo_alpha: α of RPO (Pang et al. 2024; TRL's ``rpo_alpha``): adds ``α ·`` the per-token NLL of each
            prompt's best-ranked response to its loss, which keeps the policy on the task's text (logged as
            ``nll_loss``). ``None``: off.
        precompute_ref_logprobs: compute the reference log-probs once before training and cache them.
        micro_batch_size: **prompts** per forward/backward pass (each brings its K responses); ``None`` = the
            whole batch.
        optimizer: default ``AdamW(lr=1e-5, weight_decay=0)``. lr_scheduler: default
            :class:`~lit_rlhf.models.base.WarmupCosineLR`. max_grad_norm: gradient-norm clipping (``None``: off).

    Example::

        module = DPOModule(ModelSpec("sft_export"), beta=0.1, micro_batch_size=4)
        Trainer(max_epochs=1, callbacks=[HFExport("dpo_export")]).fit(
            module, datamodule=PreferenceDataModule("rankings.jsonl", batch_size=32))
    """

    hf_roles = ("policy", "reference")
    trainable_roles = ("policy",)

    def __init__(
        self,
        policy: ModelSpec,
        reference: ModelSpec | None = None,
        loss_type: Literal["sigmoid", "ipo", "simpo"] = "sigmoid",
        beta: float = 0.1,
        label_smoothing: float = 0.0,
        simpo_gamma: float = 0.5,
        rpo_alpha: float | None = None,
        precompute_ref_logprobs: bool = False,
        micro_batch_size: int | None = None,
        optimizer: OptimizerCallable | None = None,
        lr_scheduler: LRSchedulerCallable | None = None,
        max_grad_norm: float | None = 1.0,
    ) -> None:
        super().__init__(optimizer, lr_scheduler, max_grad_norm)
        self.save_hyperparameters(ignore=["optimizer", "lr_scheduler"])
        if loss_type not in ("sigmoid", "ipo", "simpo"):
            raise ValueError(f"loss_type must be 'sigmoid', 'ipo' or 'simpo', got {loss_type!r}.")
        if not beta > 0:
            raise ValueError(f"beta must be > 0, got {beta}.")
        if not 0.0 <= label_smoothing < 0.5:
            raise ValueError(f"label_smoothing must be in [0, 0.5), got {label_smoothing}.")
        if label_smoothing and loss_type == "ipo":
            raise ValueError("label_smoothing applies to the sigmoid and simpo losses, not to ipo.")
        if rpo_alpha is not None and not rpo_alpha >= 0:
            raise ValueError(f"rpo_alpha must be >= 0, got {rpo_alpha}.")
        if loss_type == "simpo" and (reference is not None or precompute_ref_logprobs):
            raise ValueError("loss_type='simpo' is reference-free: drop `reference` and `precompute_ref_logprobs`.")
        self.loss_type = loss_type
        self.beta = beta
        self.label_smoothing = label_smoothing
        self.simpo_gamma = simpo_gamma
        self.rpo_alpha = rpo_alpha
        self.precompute_ref_logprobs = precompute_ref_logprobs
        self.micro_batch_size = micro_batch_size
        #: which models this run holds (lit_rlhf.models.roles): build_models and the planner read it
        self.roles = Roles.preference(policy, reference, uses_reference=loss_type in REFERENCE_LOSSES)
        self.specs: dict[str, ModelSpec] = self.roles.specs()
        self.policy = self.reference = None
        self.ref_cache: dict[bytes, float] | None = None
        self.ref_cache_misses = 0
        # weighted epoch means of validation/test (keys may not hold "/")
        self.val_metrics = nn.ModuleDict({name.replace("/", "_"): MeanMetric() for name in _METRICS})

    @property
    def uses_reference(self) -> bool:
        return self.loss_type in REFERENCE_LOSSES

    # ---- models -------------------------------------------------------------------------------------
    def model_specs(self) -> dict[str, ModelSpec]:
        return self.specs

    def build_models(self) -> None:
        tok, device = self.tokenizer, self.load_device
        self.policy = load_model(self.specs["policy"], tok, "causal_lm", trainable=True, device=device)
        # a LoRA policy with its adapter disabled *is* the reference, unless another one is given explicitly
        if self.roles.loads_reference:
            self.reference = load_model(self.specs["reference"], tok, "causal_lm", trainable=False, device=device)

    # ---- log-probs ----------------------------------------------------------------------------------
    def response_logprobs(self, batch: dict[str, Tensor], reference: bool = False) -> tuple[Tensor, Tensor]:
        """``(log π(y|x), |y|)``, both ``[B, K]`` (0 at padded slots), of a preference batch's responses, from one
        forward pass of the policy (or, with ``reference=True``, of the reference, without gradients)."""
        num_prompts, k = batch["ranks"].shape
        real = batch["response_mask"].reshape(-1)
        rows = (batch["input_ids"][real], batch["attention_mask"][real], batch["labels"][real])
        if not reference:
            logps, lengths = completion_logprobs(self.policy, *rows)
        else:
            with torch.no_grad():
                if self.reference is not None:
                    logps, lengths = completion_logprobs(self.reference, *rows)
                else:
                    with self.policy.disable_adapter():
                        logps, lengths = completion_logprobs(self.policy, *rows)
        index = real.nonzero().squeeze(1)
        out = logps.new_zeros(num_prompts * k).index_put((index,), logps).view(num_prompts, k)
        return out, lengths.new_zeros(num_prompts * k).index_put((index,), lengths).view(num_prompts, k)

    def reference_logprobs(self, batch: dict[str, Tensor]) -> Tensor:
        """Reference ``log π_ref(y|x)`` ``[B, K]``: from the cache when every sequence is in it, else computed."""
        if self.ref_cache is not None:
            keys = [sequence_key(*row) for row in zip(batch["input_ids"], batch["attention_mask"], batch["labels"])]
            real = batch["response_mask"].reshape(-1).tolist()
            if all(key in self.ref_cache for key, is_real in zip(keys, real) if is_real):
                values = [self.ref_cache[key] if is_real else 0.0 for key, is_real in zip(keys, real)]
                return torch.tensor(values, dtype=torch.float32, device=self.device).view_as(batch["ranks"])
            self.ref_cache_misses += 1
        return self.response_logprobs(batch, reference=True)[0]

    def on_fit_start(self) -> None:
        if not self.precompute_ref_logprobs:
            return
        datamodule = getattr(self.trainer, "datamodule", None)
        datasets = [getattr(datamodule, name, None) for name in ("train_dataset", "val_dataset")]
        if datamodule is None or datasets[0] is None:
            raise ValueError(
                "precompute_ref_logprobs needs a PreferenceDataModule attached to the Trainer (its examples are "
                "scored once before training)."
            )
        examples = [e for dataset in datasets if dataset for e in dataset]
        rank, world_size = self.trainer.global_rank, self.trainer.world_size
        mine = examples[rank::world_size]  # each process scores a share, then all share the results
        chunk = self.micro_batch_size or datamodule.batch_size
        starts = list(range(0, len(mine), chunk))
        if self.sharded_sampling:  # as many forwards as the busiest process (an extra one scores a chunk again)
            most = forwards_of_the_busiest(self.trainer, len(starts), self.device)
            starts += [starts[0] if starts else 0] * (most - len(starts))
            mine = mine or examples[:1]
        cache: dict[bytes, float] = {}
        for start in starts:
            batch = datamodule.collate(mine[start : start + chunk])
            batch = {k: v.to(self.device) for k, v in batch.items()}
            logps = self.response_logprobs(batch, reference=True)[0].reshape(-1).tolist()
            rows = zip(batch["input_ids"], batch["attention_mask"], batch["labels"], batch["response_mask"].reshape(-1))
            for (ids, mask, labels, real), value in zip(rows, logps):
                if real:
                    cache[sequence_key(ids, mask, labels)] = value
        if world_size > 1:
            gathered: list[Any] = [None] * world_size
            torch.distributed.all_gather_object(gathered, cache)
            cache = {k: v for part in gathered for k, v in part.items()}
        self.ref_cache = cache
        rank_zero_info(f"DPO: cached the reference log-probs of {len(cache)} sequences")

    # ---- loss ---------------------------------------------------------------------------------------
    def _loss_terms(self, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        """Σ over prompts of each prompt's mean pair loss, and detached sums for the metrics."""
        logps, lengths = self.response_logprobs(batch)
        ref_logps = self.reference_logprobs(batch) if self.uses_reference else None
        out = kwise_preference_loss(
            self.loss_type,
            logps,
            lengths,
            batch["ranks"],
            batch["response_mask"],
            ref_logps,
            beta=self.beta,
            label_smoothing=self.label_smoothing,
            gamma=self.simpo_gamma,
        )
        loss_sum, per_prompt_loss = out.loss_sum, out.per_prompt_loss
        has_pairs = out.num_pairs > 0
        nll = logps.new_zeros(len(has_pairs))
        if self.rpo_alpha is not None:
            nll = top_ranked_nll(logps, lengths, batch["ranks"], batch["response_mask"]) * has_pairs
            loss_sum = loss_sum + self.rpo_alpha * nll.sum()
            per_prompt_loss = per_prompt_loss + self.rpo_alpha * nll.detach()
        pair = out.pair
        prompt, winners, losers = ranked_pairs(batch["ranks"], batch["response_mask"])  # the order of out.pair
        chosen_logps, rejected_logps = logps.detach()[prompt, winners], logps.detach()[prompt, losers]
        stats = {
            "loss_sum": per_prompt_loss.sum(),
            "nll_sum": nll.detach().sum(),
            "prompts": has_pairs.sum().float(),
            "pairs": out.num_pairs.sum().float(),
            "chosen_sum": pair.chosen_rewards.sum(),
            "rejected_sum": pair.rejected_rewards.sum(),
            "correct": (pair.chosen_rewards > pair.rejected_rewards).sum().float(),
            "chosen_logps_sum": chosen_logps.sum(),
            "rejected_logps_sum": rejected_logps.sum(),
        }
        return loss_sum, stats

    # ---- steps --------------------------------------------------------------------------------------
    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        local_prompts = (valid_pairs(batch["ranks"], batch["response_mask"]).sum((1, 2)) > 0).sum()
        # DDP averages gradients over processes, so scale by world size to divide by the global prompt count.
        global_prompts = self.trainer.strategy.reduce(local_prompts.float(), reduce_op="sum").clamp(min=1)
        world_size = self.trainer.world_size

        def loss_fn(micro: dict[str, Tensor]):
            loss_sum, stats = self._loss_terms(micro)
            return loss_sum * world_size / global_prompts, stats

        stats = self.accumulate_step(split_by_prompt(batch, self.micro_batch_size), loss_fn)
        values = self._metric_values(stats)
        kwargs = dict(batch_size=batch["ranks"].shape[0])
        self.log("train/loss", stats["loss"], prog_bar=True, **kwargs)
        for name in _METRICS[1:]:
            self.log(name, values[name][0], prog_bar=name == "rewards/accuracies", **kwargs)
        pairs = stats["pairs"].clamp(min=1)
        self.log("logps/chosen", stats["chosen_logps_sum"] / pairs, **kwargs)
        self.log("logps/rejected", stats["rejected_logps_sum"] / pairs, **kwargs)
        if self.rpo_alpha is not None:
            self.log("nll_loss", stats["nll_sum"] / stats["prompts"].clamp(min=1), **kwargs)
        self.log_skipped(stats["skipped"])  # an epoch sum that survives a resume mid-epoch
        self.log("train/lr", self.optimizers().param_groups[0]["lr"], **kwargs)

    @staticmethod
    def _metric_values(stats: dict[str, Tensor]) -> dict[str, tuple[Tensor, Tensor]]:
        """Metric name → (value, weight): the loss is a mean over prompts, the rewards means over pairs."""
        pairs, prompts = stats["pairs"], stats["prompts"]
        values = {
            "loss": (stats["loss_sum"] / prompts.clamp(min=1), prompts),
            "rewards/chosen": (stats["chosen_sum"] / pairs.clamp(min=1), pairs),
            "rewards/rejected": (stats["rejected_sum"] / pairs.clamp(min=1), pairs),
            "rewards/accuracies": (stats["correct"] / pairs.clamp(min=1), pairs),
            "rewards/margins": ((stats["chosen_sum"] - stats["rejected_sum"]) / pairs.clamp(min=1), pairs),
        }
        return values

    def _evaluate(self, batch: dict[str, Tensor], prefix: str) -> None:
        _, stats = self._loss_terms(batch)
        for name, (value, weight) in self._metric_values(stats).items():
            if weight > 0:  # validation and test never run at the same time: one metric set
                self.val_metrics[name.replace("/", "_")].update(value.float(), weight=weight.float())
        kwargs = dict(on_step=False, on_epoch=True, batch_size=batch["ranks"].shape[0])
        for name in _METRICS:
            metric = self.val_metrics[name.replace("/", "_")]
            self.log(f"{prefix}/{name}", metric, prog_bar=name == "rewards/accuracies", **kwargs)

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        self._evaluate(batch, "val")

    def test_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        self._evaluate(batch, "test")

    # ---- export -------------------------------------------------------------------------------------
    def export_hf(self, dirpath: str | os.PathLike, merge_adapters: bool = True) -> None:
        """Write the policy and tokenizer as a Hugging Face folder (as :meth:`SFTModule.export_hf`)."""
        save_pretrained_atomic(self.policy, self.tokenizer, dirpath, self.specs["policy"], "causal_lm", merge_adapters)
