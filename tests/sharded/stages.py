"""Sharded runs of every stage, launched by tests/sharded/test_fsdp2.py under torchrun (2 CPU processes, gloo).

``python -m torch.distributed.run --standalone --nproc-per-node 2 tests/sharded/stages.py CONFIG.json`` runs the
named runs one after another in the same process group; each writes its Hugging Face export (gathered from the
shards by lit_rlhf's export) under ``out/<run>/``. The test runs the same stages in one process with twice the
batch (:func:`fit`) and compares the weights. ``CONFIG.json``: ``{"paths": {...}, "out": DIR, "runs": [...],
"num_nodes": 1}``.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from functools import partial
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from safetensors.torch import save_file

from lit_rlhf.callbacks import HFExport, RewardNormalization
from lit_rlhf.datamodules import PreferenceDataModule, PromptDataModule, SFTDataModule
from lit_rlhf.hf import LoraSpec, ModelSpec, QuantizationSpec
from lit_rlhf.hf.engines import HFEngine
from lit_rlhf.hf.sharding import FSDP2Strategy
from lit_rlhf.models import CriticFreeModule, DPOModule, PPOModule, RewardModule, SFTModule
from lit_rlhf.models.critic_free_config import CriticFreeConfig
from lit_rlhf.models.ppo_config import KLConfig, PPOConfig, RewardConfig, SamplingConfig, SharedBaseConfig

#: short enough that a hang fails the test in a minute
TIMEOUT_S = 60.0
#: small enough that clipping is active in every step of these runs (so a wrong global norm shows)
MAX_GRAD_NORM = 0.05


def sgd(params):
    # momentum: its buffers are optimizer state that a resumed run must restore
    return torch.optim.SGD(params, lr=0.5, momentum=0.9)


def constant(optimizer):
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)


class CountBatches(Callback):
    """The training batches this fit ran (a resumed run runs only the ones after its checkpoint)."""

    def __init__(self) -> None:
        self.seen = 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.seen += 1


class RankLengthEngine(HFEngine):
    """transformers' ``generate`` stopping after ``2 + 4 · rank`` tokens: the processes finish sampling at
    different steps, as responses of different lengths do (each keeps running forwards for the others:
    ``synced_gpus``). Records the response lengths it returned."""

    lengths: list[int] = []

    def generate(self, prompt_ids, prompt_mask, sampling, seed):
        rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
        sampling = SamplingConfig(max_new_tokens=2 + 4 * rank, top_k=sampling.top_k)
        out = super().generate(prompt_ids, prompt_mask, sampling, seed)
        RankLengthEngine.lengths.append(out.responses.shape[1])
        return out


class Killed(Exception):
    """What :class:`KillBefore` raises: the run dies there, as a killed process would (no save on the way out)."""


class KillBefore(Callback):
    """Raise :class:`Killed` when training batch ``batch_idx`` starts, after the checkpoint of the batch before it
    was written (``module``: the module it killed)."""

    module = None

    def __init__(self, batch_idx: int) -> None:
        self.batch_idx = batch_idx

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if batch_idx == self.batch_idx:
            KillBefore.module = pl_module
            raise Killed(f"killed before batch {batch_idx}")


class RecordIterations(Callback):
    """PPO's rollout statistics of each iteration (a resumed run must continue them exactly)."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if not hasattr(pl_module, "logged"):
            pl_module.logged = []
        pl_module.logged.append([round(float(outputs[k]), 6) for k in ("kl", "score")])


