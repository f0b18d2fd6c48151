"""``python -m lit_rlhf.plan``: will this stage fit? Memory per role and per phase, before any weight is loaded.

Reads the same YAML as ``python -m lit_rlhf fit`` (stacked ``--config`` files, ``--model.init_args...``
overrides) with the same parser, instantiates the LightningModule and DataModule (which load nothing), applies
the ``LoRAQuantization`` callbacks of the config to the module's model specs, and reads only ``config.json`` of
each model (``transformers.AutoConfig``). The arithmetic is :mod:`lit_rlhf.planning.memory`.

    python -m lit_rlhf.plan --config configs/examples/ppo-qlora.yaml --device_memory 24GiB

Planner options (everything else goes to the stage's parser): ``--device_memory`` (``24GiB``, ``80GB``,
``16000MiB``), ``--target cuda|cpu`` (what the peak is measured as; default from ``trainer.accelerator``),
``--shared_base`` (PPO: plan one base with adapters for every role), ``--responses_per_prompt`` (RM, DPO:
sequences per prompt, K; default 2), ``--strategy fsdp2|ddp|single`` with ``--devices`` (per node) and
``--num_nodes`` (default: the YAML's ``trainer``): under FSDP2 the figures are per device, each holding
``1/(devices·nodes)`` of the sharded roles plus the layers gathered at one time. The roles of a PPO,
critic-free or DPO run are the module's own description (:class:`lit_rlhf.models.roles.Roles`), the one its
``build_models`` reads.
"""

from __future__ import annotations

import argparse
import math
import re
import sys
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from lit_rlhf.planning.memory import (
    DTYPE_BYTES,
    GiB,
    MemoryPlan,
    PlanError,
    RoleSetup,
    Run,
    Workload,
    lora_parameters,
    suggestions,
    weight_bytes,
)

