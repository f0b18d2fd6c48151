"""LoRA / 4-bit loading as a callback that works in any Trainer, for every stage."""

from __future__ import annotations

import lightning as L
from lightning.pytorch.callbacks import Callback

from lit_rlhf.hf.specs import LoraSpec, QuantizationSpec


class LoRAQuantization(Callback):
    """Switch LoRA adapters and/or bitsandbytes quantization on for some of a module's models.

    A callback's ``setup`` runs before the module's ``configure_model``, so this callback only edits the
    module's :class:`~lit_rlhf.hf.specs.ModelSpec` objects; the one loading path
    (:func:`lit_rlhf.hf.load_model`) then builds the models accordingly. Use one instance per combination,
    e.g. QLoRA for the PPO policy and critic, plus a second instance with only ``quantization`` for the
    frozen reward model.

    Args:
        lora: adapters to add; ``None`` leaves the specs' own setting.
        quantization: quantization of the base weights; ``None`` leaves the specs' own setting.
        roles: which of the module's models to change (see its ``model_specs()``); ``None`` means its
            trainable roles (``model`` for SFT and RM, ``policy`` and ``critic`` for PPO).

    YAML::

        trainer:
          callbacks:
            - class_path: lit_rlhf.callbacks.LoRAQuantization
              init_args: {lora: {r: 16, alpha: 32}, quantization: {bits: 4}}
    """

    def __init__(
        self,
        lora: LoraSpec | None = None,
        quantization: QuantizationSpec | None = None,
        roles: list[str] | None = None,
    ) -> None:
        if lora is None and quantization is None:
            raise ValueError("LoRAQuantization needs `lora`, `quantization` or both.")
        self.lora = lora
        self.quantization = quantization
        self.roles = roles

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        apply_model_loading(pl_module, self.lora, self.quantization, self.roles)


def apply_model_loading(
    pl_module: L.LightningModule,
    lora: LoraSpec | None,
    quantization: QuantizationSpec | None,
    roles: list[str] | None = None,
) -> None:
    """Write ``lora``/``quantization`` into the specs of ``roles`` of ``pl_module`` (before its models exist)."""
    specs = pl_module.model_specs()
    targets = list(roles) if roles is not None else list(pl_module.trainable_roles)
    unknown = [r for r in targets if r not in specs]
    if unknown:
        raise ValueError(f"{type(pl_module).__name__} has no model role {unknown}; its roles are {sorted(specs)}.")
    changes_needed = any(
        (lora is not None and specs[r].lora != lora)
        or (quantization is not None and specs[r].quantization != quantization)
        for r in targets
    )
    if pl_module.models_built and changes_needed:
        raise RuntimeError(
            "LoRAQuantization must run before the models are built (configure_model); "
            "attach it to the Trainer rather than calling it after fit/validate started."
        )
    for role in targets:
        if lora is not None:
            specs[role].lora = lora
        if quantization is not None:
            specs[role].quantization = quantization