def module_and_data(stage: str, paths: dict[str, str], batch_size: int, max_grad_norm: float | None = MAX_GRAD_NORM):
    """The module and datamodule of ``stage`` (SGD with momentum, constant LR, clipping at ``max_grad_norm``).
    ``dpo_lora``: a LoRA policy whose reference is its adapter disabled; ``ppo_value_head``: a LoRA policy with a
    value head (a trainable module outside the Hugging Face model) instead of a critic; ``sft_samples``: SFT that
    samples answers to validation prompts."""
    common = dict(optimizer=sgd, lr_scheduler=constant, max_grad_norm=max_grad_norm)
    policy = ModelSpec(paths["model"])
    if stage.endswith(("_lora", "_value_head")):
        policy = ModelSpec(paths["model"], lora=LoraSpec(r=4, alpha=8))
    if stage in ("sft", "sft_samples"):
        samples = stage == "sft_samples"
        module = SFTModule(policy, micro_batch_size=2, num_val_samples=2 if samples else 0, max_new_tokens=8, **common)
        val = paths["sft"] if samples else None
        return module, SFTDataModule(paths["sft"], val_data=val, batch_size=batch_size, max_length=64)
    if stage == "rm":
        module = RewardModule(policy, micro_batch_size=2, **common)
        return module, PreferenceDataModule(paths["rankings"], val_data=None, batch_size=batch_size)
    if stage == "dpo_lora":
        module = DPOModule(policy, micro_batch_size=2, **common)
        return module, PreferenceDataModule(paths["rankings"], val_data=None, batch_size=batch_size)
    if stage == "dpo":
        # the reference: a frozen copy, sharded too; its log-probs cached before training, each process scoring a
        # share (25 rankings: 13 and 12, one more forward on one process)
        module = DPOModule(policy, micro_batch_size=2, precompute_ref_logprobs=True, **common)
        return module, PreferenceDataModule(paths["rankings"], val_data=None, batch_size=batch_size)
    if stage.endswith("_qlora"):
        return quantized_module(stage, paths, batch_size, common)
    prompts = PromptDataModule(paths["prompts"], val_data=None, batch_size=batch_size)
    if stage.startswith(("ppo_shared", "grpo_shared")):
        return shared_base_module(stage, paths, common), prompts
    if stage in ("ppo", "ppo_uneven", "ppo_value_head"):
        value_head = stage == "ppo_value_head"
        module = PPOModule(
            policy,
            critic=None if value_head else ModelSpec(paths["classifier"]),
            value_head=value_head,
            reward_model=ModelSpec(paths["classifier"]),
            # greedy: the responses do not depend on each process's sampling seed
            sampling=SamplingConfig(max_new_tokens=6, top_k=1),
            ppo=PPOConfig(ppo_epochs=2, num_mini_batches=1, micro_batch_size=2),
            kl=KLConfig(coef=0.1),
            engine=RankLengthEngine() if stage == "ppo_uneven" else None,
            **common,
        )
        return module, prompts
    if stage == "grpo":
        from tests.helpers import DeterministicGroups  # responses that depend on the prompt only

        cls, engine = DeterministicGroups, None
    elif stage == "grpo_sampled":  # sampled as users sample: each process and iteration with its own seed
        cls, engine = CriticFreeModule, None
    else:  # grpo_uneven
        cls, engine = CriticFreeModule, RankLengthEngine()
    module = cls(
        policy,
        reward=RewardConfig(fn="tests.helpers:count_e"),
        sampling=SamplingConfig(max_new_tokens=6),
        algorithm=CriticFreeConfig(
            estimator="grpo", group_size=4, kl_in="loss", ppo_epochs=2, num_mini_batches=1, micro_batch_size=4
        ),
        kl=KLConfig(coef=0.1),
        engine=engine,
        **common,
    )
    return module, prompts


def shared_base_module(stage: str, paths: dict[str, str], common: dict):
    """PPO (``ppo_shared``, ``ppo_shared_uneven``) or GRPO (``grpo_shared_tied``: on a base with tied embeddings)
    on one base with the policy, critic (PPO: a copy of the reward adapter and head) and reward adapters."""
    tied = stage.endswith("_tied")
    policy = ModelSpec(paths["tied_model" if tied else "model"], lora=LoraSpec(r=4, alpha=8))
    shared = SharedBaseConfig(reward_adapter=paths["tied_rm_adapter" if tied else "rm_adapter"])
    kl = KLConfig(coef=0.1)
    if stage.startswith("grpo_shared"):
        from tests.helpers import DeterministicGroups  # responses that depend on the prompt only

        algorithm = CriticFreeConfig(
            estimator="grpo", group_size=4, kl_in="loss", ppo_epochs=2, num_mini_batches=1, micro_batch_size=4
        )
        sampling = SamplingConfig(max_new_tokens=6)
        return DeterministicGroups(policy, shared_base=shared, sampling=sampling, algorithm=algorithm, kl=kl, **common)
    return PPOModule(
        policy,
        shared_base=shared,
        sampling=SamplingConfig(max_new_tokens=6, top_k=1),  # greedy: the same responses on every process
        ppo=PPOConfig(ppo_epochs=2, num_mini_batches=1, micro_batch_size=2),
        kl=kl,
        engine=RankLengthEngine() if stage == "ppo_shared_uneven" else None,
        **common,
    )


