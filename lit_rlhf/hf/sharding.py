"""FSDP2 for lit_rlhf's models: parameters, gradients and optimizer state sharded over processes.

The one sharded path of lit_rlhf (docs/conventions.md#sharded-training). :class:`FSDP2Strategy` is Lightning's
``ModelParallelStrategy`` with every process in one data-parallel group, and
:meth:`~lit_rlhf.models.base.RLHFModule.configure_model` calls :func:`shard_model` on every Hugging Face role
right after building it: ``fully_shard`` on each decoder layer, then on the Hugging Face model itself (the root),
so that ``generate`` with its KV cache runs on the sharded model, and a peft wrapper (LoRA) keeps working around
it. Frozen roles are sharded too, or kept whole on every process (``frozen_roles: replicate``, no all-gathers for
models that are small next to the policy). Any other trainable module (a value head) is sharded on its own, so
no trainable weight escapes the gradient reduction: ``ModelParallelStrategy`` adds no DDP, and an unsharded
weight would be trained separately on each process.

A 4-bit or 8-bit role (QLoRA: bitsandbytes' ``Params4bit`` / ``Int8Params`` weights) is sharded too, all but its
quantized weights: those cannot be FSDP2 parameters (FSDP2 replaces a parameter by a ``DTensor`` shard, which
drops the bitsandbytes subclass and the quantization state its layer reads), so every ``fully_shard`` call leaves
them out (``ignored_params``) and each process keeps them whole, frozen, as loaded; the LoRA adapters, norms,
embeddings, the unquantized head and value heads are sharded as in any other model. The memory of the quantized
weights is then paid on every device (an 8B model at 4 bits: about 3.6 GB, 3.35 GiB, each), not divided by the
number of processes (docs/conventions.md#sharded-training).

Under FSDP2 gradients are averaged over processes (as under DDP), so the losses' global normalisation
(docs/conventions.md#loss-normalisation) carries over, and N processes × B examples take the step of one process
with N·B. FSDP1 (``FSDPStrategy``) and DeepSpeed are refused by :func:`check_strategy`: lit_rlhf's stages use
manual optimization, which Lightning's FSDP1 cannot run (Lightning issues #19626, #19685), and Lightning
ignores gradient clipping under DeepSpeed. Outside Lightning, the evaluation can hold its frozen models under
torch's FSDP1 instead (``--shard fsdp1``, :func:`shard_model_fsdp1`).
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import timedelta
from typing import Any, Literal

import torch
from lightning.pytorch.strategies import ModelParallelStrategy, Strategy, StrategyRegistry
from torch import nn

from lit_rlhf.errors import ConfigError
from lit_rlhf.hf.loading import is_quantized, quantized_params, unwrap_peft
from lit_rlhf.hf.scoring import score_head

__all__ = [
    "FSDP2Strategy",
    "check_strategy",
    "decoder_layers",
    "forwards_of_the_busiest",
    "full_state_dict",
    "is_sharded",
    "name_8bit_state_keys",
    "quantized_params",
    "shard_leftover_trainable",
    "shard_model",
    "shard_model_fsdp1",
    "shard_roles",
    "sharding_options",
]

MixedPrecision = Literal["bf16", "fp16"] | None
FSDP2_PRESET = "configs/strategies/fsdp2.yaml"
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


class FSDP2Strategy(ModelParallelStrategy):
    """Lightning's ``ModelParallelStrategy`` as pure FSDP2: one data-parallel group of every process (any number
    of devices and nodes), no tensor parallelism, plus how lit_rlhf shards its roles.

    Args:
        mixed_precision: ``bf16`` / ``fp16``: weights all-gathered and computed in that dtype, gradients reduced
            and stored in float32 (FSDP2's ``MixedPrecisionPolicy``); ``None``: the models' own dtype.
        reshard_after_forward: free the gathered weights of a layer after its forward (less memory, one more
            all-gather in the backward).
        frozen_roles: ``shard`` the frozen roles (reference, reward model) too, or ``replicate`` them whole on
            every process.
        activation_checkpointing: recompute each decoder layer in the backward (transformers' gradient
            checkpointing, non-reentrant) for every trainable role.
        save_distributed_checkpoint: a checkpoint is a folder with one shard file per process (``True``), or
            one file assembled on rank 0 (``False``, loads anywhere).
        timeout_s: process-group timeout; a process waiting this long on the others fails instead of hanging.
        process_group_backend: ``nccl``, ``gloo``...; ``None`` picks from the device.
    """

    def __init__(
        self,
        mixed_precision: MixedPrecision = None,
        reshard_after_forward: bool = True,
        frozen_roles: Literal["shard", "replicate"] = "shard",
        activation_checkpointing: bool = False,
        save_distributed_checkpoint: bool = True,
        timeout_s: float = 1800.0,
        process_group_backend: str | None = None,
    ) -> None:
        if mixed_precision not in (None, *_DTYPES):
            raise ConfigError(f"mixed_precision must be null, 'bf16' or 'fp16', got {mixed_precision!r}.")
        if frozen_roles not in ("shard", "replicate"):
            raise ConfigError(f"frozen_roles must be 'shard' or 'replicate', got {frozen_roles!r}.")
        super().__init__(
            data_parallel_size="auto",
            tensor_parallel_size=1,
            save_distributed_checkpoint=save_distributed_checkpoint,
            process_group_backend=process_group_backend,
            timeout=timedelta(seconds=timeout_s),
        )
        self.mixed_precision = mixed_precision
        self.reshard_after_forward = reshard_after_forward
        self.frozen_roles = frozen_roles
        self.activation_checkpointing = activation_checkpointing

    def setup_environment(self) -> None:
        # every process in one data-parallel group: known once the nodes and devices are (Lightning's "auto"
        # would make the data-parallel size the number of nodes and tensor-parallelise within each node)
        self._data_parallel_size = self.num_nodes * self.num_processes
        super().setup_environment()


# `Trainer(strategy="fsdp2")` / `--trainer.strategy=fsdp2`, with the defaults above
if "fsdp2" not in StrategyRegistry:
    StrategyRegistry.register("fsdp2", FSDP2Strategy, description="FSDP2 over every device (lit_rlhf.hf.sharding)")


def sharding_options(strategy: Strategy) -> dict[str, Any]:
    """The keyword arguments of :func:`shard_model` and the frozen-role policy for ``strategy`` (a plain
    ``ModelParallelStrategy`` gets the defaults of :class:`FSDP2Strategy`), and the data-parallel mesh."""
    mesh = strategy.device_mesh
    if "tensor_parallel" in (mesh.mesh_dim_names or ()) and mesh["tensor_parallel"].size() > 1:
        raise ConfigError(
            "lit_rlhf shards with FSDP2 only: set the ModelParallelStrategy's tensor_parallel_size to 1 "
            f"(or use {FSDP2_PRESET})."
        )
    return {
        "mesh": mesh["data_parallel"] if "data_parallel" in (mesh.mesh_dim_names or ()) else mesh,
        "mixed_precision": getattr(strategy, "mixed_precision", None),
        "reshard_after_forward": getattr(strategy, "reshard_after_forward", True),
        "frozen_roles": getattr(strategy, "frozen_roles", "shard"),
        "activation_checkpointing": getattr(strategy, "activation_checkpointing", False),
    }


def check_strategy(strategy: Strategy, max_grad_norm: float | None) -> None:
    """Refuse, in one line, a strategy that lit_rlhf's manually optimized stages cannot train under.

    Raises:
        ConfigError: ``FSDPStrategy`` (FSDP1: manual optimization fails, Lightning #19626/#19685) or
            ``DeepSpeedStrategy`` (not tested here; Lightning's gradient clipping does nothing under it).
    """
    from lightning.pytorch.strategies import FSDPStrategy

    names = {cls.__name__ for cls in type(strategy).__mro__}
    if isinstance(strategy, FSDPStrategy):
        raise ConfigError(
            "FSDPStrategy (FSDP1) cannot run lit_rlhf's manually optimized stages (Lightning issues #19626, #19685): "
            f"use FSDP2, `--config {FSDP2_PRESET}`."
        )
    if "DeepSpeedStrategy" in names:
        clip = f" and max_grad_norm={max_grad_norm} would be ignored" if max_grad_norm is not None else ""
        raise ConfigError(
            f"DeepSpeedStrategy is not supported by lit_rlhf (manual optimization untested{clip}): use FSDP2, "
            f"`--config {FSDP2_PRESET}`."
        )


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks of a Hugging Face model (peft-wrapped or not), outermost first.

    Read from the model class's ``_no_split_modules`` (the blocks transformers itself keeps whole when it places a
    model over devices: ``LlamaDecoderLayer``, ``Qwen2DecoderLayer``, ``BertLayer``...); without it, the
    longest ``nn.ModuleList``.
    """
    hf = unwrap_peft(model)
    names = set(getattr(hf, "_no_split_modules", None) or ())
    found: list[nn.Module] = []
    inside: set[int] = set()
    for module in hf.modules():
        if id(module) in inside:
            continue
        if type(module).__name__ in names:
            found.append(module)
            inside |= {id(m) for m in module.modules()}
    if found:
        return found
    lists = [m for m in hf.modules() if isinstance(m, nn.ModuleList)]
    return list(max(lists, key=len)) if lists else []


def shard_model(
    model: nn.Module,
    mesh,
    mixed_precision: MixedPrecision = None,
    reshard_after_forward: bool = True,
    activation_checkpointing: bool = False,
) -> nn.Module:
    """Shard a Hugging Face model in place with FSDP2: ``fully_shard`` on each decoder layer, then on the model.

    The root is the transformers model itself (under a peft wrapper: the model peft wraps), so its ``generate``
    and every forward go through FSDP2's hooks; a LoRA adapter's weights live inside the layers and are sharded
    with them. A sequence classifier's ``score`` head is a unit of its own: lit_rlhf applies it to the hidden
    states the model returns, outside the model's forward. The bitsandbytes weights of a 4/8-bit model
    (:func:`quantized_params`) are left out of every unit: they stay whole on every process, frozen.

    Args:
        model: a transformers model, or a peft model around one.
        mesh: the 1-D data-parallel ``DeviceMesh``.
        mixed_precision: ``bf16``/``fp16`` compute (float32 gradient reduction), or ``None``.
        reshard_after_forward: free each layer's gathered weights after its forward.
        activation_checkpointing: transformers' non-reentrant gradient checkpointing of each layer (the model
            then turns its KV cache off in training forwards itself).

    Returns:
        ``model`` (the same object: its modules became FSDP modules).
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    hf = unwrap_peft(model)
    if activation_checkpointing and getattr(hf, "supports_gradient_checkpointing", False):
        hf.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    kwargs: dict[str, Any] = {"mesh": mesh, "reshard_after_forward": reshard_after_forward}
    if mixed_precision is not None:
        kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=_DTYPES[mixed_precision], reduce_dtype=torch.float32)

    def shard(unit: nn.Module) -> None:
        # each unit is told which of its own weights to leave alone (FSDP2 would turn a Params4bit / Int8Params
        # into a DTensor shard without its quantization state); an unquantized model passes none, as before
        fully_shard(unit, ignored_params=quantized_params(unit) or None, **kwargs)

    for layer in decoder_layers(hf):
        shard(layer)
    head = score_head(hf)
    if head is not None:
        # a classifier's scalar head is also applied to the returned hidden states, outside the model's forward
        # (lit_rlhf.hf.scoring), after the root has freed its gathered weights: a unit of its own
        shard(head)
    shard(hf)
    return model


def shard_model_fsdp1(model: nn.Module, device: torch.device) -> nn.Module:
    """Wrap a frozen Hugging Face model with FSDP1 (``FullyShardedDataParallel``) over the default process group:
    each decoder layer (:func:`decoder_layers`) a unit of its own, the rest (embeddings, final norm, LM or score
    head) the root unit. For the evaluation only (``--shard fsdp1``, outside Lightning, whose FSDP1 cannot run
    the training stages: :func:`check_strategy`).

    ``generate`` and lit_rlhf's scoring run on the wrapped model itself (the returned root's ``.module``), not
    through the root's forward (``generate`` is the model's method, and a classifier's head is applied to the
    hidden states outside it), so the root's own weights are only whole inside
    ``FullyShardedDataParallel.summon_full_params(root, recurse=False, writeback=False)``; the layers gather
    theirs in each of their forwards. ``use_orig_params=True`` keeps the model's own parameters (views into the
    flat shards), ``device_id`` moves the model there (the CPU works too, over gloo).

    Args:
        model: a transformers model (or a peft model around one), frozen, in eval mode, not quantized.
        device: this process's device (:func:`lit_rlhf.hf.processes.device`).

    Returns:
        The root ``FullyShardedDataParallel`` module around ``model``.

    Raises:
        ConfigError: a 4/8-bit model (FSDP1 would flatten its bitsandbytes weights).
    """
    from torch.distributed.fsdp import FullyShardedDataParallel
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy

    if is_quantized(model):
        raise ConfigError("--shard fsdp1 cannot shard a 4/8-bit model: use --shard fsdp2.")
    layers = {type(layer) for layer in decoder_layers(model)}
    return FullyShardedDataParallel(
        model, auto_wrap_policy=ModuleWrapPolicy(layers), device_id=device, use_orig_params=True
    )


def shard_roles(
    roles: dict[str, nn.Module | None],
    mesh,
    frozen_roles: Literal["shard", "replicate"] = "shard",
    activation_checkpointing: bool = False,
    **options: Any,
) -> list[str]:
    """:func:`shard_model` on every transformers model among ``roles`` (role name → model; ``None`` and other
    modules, e.g. a shared base's adapter roles, are skipped; a model held by two roles is sharded once).

    Frozen models are sharded too unless ``frozen_roles="replicate"``; activation checkpointing applies to the
    trained ones; a 4/8-bit model keeps its quantized weights whole on every process (:func:`shard_model`).
    ``options``: ``mixed_precision``, ``reshard_after_forward``. Returns the sharded role names.
    """
    from transformers import PreTrainedModel

    done: set[int] = set()
    sharded = []
    for role, model in roles.items():
        hf = unwrap_peft(model) if isinstance(model, nn.Module) else None
        if not isinstance(hf, PreTrainedModel) or id(hf) in done:
            continue
        done.add(id(hf))
        name_8bit_state_keys(hf)  # a replicated 8-bit role is saved in the same (sharded) checkpoint
        trainable = any(p.requires_grad for p in model.parameters())
        if not trainable and frozen_roles == "replicate":
            continue
        shard_model(model, mesh, activation_checkpointing=trainable and activation_checkpointing, **options)
        sharded.append(role)
    return sharded


def name_8bit_state_keys(model: nn.Module) -> None:
    """Let torch.distributed.checkpoint walk the state-dict keys of bitsandbytes' 8-bit layers.

    ``Linear8bitLt`` saves its row scales and their layout as ``<layer>.SCB`` and ``<layer>.weight_format``, names
    that are not attributes of the layer (the scales live on its weight, ``weight.SCB``).
    ``get_model_state_dict`` and ``set_model_state_dict`` (FSDP2 checkpoints, :func:`full_state_dict`) resolve
    every key by ``getattr`` along its dots and fail on them (``'Linear8bitLt' object has no attribute 'SCB'``).
    Each such layer gets the two names as plain attributes, ``None``: found by that walk and read by nothing
    (bitsandbytes reads ``weight.SCB`` and ``state.SCB``); the saved values still come from the layer's own
    ``_save_to_state_dict``. Idempotent; a model without 8-bit layers is left as it is.
    """
    for module in model.modules():
        if type(module).__module__.startswith("bitsandbytes") and type(module).__name__ == "Linear8bitLt":
            for key in ("SCB", "weight_format"):
                if not hasattr(module, key):
                    module.__dict__[key] = None


def shard_leftover_trainable(root: nn.Module, mesh, mixed_precision: MixedPrecision = None) -> list[str]:
    """``fully_shard`` every module that holds trainable weights outside a sharded model (a value head, a
    shared base's critic head), on its own: called where it is called. Returns the sharded modules' names.

    Raises:
        RuntimeError: a trainable weight is still unsharded (it would train separately on each process).
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    owners = [
        (name, module)
        for name, module in root.named_modules()
        if name and any(p.requires_grad and not is_dtensor(p) for p in module.parameters(recurse=False))
    ]
    kwargs: dict[str, Any] = {"mesh": mesh}
    if mixed_precision is not None:
        kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=_DTYPES[mixed_precision], reduce_dtype=torch.float32)
    for _, module in owners:
        # a module holding a trained weight beside a bitsandbytes one keeps the latter whole, as shard_model does
        fully_shard(module, ignored_params=quantized_params(module) or None, **kwargs)
    left = [n for n, p in root.named_parameters() if p.requires_grad and not is_dtensor(p)]
    if left:
        raise RuntimeError(
            f"{len(left)} trainable weights are not sharded, e.g. {left[:3]}: each process would train its own copy."
        )
    return [name for name, _ in owners]


def forwards_of_the_busiest(trainer, forwards: int, device: torch.device) -> int:
    """The most ``forwards`` of any process. Sharded weights are gathered inside every forward, a collective, so
    a no-grad pass over each process's own share of rows (DPO's reference cache, reward normalisation) must run
    that many forwards on every process, repeating a chunk where it has fewer (on one process: ``forwards``)."""
    if trainer.world_size == 1:
        return forwards
    return int(trainer.strategy.reduce(torch.tensor(float(forwards), device=device), reduce_op="max"))


def is_dtensor(tensor: torch.Tensor) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(tensor, DTensor)


def is_sharded(module: nn.Module | None) -> bool:
    """Whether any weight of ``module`` is an FSDP2 shard (a ``DTensor``)."""
    return module is not None and any(is_dtensor(p) for p in module.parameters())


def full_state_dict(model: nn.Module, keys: Iterable[str] | None = None) -> dict[str, torch.Tensor]:
    """The whole (unsharded) state dict of an FSDP2-sharded ``model``, on CPU, on rank 0 only (``{}`` elsewhere).

    A collective: every process must call it. Each tensor is gathered and moved to CPU one at a time
    (``cpu_offload``), so no process holds a second full copy on its device. ``keys``: keep only these.
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    name_8bit_state_keys(model)
    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if keys is not None:
        wanted = set(keys)
        state = {k: v for k, v in state.items() if k in wanted}
    return state
