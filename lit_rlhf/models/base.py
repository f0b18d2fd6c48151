"""What every lit_rlhf LightningModule shares.

* **Lazy, idempotent model creation** in ``configure_model`` (so the :class:`~lit_rlhf.callbacks.LoRAQuantization`
  callback can edit the specs in its ``setup`` first), each model sharded with FSDP2 right after it is built
  under ``ModelParallelStrategy`` (:mod:`lit_rlhf.hf.sharding`; docs/conventions.md#sharded-training).
* **One optimizer step = one batch**, accumulated over micro-batches by :meth:`RLHFModule.accumulate_step`
  (manual optimization). The loss of each micro-batch is normalised by the size of the *whole* step
  (supervised tokens, prompts, ...), so a step's gradient does not depend on how it is split
  (docs/conventions.md#loss-normalisation); DDP gradient all-reduce happens once, on the last micro-batch.
* **Checkpoints hold only what cannot be reloaded**: trainable parameters and the module's own state
  (normalisers, KL controllers). Frozen weights (a 4-bit base, the reference, the reward model) come back
  from their ``ModelSpec`` in ``configure_model``.
* Optimizer and scheduler injected from YAML (``OptimizerCallable`` / ``LRSchedulerCallable``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any, TypeVar

import lightning as L
import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.utilities import rank_zero_warn
from torch.optim.lr_scheduler import LRScheduler
from torchmetrics import Metric, SumMetric

from lit_rlhf.checkpointing import last_checkpoint_path
from lit_rlhf.hf.engines import HFEngine, RolloutEngine
from lit_rlhf.hf.loading import load_tokenizer
from lit_rlhf.hf.sharding import check_strategy, is_dtensor, shard_leftover_trainable, shard_roles, sharding_options
from lit_rlhf.hf.specs import ModelSpec
from lit_rlhf.loggers import bind_loggers


class WarmupCosineLR(LRScheduler):
    """Linear warmup from 0 to the base LR, then cosine decay to ``min_lr_ratio`` × base LR.

    Args:
        optimizer: the wrapped optimizer.
        warmup_steps: optimizer steps of linear warmup.
        total_steps: steps of the whole run; ``None`` lets the LightningModule fill it in from the Trainer
            (``trainer.estimated_stepping_batches``) in ``on_train_start``, once a resumed run's checkpoint has
            been restored (asking earlier would build the training loader before its data position is loaded).
        min_lr_ratio: final LR as a fraction of the base LR.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        warmup_steps: int = 0,
        total_steps: int | None = None,
        min_lr_ratio: float = 0.1,
    ) -> None:
        self.warmup_steps = warmup_steps
        self.total_steps = total_steps
        self.min_lr_ratio = min_lr_ratio
        super().__init__(optimizer)

    def lr_factor(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / (self.warmup_steps + 1)
        if not self.total_steps or self.total_steps <= self.warmup_steps:
            return 1.0
        progress = min(1.0, (step - self.warmup_steps) / (self.total_steps - self.warmup_steps))
        return self.min_lr_ratio + (1 - self.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    def get_lr(self) -> list[float]:
        factor = self.lr_factor(self.last_epoch)
        return [base_lr * factor for base_lr in self.base_lrs]


class RLHFModule(L.LightningModule):
    """Base class of :class:`SFTModule`, :class:`RewardModule` and :class:`PPOModule`.

    Subclasses define :meth:`model_specs` (role name → :class:`ModelSpec`), :meth:`build_models` (called
    once from ``configure_model``) and the roles that hold Hugging Face models (:attr:`hf_roles`).
    """

    #: attributes holding Hugging Face models; their frozen weights are left out of checkpoints.
    hf_roles: tuple[str, ...] = ()
    #: roles that :class:`~lit_rlhf.callbacks.LoRAQuantization` adapts when it names none.
    trainable_roles: tuple[str, ...] = ()
    #: consecutive optimizer steps skipped for non-finite values before the run stops (after a checkpoint).
    max_consecutive_faults: int = 3
    #: what the first role's tokenizer is loaded for (a reward model's may lack an EOS: encoders)
    tokenizer_role: str = "policy"

    def __init__(
        self,
        optimizer: OptimizerCallable | None = None,
        lr_scheduler: LRSchedulerCallable | None = None,
        max_grad_norm: float | None = 1.0,
    ) -> None:
        super().__init__()
        self.automatic_optimization = False
        # Frozen weights are not saved; they are re-created by configure_model before the restore.
        self.strict_loading = False
        self._optimizer_factory = optimizer
        self._scheduler_factory = lr_scheduler
        self.max_grad_norm = max_grad_norm
        self._tokenizer = None
        self._models_built = False
        self.fault_streak = 0
        self.faults_total = 0
        self.last_fault: str | None = None
        #: why training stopped early: ``"numerical_fault"`` (this guard), ``"kl_stop"`` (KLMonitor) or None.
        #: A stopped run writes no Hugging Face export and the command exits non-zero (lit_rlhf.errors).
        self.stop_reason: str | None = None
        # optimizer steps skipped in the current epoch; all processes skip the same steps, so no sync is needed
        self.skipped_steps = resumable(SumMetric(sync_on_compute=False))
        #: where sampled responses come from (modules that sample set it from their ``engine`` argument)
        self.engine: RolloutEngine = HFEngine()

    # ---- models -------------------------------------------------------------------------------------
    def model_specs(self) -> dict[str, ModelSpec]:
        """Role name → spec of every Hugging Face model this module loads."""
        raise NotImplementedError

    def build_models(self) -> None:
        """Create the Hugging Face models from :meth:`model_specs`. Called once."""
        raise NotImplementedError

    @property
    def models_built(self) -> bool:
        return self._models_built

    def setup(self, stage: str) -> None:
        check_strategy(self.trainer.strategy, self.max_grad_norm)  # FSDP1, DeepSpeed: a one-line error
        # lit_rlhf's CSVLogger needs the stage and the checkpoint path to know which earlier rows to keep
        bind_loggers(self.trainer)

    def configure_model(self) -> None:
        # Lightning calls this hook once per stage (fit, validate, ...) in the same process: build once.
        if self._models_built:
            return
        self.build_models()
        self._models_built = True
        from lightning.pytorch.strategies import ModelParallelStrategy

        if self._trainer is not None and isinstance(self.trainer.strategy, ModelParallelStrategy):
            self.shard_models(self.trainer.strategy)

    def shard_models(self, strategy) -> None:
        """FSDP2 (lit_rlhf.hf.sharding): shard every Hugging Face role, frozen ones unless the strategy says
        ``frozen_roles: replicate``, then any other trainable module on its own. ``ModelParallelStrategy`` adds no
        DDP: a weight left unsharded would be trained separately by each process."""
        options = sharding_options(strategy)
        mesh = options.pop("mesh")
        shard_roles({role: getattr(self, role, None) for role in self.hf_roles}, mesh, **options)
        shard_leftover_trainable(self, mesh, options["mixed_precision"])
        shared = getattr(self, "_shared", None)  # a shared base (lit_rlhf.hf.shared_base): sharded as the policy
        if shared is not None:
            shared.on_sharded(options["activation_checkpointing"])

    @property
    def tokenizer(self):
        """The tokenizer of the first role, with a pad token distinct from EOS (loaded on first use)."""
        if self._tokenizer is None:
            first_spec = next(iter(self.model_specs().values()))
            self._tokenizer = load_tokenizer(first_spec, role=self.tokenizer_role)
        return self._tokenizer

    @property
    def load_device(self) -> torch.device:
        """Device that quantized weights are placed on at load time."""
        trainer = self._trainer
        return trainer.strategy.root_device if trainer is not None else torch.device("cpu")

    # ---- sampling -----------------------------------------------------------------------------------
    def rollout_engine(self, policy: torch.nn.Module) -> RolloutEngine:
        """:attr:`engine`, bound to ``policy`` and the tokenizer on first use (after the strategy has wrapped the
        models, so a sharded policy is served as it is trained)."""
        if not self.engine.is_bound:
            self.engine.bind(policy, self.tokenizer, synced_gpus=self.sharded_sampling)
        return self.engine

    @property
    def sharded_sampling(self) -> bool:
        """Whether every process must keep running forwards until all have finished sampling: weights sharded
        across several processes (FSDP, DeepSpeed) are gathered inside each forward, a collective."""
        from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy, ModelParallelStrategy

        trainer = self._trainer
        return (
            trainer is not None
            and trainer.world_size > 1
            and isinstance(trainer.strategy, (FSDPStrategy, DeepSpeedStrategy, ModelParallelStrategy))
        )

    def teardown(self, stage: str) -> None:
        self.engine.close()

    # ---- optimization -------------------------------------------------------------------------------
    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def configure_optimizers(self):
        params = self.trainable_parameters()
        if not params:
            raise ValueError(f"{type(self).__name__} has no trainable parameter.")
        if self._optimizer_factory is None:
            optimizer = torch.optim.AdamW(params, lr=1e-5, weight_decay=0.0)
        else:
            optimizer = self._optimizer_factory(params)
        if self._scheduler_factory is None:
            scheduler = WarmupCosineLR(optimizer)
        else:
            scheduler = self._scheduler_factory(optimizer)
        # total_steps stays None here: `trainer.estimated_stepping_batches` would build and iterate the training
        # loader before a resumed run's checkpoint is restored, and the loader would start at batch 0 again.
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def on_train_start(self) -> None:
        # After the restore: a resumed run keeps the total_steps saved in the scheduler's state, a new run fills
        # it in now. The LR of step 0 does not depend on it (warmup, or the start of the cosine), so it is
        # already right.
        for config in self.trainer.lr_scheduler_configs:
            scheduler = config.scheduler
            if isinstance(scheduler, WarmupCosineLR) and scheduler.total_steps is None:
                scheduler.total_steps = self.total_optimizer_steps()
        check_data_position(self.trainer)

    def total_optimizer_steps(self) -> int | None:
        """Optimizer steps of the whole run (one per training batch unless a subclass says otherwise)."""
        try:
            steps = self.trainer.estimated_stepping_batches
        except Exception:  # no trainer, or an infinite dataloader
            return None
        return int(steps) if math.isfinite(steps) else None

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        # The step that metrics are logged at is Lightning's count of stepped batches. When a checkpoint was
        # written after that count had moved on to the next batch (PreemptionCheckpoint saves on the way out,
        # after validation), Lightning's restore adds one more, and every later metric row of the resumed run
        # would carry the next step's number. With manual optimization every batch steps once, so the count must
        # equal the batches completed.
        epoch_loop = self.trainer.fit_loop.epoch_loop
        completed = epoch_loop.batch_progress.total.completed
        if epoch_loop._batches_that_stepped != completed:
            epoch_loop._batches_that_stepped = completed

    def accumulate_step(
        self,
        micro_batches: Sequence[Any],
        loss_fn: Callable[[Any], tuple[torch.Tensor, dict[str, torch.Tensor]]],
    ) -> dict[str, torch.Tensor]:
        """Run one optimizer step accumulated over ``micro_batches``.

        Args:
            micro_batches: the pieces of one optimizer step's batch.
            loss_fn: maps a micro-batch to ``(loss, stats)``. The loss must already be normalised by the size
                of the whole step, so the accumulated gradient equals that of one big batch.

        Returns:
            The stats summed over micro-batches (detached), plus ``loss`` (the step's total loss) and
            ``skipped`` (1.0 when a non-finite loss made the step be skipped).
        """
        optimizer = self.optimizers()
        totals: dict[str, torch.Tensor] = {}
        finite = True
        for i, micro in enumerate(micro_batches):
            last = i == len(micro_batches) - 1
            with optimizer.toggle_model(sync_grad=last):
                loss, stats = loss_fn(micro)
                finite = finite and self.check_finite("loss", loss)
                if finite:
                    self.manual_backward(loss)
            for key, value in {"loss": loss, **stats}.items():
                totals[key] = totals.get(key, 0.0) + value.detach()
        if finite:
            if self.max_grad_norm is not None:
                self.clip_gradients(optimizer, gradient_clip_val=self.max_grad_norm, gradient_clip_algorithm="norm")
            optimizer.step()
            scheduler = self.lr_schedulers()
            if scheduler is not None:
                scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        self.record_step(finite)
        totals["skipped"] = torch.tensor(0.0 if finite else 1.0, device=self.device)
        return totals

    # ---- numerical faults ---------------------------------------------------------------------------
    def check_finite(self, name: str, value: torch.Tensor) -> bool:
        """Whether ``value`` is finite on every process (all processes must agree to skip a step together,
        or DDP's gradient all-reduce would hang). Remembers ``name`` as the failing quantity."""
        bad = (~torch.isfinite(value.detach())).any().float()
        if self._trainer is not None and self.trainer.world_size > 1:
            bad = self.trainer.strategy.reduce(bad, reduce_op="sum")
        if bool(bad > 0):
            self.last_fault = name
            return False
        return True

    def record_step(self, stepped: bool) -> None:
        """Count a skipped (``stepped=False``) or successful optimizer step for the fault streak."""
        if stepped:
            self.fault_streak = 0
            return
        self.fault_streak += 1
        self.faults_total += 1
        rank_zero_warn(f"Skipped an optimizer step: non-finite {self.last_fault} (skipped {self.faults_total} so far)")

    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        if self.fault_streak < self.max_consecutive_faults:
            return
        path = last_checkpoint_path(self.trainer)
        self.trainer.save_checkpoint(path)
        self.trainer.should_stop = True
        self.stop_reason = "numerical_fault"
        rank_zero_warn(
            f"Stopping: {self.fault_streak} consecutive optimizer steps were skipped because the {self.last_fault} "
            f"was NaN/inf. The weights are those of the last good step, saved to {path}. Lower the learning rate "
            "or check the data, then resume with --ckpt_path last."
        )

    # ---- checkpoints --------------------------------------------------------------------------------
    def _frozen_hf_keys(self) -> set[str]:
        """state_dict keys of Hugging Face weights that are not trained (re-loadable from their spec)."""
        trainable = {name for name, p in self.named_parameters() if p.requires_grad}
        prefixes = tuple(f"{role}." for role in self.hf_roles)
        return {k for k in self.state_dict() if k.startswith(prefixes) and k not in trainable}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if any(is_dtensor(v) for v in checkpoint["state_dict"].values()):
            # a sharded (distributed) checkpoint is loaded key by key into the whole module, frozen weights too
            return
        frozen = self._frozen_hf_keys()
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k not in frozen}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # strict_loading is off because frozen weights are absent; a missing *trainable* weight is an error.
        if not self._models_built or "state_dict" not in checkpoint:
            return  # before configure_model, or under FSDP2, whose strategy has loaded the weights itself
        trainable = {name for name, p in self.named_parameters() if p.requires_grad}
        missing = sorted(trainable - set(checkpoint["state_dict"]))
        if missing:
            raise KeyError(
                f"Checkpoint lacks {len(missing)} trainable weights of {type(self).__name__}, e.g. {missing[:3]}. "
                "Was it written with another model or LoRA configuration?"
            )

    # ---- helpers ------------------------------------------------------------------------------------
    def log_skipped(self, skipped: torch.Tensor) -> None:
        """Log ``train/skipped_steps``, the optimizer steps skipped so far in the epoch (a resumable sum)."""
        self.skipped_steps.update(skipped)
        self.log("train/skipped_steps", self.skipped_steps, on_step=False, on_epoch=True)


MetricT = TypeVar("MetricT", bound=Metric)


def resumable(metric: MetricT) -> MetricT:
    """``metric`` with its running state saved in checkpoints, so an epoch aggregate of a run resumed mid-epoch
    still covers the whole epoch (torchmetrics leaves metric states out of ``state_dict`` by default)."""
    metric.persistent(True)
    return metric


def check_data_position(trainer: L.Trainer) -> None:
    """Refuse to train when the training loader's iterator was built before the checkpoint was restored.

    Anything that builds the training loader before the restore (e.g. ``trainer.estimated_stepping_batches`` in a
    ``configure_optimizers``) makes Lightning skip loading the loader's saved position; the run would repeat
    the batches it had already trained on.
    """
    from lit_rlhf.datamodules.loader import ResumableLoader

    loader = trainer.train_dataloader
    if not isinstance(loader, ResumableLoader) or loader.started_at is None:
        return
    done = loader.progress()
    if loader.started_at != done:
        raise RuntimeError(
            f"The training loader starts at batch {loader.started_at} of the run, but {done} batches were already "
            "trained: it was built before the checkpoint was restored (is `trainer.estimated_stepping_batches` "
            "read in configure_optimizers?), so resuming would not continue the same run."
        )


def split_batch(batch: dict[str, torch.Tensor], micro_batch_size: int | None) -> list[dict[str, torch.Tensor]]:
    """Split a dict of tensors with a shared leading dimension into micro-batches."""
    size = next(iter(batch.values())).shape[0]
    step = micro_batch_size or size
    return [{k: v[i : i + step] for k, v in batch.items()} for i in range(0, size, step)]


def trim_padding(batch: dict[str, torch.Tensor], keys: Iterable[str] = ("input_ids", "attention_mask", "labels")):
    """Drop trailing columns that are padding in every row (right-padded batches), saving compute."""
    length = int(batch["attention_mask"].sum(-1).max())
    return {k: (v[:, :length] if k in keys else v) for k, v in batch.items()}