def quantized_module(stage: str, paths: dict[str, str], batch_size: int, common: dict):
    """``sft_qlora``: SFT of LoRA on a 4-bit base; ``ppo_qlora``: PPO with a LoRA policy and a LoRA critic on 4-bit
    bases (the reference: the policy's adapter disabled) and an 8-bit reward model; ``ppo_shared_qlora``: PPO on
    one 4-bit base with the policy, critic and reward adapters (float32 compute: the CPU kernels of bf16 differ
    from run to run of shapes)."""
    four_bit = QuantizationSpec(bits=4, compute_dtype="float32")
    lora = LoraSpec(r=4, alpha=8)
    policy = ModelSpec(paths["model"], lora=lora, quantization=four_bit)
    if stage == "sft_qlora":
        module = SFTModule(policy, micro_batch_size=2, num_val_samples=0, **common)
        return module, SFTDataModule(paths["sft"], val_data=None, batch_size=batch_size, max_length=64)
    if stage == "ppo_shared_qlora":  # one 4-bit base: policy, critic and reward adapters
        roles = dict(shared_base=SharedBaseConfig(reward_adapter=paths["rm_adapter"]))
    else:
        roles = dict(
            critic=ModelSpec(paths["classifier"], lora=lora, quantization=four_bit),
            reward_model=ModelSpec(paths["classifier"], quantization=QuantizationSpec(bits=8)),
        )
    module = PPOModule(
        policy,
        sampling=SamplingConfig(max_new_tokens=6, top_k=1),  # greedy: the same responses on every process
        ppo=PPOConfig(ppo_epochs=2, num_mini_batches=1, micro_batch_size=2),
        kl=KLConfig(coef=0.1),
        **roles,
        **common,
    )
    return module, PromptDataModule(paths["prompts"], val_data=None, batch_size=batch_size)


def role_states(module) -> dict[str, torch.Tensor]:
    """Every weight of the Hugging Face roles (``model.``; ``policy.``, ``critic.``, ``reward_model.``), quantized ones
    included (as stored: packed 4-bit bytes and their quantization state, int8 and its scales), gathered to rank 0
    when sharded (``{}`` on the other ranks), and ``trainable``: the names of the trained ones."""
    from lit_rlhf.hf.sharding import full_state_dict, is_sharded

    state, trainable = {}, []
    for role in module.hf_roles:
        part = getattr(module, role, None)
        if part is None:
            continue
        weights = full_state_dict(part) if is_sharded(part) else part.state_dict()
        state.update({f"{role}.{k}": v.detach().cpu().as_subclass(torch.Tensor).clone() for k, v in weights.items()})
        trainable += [f"{role}.{n}" for n, p in part.named_parameters() if p.requires_grad]
    return state, trainable


def quantized_run(name: str, fsdp2, out: Path, **kwargs) -> dict:
    """A run of a quantized stage (:func:`quantized_module`); ``:resume_sharded`` / ``:resume_full``: stopped after
    its first step (SFT) or iteration (PPO) with a distributed (one-file) checkpoint and resumed. Rank 0 writes
    every role's weights to ``out/<name>/state.safetensors``; returns the trained weights' names and, from each
    process, how many quantized weights it holds, whether all are whole (plain tensors, none a DTensor shard) and
    whether every trained weight is a shard."""
    from lit_rlhf.hf.sharding import is_dtensor, quantized_params

    stage = name.split(":")[0]
    if name.endswith((":resume_sharded", ":resume_full")):
        strategy = partial(fsdp2, save_distributed_checkpoint=name.endswith("sharded"))
        if stage.startswith("ppo"):
            with contextlib.suppress(Killed):
                fit(stage, out=out / name, strategy=strategy(), checkpoint=True, killed_before_batch=1, **kwargs)
        else:
            fit(stage, out=out / name, strategy=strategy(), max_steps=1, checkpoint=True, **kwargs)
        ckpt = out / name / "last.ckpt"
        module = fit(stage, out=out / name, strategy=strategy(), ckpt_path=str(ckpt), checkpoint=True, **kwargs)
    else:
        module = fit(stage, out=out / name, strategy=fsdp2(), **kwargs)
    roles = [getattr(module, role, None) for role in module.hf_roles]
    quantized = set().union(*(quantized_params(part) for part in roles if part is not None))
    whole = [not is_dtensor(p) for p in quantized]
    trained_sharded = all(is_dtensor(p) for p in module.parameters() if p.requires_grad)
    everywhere = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(everywhere, (len(whole), all(whole), trained_sharded))
    state, trainable = role_states(module)
    if torch.distributed.get_rank() == 0:
        save_file(state, str(out / name / "state.safetensors"))
    return {"quantized_whole": everywhere, "trainable": trainable, "batches": module.batches_seen}


