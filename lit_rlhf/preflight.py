"""Checks a ``fit`` runs before it moves an earlier run's outputs aside (docs/conventions.md#validate-then-move).

A re-run that fails on bad input must leave the earlier export where downstream configs read it
(``<stage>/export``). So everything that can be checked without loading model weights is checked first: the
Trainer options manual optimisation cannot take, each model folder and its tokenizer, the training and
validation data (read and tokenized: ``datamodule.setup("fit")``, which Lightning's own call then finds done),
the reward function and the extra data files a module names. Nothing here is done twice in a normal run: the
first role's tokenizer and the tokenized data are kept; the other roles' tokenizers are small files.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lit_rlhf.errors import ConfigError, DataError, LitRLHFError

__all__ = ["check_inputs", "check_manual_optimization"]

#: tokenizer role of a model role other than the first (whose role its module says): see load_tokenizer
_TOKENIZER_ROLES = {"critic": "critic", "reward_model": "reward_model"}


def check_manual_optimization(trainer, model) -> None:
    """Refuse the Trainer options that a module using manual optimisation cannot take, naming its own.

    lit_rlhf modules clip gradients and accumulate micro-batches themselves (one optimizer step = one batch:
    :class:`~lit_rlhf.models.base.RLHFModule`). Lightning refuses the same settings, with a traceback, once
    ``fit`` has started; the conditions are Lightning's (``configuration_validator``).

    Raises:
        ConfigError: ``trainer.gradient_clip_val`` > 0 or ``trainer.accumulate_grad_batches`` != 1.
    """
    if getattr(model, "automatic_optimization", True):
        return
    init_args = _init_args(model)
    if trainer.gradient_clip_val is not None and trainer.gradient_clip_val > 0:
        raise ConfigError(
            f"trainer.gradient_clip_val={trainer.gradient_clip_val}: lit_rlhf modules use manual optimisation and "
            "clip gradients themselves; remove it and set model.init_args.max_grad_norm instead"
        )
    if trainer.accumulate_grad_batches != 1:
        micro = _option_path(init_args, "micro_batch_size") or "micro_batch_size"
        raise ConfigError(
            f"trainer.accumulate_grad_batches={trainer.accumulate_grad_batches}: lit_rlhf modules use manual "
            "optimisation and accumulate themselves (one optimizer step = one batch of data.init_args.batch_size); "
            f"remove it and set model.init_args.{micro} to the rows per forward pass instead"
        )


def check_inputs(model, datamodule) -> None:
    """Load or read every input of ``fit`` that needs no model weights; raise the first problem found.

    Checked: each model folder (exists, holds a ``config.json`` or an adapter) and its tokenizer (files, a
    vocabulary), the first role's tokenizer kept for the run; the data module's rows, read and tokenized; a
    ``reward.fn`` importable; PPO's ``ptx.data``, ``reward.normalize_on`` and ``shared_base.reward_adapter``
    present.

    Raises:
        ConfigError, DataError: the messages name the file or folder and the option to change.
    """
    from lit_rlhf.datamodules.base import RLHFDataModule
    from lit_rlhf.models.base import RLHFModule

    data = datamodule if isinstance(datamodule, RLHFDataModule) else None
    if isinstance(model, RLHFModule):
        try:
            _check_models(model)
            problem = None
        except LitRLHFError as exc:
            problem = exc
        if problem is not None:
            # fit reads the rows before it loads a tokenizer: a bad data file is reported first (raised out of
            # the handler, so the report does not take the model's error for its cause)
            if data is not None:
                data.read_splits()
            raise problem
        _check_module_extras(model)
    if data is not None:
        if data.tokenizer_name is None and isinstance(model, RLHFModule):
            # what the data module takes from the Trainer's module once fit attaches them (the same object)
            data.tokenizer = model.tokenizer
        data.setup("fit")


def _check_models(model) -> None:
    from lit_rlhf.hf.loading import check_local_source, load_tokenizer

    seen: set[tuple[str, str | None]] = set()
    for i, (role, spec) in enumerate(model.model_specs().items()):
        option = f"model.init_args.{role}"
        try:
            check_local_source(spec.name_or_path)
        except ConfigError as exc:
            raise ConfigError(f"{exc} ({option}.name_or_path)") from None
        folder = Path(spec.name_or_path).expanduser()
        model_files = ("config.json", "adapter_config.json")
        if folder.is_dir() and not any((folder / f).is_file() for f in model_files):
            raise ConfigError(
                f"{spec.name_or_path}: no config.json, not a Hugging Face model folder "
                f"(set {option}.name_or_path to an export or a hub id)"
            )
        key = (spec.tokenizer_path, spec.revision)
        if key in seen:  # e.g. PPO's reference, a copy of the policy's spec
            continue
        seen.add(key)
        if i == 0:
            # the module's own tokenizer (property `tokenizer`), loaded once here with the option to name
            if model._tokenizer is None:
                model._tokenizer = load_tokenizer(spec, role=model.tokenizer_role, option=f"{option}.tokenizer")
        else:
            load_tokenizer(spec, role=_TOKENIZER_ROLES.get(role, "policy"), option=f"{option}.tokenizer")


def _check_module_extras(model) -> None:
    from lit_rlhf.imports import import_callable

    reward = getattr(model, "reward", None)
    if isinstance(getattr(reward, "fn", None), str):
        import_callable(reward.fn)
    if getattr(reward, "normalize_on", None) is not None:
        _check_data_source(reward.normalize_on, "model.init_args.reward.normalize_on")
    ptx = getattr(model, "ptx", None)
    if getattr(ptx, "data", None) is not None:
        _check_data_source(ptx.data, "model.init_args.ptx.data")
    adapter = getattr(getattr(model, "shared_base", None), "reward_adapter", None)
    if adapter is not None and not (Path(adapter).expanduser() / "adapter_config.json").is_file():
        raise ConfigError(
            f"{adapter}: no adapter_config.json, not a LoRA adapter folder (model.init_args.shared_base.reward_adapter:"
            " a RewardModule export with merge_adapters: false)"
        )


def _check_data_source(source: str, option: str) -> None:
    """Refuse a local data file that does not exist (a hub dataset name is left to the reader)."""
    from lit_rlhf.datamodules.base import LOCAL_SUFFIXES
    from lit_rlhf.hf.loading import looks_local

    path = Path(source).expanduser()
    if (path.suffix in LOCAL_SUFFIXES or looks_local(source)) and not path.exists():
        raise DataError(f"{source}: no such file ({option})")


def _init_args(model) -> dict[str, Any]:
    hparams = getattr(model, "hparams", None)
    return dict(hparams) if hparams is not None else {}


def _option_path(args: dict[str, Any], name: str, prefix: str = "") -> str | None:
    """Dotted path of the first option called ``name`` in ``args`` (nested dicts and dataclasses)."""
    from dataclasses import asdict, is_dataclass

    for key, value in args.items():
        if key == name:
            return prefix + key
        if is_dataclass(value) and not isinstance(value, type):
            value = asdict(value)
        if isinstance(value, dict):
            found = _option_path(value, name, f"{prefix}{key}.")
            if found is not None:
                return found
    return None