_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12}
_UNITS.update({"kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40})
#: optimizer states per trainable parameter, by optimizer class name
_OPTIMIZER_STATES = {"AdamW": 2, "Adam": 2, "RMSprop": 1, "Adagrad": 1, "SGD": 0}


def parse_size(text: str) -> int:
    """``"24GiB"`` → bytes (``GB`` is 10⁹, ``GiB`` 2³⁰; a bare number is bytes)."""
    match = re.fullmatch(r"\s*([0-9.]+)\s*([a-zA-Z]*)\s*", text)
    if not match or match.group(2).lower() not in _UNITS:
        raise argparse.ArgumentTypeError(f"not a memory size: {text!r} (e.g. 24GiB, 80GB, 16000MiB)")
    return int(float(match.group(1)) * _UNITS[match.group(2).lower()])


def format_bytes(n: float) -> str:
    if n == 0:
        return "-"
    if n >= GiB:
        return f"{n / GiB:.2f} GiB"
    return f"{n / 2**20:.1f} MiB"


# ---- reading the YAML ------------------------------------------------------------------------------------------
def _read_config(cli_args: list[str]) -> tuple[Any, Any, Any]:
    """``(config namespace, module, datamodule)`` from the stage's parser; the Trainer is never built."""
    from lit_rlhf.cli import LitRLHFCLI
    from lit_rlhf.datamodules.base import RLHFDataModule
    from lit_rlhf.models.base import RLHFModule

    class PlanCLI(LitRLHFCLI):
        def _set_seed(self) -> None:  # nothing random happens
            pass

        def instantiate_classes(self) -> None:
            cfg = self.config.clone()
            trainer = cfg.trainer
            # callbacks that change how models load are kept; the rest (and loggers, strategies, plugins) may need
            # a GPU, a network or a directory, and change no memory figure this planner computes
            trainer.callbacks = [c for c in (trainer.callbacks or []) if _is_model_loading(c)]
            trainer.logger, trainer.plugins, trainer.profiler, trainer.strategy = False, None, None, "auto"
            instantiate = getattr(self.parser, "instantiate", None) or self.parser.instantiate_classes
            init = instantiate(cfg)
            self.model, self.datamodule = init.get("model"), init.get("data")
            self.loading_callbacks = init.trainer.callbacks or []

    argv, sys.argv = sys.argv, sys.argv[:1]  # the arguments are `cli_args`; LightningCLI warns when both are set
    try:
        cli = PlanCLI(
            RLHFModule,
            RLHFDataModule,
            subclass_mode_model=True,
            subclass_mode_data=True,
            auto_configure_optimizers=False,
            args=cli_args,
            run=False,
            parser_kwargs={"exit_on_error": False},
        )
    except Exception as error:  # noqa: BLE001  (jsonargparse's errors carry the key; show them on one line)
        raise PlanError(f"cannot read the config: {_one_line(str(error))}") from None
    finally:
        sys.argv = argv
    from lit_rlhf.callbacks.model_loading import apply_model_loading

    for callback in cli.loading_callbacks:
        apply_model_loading(cli.model, callback.lora, callback.quantization, callback.roles)
    return cli.config, cli.model, cli.datamodule


def _is_model_loading(callback: Any) -> bool:
    return str(getattr(callback, "class_path", "")).rsplit(".", 1)[-1] == "LoRAQuantization"


def _one_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return " ".join(lines)[:400]


def _architecture(spec, name: str):
    from transformers import AutoConfig

    from lit_rlhf.planning.memory import Architecture

    where = f"{name} ({spec.name_or_path})"
    folder = Path(spec.name_or_path)
    if folder.is_dir() and not (folder / "config.json").is_file():
        raise PlanError(f"{where}: no config.json in {folder}")
    try:
        config = AutoConfig.from_pretrained(
            spec.name_or_path, revision=spec.revision, trust_remote_code=spec.trust_remote_code
        )
    except (OSError, ValueError, KeyError) as error:
        message = _one_line(str(error))
        match = re.search(r"model type `([^`]*)`", message)
        if match:
            raise PlanError(f"{where}: unknown architecture {match.group(1)!r} (config.json model_type)") from None
        raise PlanError(f"{where}: cannot read config.json: {message[:200]}") from None
    return Architecture.from_config(config, f"{name} ({spec.name_or_path})"), config


def _role(name: str, spec, kind: str, trainable: bool, sixteen_bit: bool) -> RoleSetup:
    arch, config = _architecture(spec, name)
    dtype = spec.dtype
    if dtype == "auto":
        dtype = str(getattr(config, "dtype", None) or getattr(config, "torch_dtype", None) or "float32")
        dtype = dtype.removeprefix("torch.")
    dtype_bytes = DTYPE_BYTES.get(dtype, 4)
    compute = DTYPE_BYTES[spec.quantization.compute_dtype] if spec.quantization is not None else dtype_bytes
    return RoleSetup(
        name=name,
        arch=arch,
        kind=kind,
        dtype_bytes=dtype_bytes,
        activation_bytes=2 if sixteen_bit else compute,
        trainable=trainable,
        lora=spec.lora if trainable else None,
        quantization=spec.quantization,
        gradient_checkpointing=spec.gradient_checkpointing and trainable,
        eager_attention=spec.attn_implementation == "eager",
    )


def _engine_memory(
    engine, policy: RoleSetup, target: str, notes: list[str], device_memory: int | None = None
) -> dict[str, int]:
    """The ``Workload`` fields of a colocated vLLM engine: the policy's weights in the engine's dtype (a 4-bit base
    served dequantized) and its KV-cache budget: ``kv_cache_memory_bytes`` when set; else on a GPU what vLLM takes
    of ``device_memory`` (``gpu_memory_utilization`` of the device holds its weights and its KV cache), on a CPU
    VLLMEngine's 512 MiB default."""
    from lit_rlhf.hf.vllm_engine import VLLMEngine  # imports without vLLM installed

    if not isinstance(engine, VLLMEngine):
        return {}
    dtype_bytes = DTYPE_BYTES.get(engine.dtype or "", 2 if policy.quantization is not None else policy.dtype_bytes)
    weights = weight_bytes(policy.arch, "causal_lm", dtype_bytes)
    if policy.lora is not None:
        weights += lora_parameters(policy.arch, policy.lora) * dtype_bytes
    cache = engine.kv_cache_memory_bytes
    if cache is None and target == "cpu":
        cache = 512 * 2**20  # VLLMEngine's CPU default
    elif cache is None and device_memory is not None:
        # vLLM profiles its forward, then fills gpu_memory_utilization x the device, less its weights, with KV blocks
        cache = max(0, int(engine.gpu_memory_utilization * device_memory) - weights)
        notes.append(
            f"vLLM's KV cache: gpu_memory_utilization={engine.gpu_memory_utilization} of {format_bytes(device_memory)}"
            f" less its weights = {format_bytes(cache)}"
        )
    elif cache is None:
        cache = 0
        notes.append(
            f"vLLM's KV cache is sized by gpu_memory_utilization={engine.gpu_memory_utilization} of the device: "
            "not counted without --device_memory; set kv_cache_memory_bytes to count it"
        )
    return {"engine_weights": weights, "engine_cache": cache}


def shared_base_from_config(config: Any) -> bool:
    """Whether the PPO YAML asks for a shared base: ``model.init_args.shared_base`` (truthy: ``true`` or a
    mapping describing it)."""
    init_args = getattr(config.model, "init_args", None)
    return bool(getattr(init_args, "shared_base", None)) if init_args is not None else False


def sharding_from_config(
    config: Any, strategy: str | None = None, devices: int | None = None, num_nodes: int | None = None
) -> tuple[int, bool, list[str]]:
    """``(shards, shard_frozen, notes)``: over how many processes FSDP2 shards the weights (1: none) and whether
    the frozen roles are sharded too, from the planner's ``--strategy``/``--devices``/``--num_nodes`` or the YAML
    (``trainer.strategy``: lit_rlhf's ``FSDP2Strategy`` or a ``ModelParallelStrategy``; ``trainer.devices``,
    ``trainer.num_nodes``)."""
    trainer = config.trainer
    class_path = str(getattr(trainer.strategy, "class_path", trainer.strategy) or "")
    if strategy is None:
        fsdp2 = class_path.endswith(("FSDP2Strategy", "ModelParallelStrategy"))
        strategy = "fsdp2" if fsdp2 else ("ddp" if "ddp" in class_path.lower() else "single")
    notes = []
    if strategy == "single" and ("deepspeed" in class_path.lower() or "fsdp" in class_path.lower()):
        notes.append(
            f"strategy {class_path}: refused by lit_rlhf (use configs/strategies/fsdp2.yaml), planned unsharded"
        )
    if strategy != "fsdp2":
        return 1, True, notes
    if devices is None:
        devices = trainer.devices if isinstance(trainer.devices, int) and trainer.devices > 0 else None
    if devices is None:
        raise PlanError(f"FSDP2 shards over every device: give --devices (trainer.devices is {trainer.devices!r})")
    nodes = num_nodes or int(getattr(trainer, "num_nodes", 1) or 1)
    init_args = getattr(trainer.strategy, "init_args", None)
    frozen = str(getattr(init_args, "frozen_roles", "shard") or "shard") if init_args is not None else "shard"
    return devices * nodes, frozen == "shard", notes


def run_from_config(
    config: Any,
    module: Any,
    data: Any,
    target: str | None,
    shared_base: bool,
    responses_per_prompt: int,
    strategy: str | None = None,
    devices: int | None = None,
    num_nodes: int | None = None,
    device_memory: int | None = None,
) -> tuple[Run, list[str]]:
    """The :class:`~lit_rlhf.planning.memory.Run` a parsed stage config describes, with notes for the reader.
    ``strategy`` (``fsdp2``, ``ddp``, ``single``), ``devices`` (per node) and ``num_nodes`` override the YAML's
    (:func:`sharding_from_config`): the figures are per device. ``device_memory``: the device's bytes (what a
    colocated vLLM engine's ``gpu_memory_utilization`` is a fraction of)."""
    from lit_rlhf.models import DPOModule, PolicyGradientModule, RewardModule, SFTModule

    trainer = config.trainer
    precision = str(trainer.precision or "32-true")
    sixteen_bit = "16" in precision
    accelerator = str(trainer.accelerator or "auto")
    target = target or ("cpu" if accelerator == "cpu" else "cuda")
    notes = []
    optimizer = getattr(getattr(config.model, "init_args", None), "optimizer", None)
    opt_name = str(getattr(optimizer, "class_path", "torch.optim.AdamW")).rsplit(".", 1)[-1]
    states = _OPTIMIZER_STATES.get(opt_name, 2)
    if opt_name not in _OPTIMIZER_STATES:
        notes.append(f"optimizer {opt_name}: assumed 2 states per parameter like AdamW")
    if opt_name == "SGD" and getattr(getattr(optimizer, "init_args", None), "momentum", 0):
        states = 1
    shards, shard_frozen, sharding_notes = sharding_from_config(config, strategy, devices, num_nodes)
    notes += sharding_notes
    common = dict(optimizer_states=states, target=target, shards=shards, shard_frozen=shard_frozen)
    specs = module.model_specs()
    role = lambda name, kind, trainable: _role(name, specs[name], kind, trainable, sixteen_bit)  # noqa: E731
    if isinstance(module, PolicyGradientModule):
        rollout = data.batch_size
        group_size = module.algo.group_size
        rows = rollout * group_size  # responses per iteration
        mini = math.ceil(rows / module.update.num_mini_batches)
        shared = shared_base or shared_base_from_config(config)
        workload = Workload(
            "ppo",
            micro_batch=module.update.micro_batch_size or mini,
            rollout_batch=rollout,
            prompt_len=data.max_prompt_length,
            new_tokens=module.sampling.max_new_tokens,
            forward_batch=module.update.forward_batch_size or rows,
            shared_base=shared,
            group_size=group_size,
            value_function=module.roles.value_function,
            **common,
        )
        # the same role description the module builds its models from (lit_rlhf.models.roles)
        described = module.roles
        roles = {"policy": role("policy", "causal_lm", True)}
        if described.loads_reference:  # an explicit reference, or a frozen copy of a policy without LoRA
            roles["reference"] = role("reference", "causal_lm", False)
        if described.value_source == "critic" and not shared:
            roles["critic"] = role("critic", "sequence_classifier", True)
        if described.reward_source == "model":
            roles["reward_model"] = role("reward_model", "sequence_classifier", False)
        elif shared and described.reward_source == "adapter":
            # the reward adapter of a shared base has no spec of its own: ppo_roles lays it out on the policy's
            # base (its LoRA weights, its score forward)
            roles["reward_model"] = roles["policy"]
        if module.ptx is not None:
            notes.append("PPO-ptx batches are not counted")
        workload = replace(workload, **_engine_memory(module.engine, roles["policy"], target, notes, device_memory))
    elif isinstance(module, DPOModule):
        described = module.roles
        precomputed = bool(module.precompute_ref_logprobs)
        workload = Workload(
            "dpo",
            micro_batch=module.micro_batch_size or data.batch_size,
            seq_len=data.max_length,
            responses_per_prompt=responses_per_prompt,
            value_function=False,
            reference_precomputed=precomputed,
            **common,
        )
        roles = {"policy": role("policy", "causal_lm", True)}
        if described.loads_reference:
            roles["reference"] = role("reference", "causal_lm", False)
        elif described.reference_source == "disabled_adapter":
            frozen = dict(trainable=False, lora=None, gradient_checkpointing=False, shares_base_with="policy")
            roles["reference"] = replace(roles["policy"], name="reference", **frozen)
        if precomputed:
            notes.append("reference log-probs precomputed once before training: no reference forward per step")
    elif isinstance(module, (SFTModule, RewardModule)):
        stage = "sft" if isinstance(module, SFTModule) else "rm"
        kind = "causal_lm" if stage == "sft" else "sequence_classifier"
        workload = Workload(
            stage,
            micro_batch=module.micro_batch_size or data.batch_size,
            seq_len=data.max_length,
            responses_per_prompt=responses_per_prompt,
            **common,
        )
        roles = {"model": role("model", kind, True)}
    else:
        raise PlanError(
            f"unknown model class {type(module).__module__}.{type(module).__name__}: the planner knows "
            "SFTModule, RewardModule, DPOModule and the policy-gradient modules (PolicyGradientModule, PPOModule, "
            "CriticFreeModule)"
        )
    return Run(workload, roles), notes


# ---- printing --------------------------------------------------------------------------------------------------
COLUMNS = ("weights", "adapters", "gradients", "optimizer", "activations", "act. no ckpt", "act. ckpt", "logits")


def render(plan: MemoryPlan, run: Run, device_memory: int) -> str:
    """The plan as a Markdown table, the phases, the peak and the verdict."""
    w = run.workload
    kind = [] if w.value_function else ["critic-free"]
    kind += ["shared base"] if w.shared_base else []
    lines = [f"stage: {w.stage}" + (f" ({', '.join(kind)})" if kind else "") + f", target: {w.target}"]
    if w.stage == "ppo":
        group = f" x {w.group_size} responses" if w.group_size > 1 else ""
        lines.append(
            f"rollout {w.rollout_batch} prompts{group} x ({w.prompt_len} prompt + {w.new_tokens} new tokens), "
            f"scoring chunks of {w.forward_batch}, training micro-batch {w.micro_batch}"
        )
    else:
        rows = (
            f"{w.micro_batch} prompts x {w.responses_per_prompt} responses"
            if w.stage in ("rm", "dpo")
            else w.micro_batch
        )
        lines.append(f"micro-batch {rows} x {w.seq_len} tokens")
    lines += ["", "| role | " + " | ".join(COLUMNS) + " | notes |", "|---" * (len(COLUMNS) + 2) + "|"]
    setups = {r.name: r for r in run.roles()}
    for p in plan.roles:
        setup = setups[p.name]
        notes = list(p.notes)
        if setup.quantization is not None and not setup.shares_base_with:
            notes.insert(0, f"{setup.quantization.bits}-bit")
        if setup.lora is not None:
            notes.insert(0, f"LoRA r={setup.lora.r}")
        if setup.value_head:
            notes.append("value head")
        if setup.gradient_checkpointing:
            notes.append("checkpointing")
        figures = (
            p.weights,
            p.adapters,
            p.gradients,
            p.optimizer,
            p.activations,
            p.activations_no_checkpointing,
            p.activations_checkpointing,
            p.logits,
        )
        cells = " | ".join(format_bytes(x) for x in figures)
        lines.append(f"| {p.name} | {cells} | {', '.join(notes)} |")
    lines.append("")
    if plan.kv_cache:
        lines.append(f"generation KV cache: {format_bytes(plan.kv_cache)}")
    for name, total in plan.phases.items():
        mark = "  <- peak" if name == plan.peak_phase else ""
        lines.append(f"phase {name}: {format_bytes(total)}{mark}")
    if w.target == "cuda":
        lines.append(f"+ CUDA context, workspaces and fragmentation: {format_bytes(plan.overhead)}")
    else:
        lines.append(
            f"+ the process's own memory besides tensors (Trainer, data, tokenizer): {format_bytes(plan.overhead)}"
        )
    lines += plan.notes
    verdict = "fits" if plan.fits(device_memory) else "does NOT fit"
    lines.append(f"peak: {format_bytes(plan.peak)} ({plan.peak_phase}) of {format_bytes(device_memory)}: {verdict}")
    if not plan.fits(device_memory):
        lines.append("suggestions:")
        for text, candidate in suggestions(run, device_memory):
            status = "fits" if candidate.fits(device_memory) else "does not fit"
            lines.append(f"  - {text}: peak {format_bytes(candidate.peak)} ({candidate.peak_phase}), {status}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m lit_rlhf.plan",
        description="Memory plan of a stage's YAML (per role and phase) and whether it fits a device.",
        epilog="Other arguments (--config FILE, --model.init_args...) are read as by `python -m lit_rlhf fit`.",
    )
    parser.add_argument("--device_memory", type=parse_size, default=parse_size("24GiB"), help="default 24GiB")
    parser.add_argument("--target", choices=("cuda", "cpu"), default=None, help="default from trainer.accelerator")
    parser.add_argument("--shared_base", action="store_true", help="PPO: one base with adapters for every role")
    parser.add_argument("--responses_per_prompt", type=int, default=2, help="RM, DPO: sequences per prompt (K)")
    parser.add_argument(
        "--strategy", choices=("fsdp2", "ddp", "single"), default=None, help="default from trainer.strategy"
    )
    parser.add_argument("--devices", type=int, default=None, help="devices per node (default trainer.devices)")
    parser.add_argument("--num_nodes", type=int, default=None, help="nodes (default trainer.num_nodes)")
    args, rest = parser.parse_known_args(argv)
    try:
        config, module, data = _read_config(list(rest))
        run, notes = run_from_config(
            config,
            module,
            data,
            args.target,
            args.shared_base,
            args.responses_per_prompt,
            args.strategy,
            args.devices,
            args.num_nodes,
            args.device_memory,
        )
        plan = run.plan()
    except PlanError as error:
        print(f"lit_rlhf.plan: error: {error}", file=sys.stderr)
        return 2
    print(render(plan, run, args.device_memory))
    for note in notes:
        print(f"note: {note}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