def fit(
    stage: str,
    paths: dict[str, str],
    out: Path,
    batch_size: int,
    strategy="auto",
    devices: int = 1,
    num_nodes: int = 1,
    max_steps: int = 2,
    ckpt_path: str | None = None,
    checkpoint: bool = False,
    max_grad_norm: float | None = MAX_GRAD_NORM,
    killed_before_batch: int | None = None,
):
    """Fit ``stage`` for ``max_steps`` optimizer steps (PPO and GRPO: 2 iterations, or 1 for the ``_uneven`` runs);
    the export goes to ``out/export`` (the PPO critic to ``out/critic``), a checkpoint to ``out/last.ckpt`` (after
    every batch when ``killed_before_batch`` is given: the run then dies as that batch starts, :class:`Killed`)."""
    L.seed_everything(0)
    module, data = module_and_data(stage, paths, batch_size, max_grad_norm)
    counter = CountBatches()
    callbacks = [HFExport(str(out / "export")), counter]
    if stage in ("ppo", "ppo_shared"):
        callbacks.append(HFExport(str(out / "critic"), method="export_critic_hf"))
    if stage == "ppo_shared":  # the critic adapter and head unmerged, in the reward-adapter format
        callbacks.append(HFExport(str(out / "critic_adapter"), merge_adapters=False, method="export_critic_hf"))
    if stage in ("ppo", "grpo", "grpo_sampled"):
        callbacks.append(RecordIterations())
    if stage == "rm":  # 3 reference rows, one per forward: 2 forwards on one process, 1 on the other
        callbacks.insert(0, RewardNormalization(reference_data=paths["sft"], max_samples=3, batch_size=1))
    if checkpoint:
        every = 1 if killed_before_batch is not None else None
        callbacks.append(ModelCheckpoint(dirpath=str(out), save_last=True, save_top_k=0, every_n_train_steps=every))
    if killed_before_batch is not None:
        callbacks.append(KillBefore(killed_before_batch))
    rl = stage.startswith(("ppo", "grpo"))
    trainer = L.Trainer(
        accelerator="cpu",
        devices=devices,
        num_nodes=num_nodes,
        strategy=strategy,
        max_steps=-1 if rl else max_steps,
        max_epochs=1 if rl else -1,
        limit_train_batches=(1 if stage.endswith("_uneven") else 2) if rl else None,
        limit_val_batches=1 if stage == "sft_samples" else 0,
        val_check_interval=2 if stage == "sft_samples" else None,
        num_sanity_val_steps=0,
        logger=False,
        enable_checkpointing=checkpoint,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=callbacks,
    )
    trainer.fit(module, datamodule=data, ckpt_path=ckpt_path)
    module.batches_seen = counter.seen
    return module


def run(name: str, paths: dict[str, str], out: Path, num_nodes: int) -> dict:
    """One named run of the sharded side; returns what the test checks besides the exported weights."""
    fsdp2 = partial(FSDP2Strategy, timeout_s=TIMEOUT_S)
    devices = 2 // num_nodes
    kwargs = dict(paths=paths, batch_size=4, devices=devices, num_nodes=num_nodes)
    stage = name.split(":")[0]
    if name in ("sft", "rm", "dpo", "ppo", "grpo", "grpo_sampled", "dpo_lora", "ppo_value_head", "sft_samples"):
        module = fit(stage, out=out / name, strategy=fsdp2(), **kwargs)
        return {"logged": module.logged} if hasattr(module, "logged") else {}
    elif name == "sft:ddp":
        from lightning.pytorch.strategies import DDPStrategy

        fit(stage, out=out / name, strategy=DDPStrategy(timeout=fsdp2()._timeout), **kwargs)
    elif name == "sft:checkpointing":  # activation checkpointing: the same weights
        fit(stage, out=out / name, strategy=fsdp2(activation_checkpointing=True), **kwargs)
    elif name == "sft:bf16":  # FSDP2's mixed precision: bf16 compute, fp32 gradient reduction and weights
        fit(stage, out=out / name, strategy=fsdp2(mixed_precision="bf16"), **kwargs)
    elif name == "sft:model_parallel":  # Lightning's own strategy, configured by hand: sharded all the same
        from lightning.pytorch.strategies import ModelParallelStrategy

        strategy = ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1, timeout=fsdp2()._timeout)
        fit(stage, out=out / name, strategy=strategy, **kwargs)
    elif name in ("sft:resume_sharded", "sft:resume_full"):
        strategy = partial(fsdp2, save_distributed_checkpoint=name.endswith("sharded"))
        fit(stage, out=out / name, strategy=strategy(), max_steps=1, checkpoint=True, **kwargs)
        ckpt = out / name / "last.ckpt"
        resumed = fit(stage, out=out / name, strategy=strategy(), ckpt_path=str(ckpt), checkpoint=True, **kwargs)
        return {"sharded_checkpoint": ckpt.is_dir(), "batches_after_resume": resumed.batches_seen}
    elif name in ("ppo_shared", "ppo_shared:checkpointing", "grpo_shared_tied"):
        strategy = fsdp2(activation_checkpointing=name.endswith("checkpointing"))
        module = fit(stage, out=out / name, strategy=strategy, **kwargs)
        state = role_states(module)[0]  # every process gathers, rank 0 writes
        if torch.distributed.get_rank() == 0:
            save_file(state, str(out / name / "state.safetensors"))
        return {"iteration": module.iteration}
    elif name in ("ppo:resume_sharded", "grpo:resume_sharded", "grpo_sampled:resume_sharded"):
        # killed as the second iteration starts, its distributed checkpoint of the first one written; a new fit
        # resumes from it for the second
        strategy = partial(fsdp2, save_distributed_checkpoint=True)
        with contextlib.suppress(Killed):
            fit(stage, out=out / name, strategy=strategy(), checkpoint=True, killed_before_batch=1, **kwargs)
        first = KillBefore.module
        ckpt = out / name / "last.ckpt"
        resumed = fit(stage, out=out / name, strategy=strategy(), ckpt_path=str(ckpt), checkpoint=True, **kwargs)
        return {
            "sharded_checkpoint": ckpt.is_dir(),
            "iterations": [first.iteration, resumed.iteration],
            "batches_after_resume": resumed.batches_seen,
            "logged": getattr(first, "logged", []) + getattr(resumed, "logged", []),
        }
    elif stage.endswith("_qlora"):
        return quantized_run(name, fsdp2, out, **kwargs)
    elif name in ("ppo_uneven", "grpo_uneven", "ppo_shared_uneven"):
        RankLengthEngine.lengths = []
        fsdp = fsdp2(frozen_roles="replicate") if name == "ppo_uneven" else fsdp2()
        module = fit(stage, out=out / name, strategy=fsdp, **kwargs)
        lengths = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(lengths, RankLengthEngine.lengths)
        return {"lengths": lengths, "iteration": module.iteration}
    else:
        raise ValueError(f"unknown run {name!r}")
    return {}


def main(config_path: str) -> None:
    config = json.loads(Path(config_path).read_text())
    out = Path(config["out"])
    results = {}
    for name in config["runs"]:
        results[name] = run(name, config["paths"], out, config.get("num_nodes", 1))
    if int(os.environ.get("RANK", "0")) == 0:
        (out / "results.json").write_text(json.dumps(results))


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # `tests.helpers` by class path
    main(sys.argv[1])
