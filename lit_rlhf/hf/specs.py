"""Typed, YAML-friendly descriptions of a model to load.

These dataclasses are the config schema of the one loading path (:mod:`lit_rlhf.hf.loading`): every stage's
LightningModule takes a :class:`ModelSpec` per model role, and the
:class:`~lit_rlhf.callbacks.LoRAQuantization` callback fills in :attr:`ModelSpec.lora` and
:attr:`ModelSpec.quantization` before the models are built. Attribute docstrings appear in ``--help``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch

DTypeName = Literal["auto", "float32", "bfloat16", "float16"]


@dataclass
class LoraSpec:
    """Low-rank adapters (peft ``LoraConfig``) for a model."""

    r: int = 16
    """Adapter rank."""
    alpha: int = 32
    """LoRA scaling numerator (the update is scaled by ``alpha / r``)."""
    dropout: float = 0.0
    """Dropout on the adapter input. Keep 0 for PPO: dropout makes the first PPO ratio differ from 1."""
    target_modules: str | list[str] = "all-linear"
    """Module names to adapt, or ``all-linear`` for every linear layer except the output head."""
    bias: Literal["none", "all", "lora_only"] = "none"
    """Which biases to train."""

    def __post_init__(self) -> None:
        if self.r < 1:
            raise ValueError(f"lora.r must be >= 1, got {self.r}")
        if not self.alpha > 0:
            raise ValueError(f"lora.alpha must be > 0, got {self.alpha}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"lora.dropout must lie in [0, 1), got {self.dropout}")


@dataclass
class QuantizationSpec:
    """bitsandbytes weight quantization, applied by ``from_pretrained`` (QLoRA when combined with LoRA)."""

    bits: Literal[4, 8] = 4
    """4-bit (NF4/FP4) or 8-bit (LLM.int8) weights."""
    quant_type: Literal["nf4", "fp4"] = "nf4"
    """4-bit data type."""
    double_quant: bool = True
    """Quantize the quantization constants too (saves about 0.4 bits per parameter)."""
    compute_dtype: Literal["float32", "bfloat16", "float16"] = "bfloat16"
    """dtype of the matmuls of the 4-bit layers."""
    skip_modules: list[str] | None = None
    """Modules kept in full precision besides the output head, which transformers always keeps."""


@dataclass
class ModelSpec:
    """Where a model comes from and how to load it.

    Example (YAML)::

        name_or_path: Qwen/Qwen2.5-0.5B      # hub id or local folder
        dtype: bfloat16
        lora: {r: 16, alpha: 32}
        quantization: {bits: 4}
    """

    name_or_path: str
    """Hugging Face hub id or local folder holding ``config.json`` and the weights."""
    tokenizer: str | None = None
    """Tokenizer hub id or folder, when it differs from ``name_or_path``."""
    revision: str | None = None
    """Hub revision (branch, tag or commit)."""
    dtype: DTypeName = "float32"
    """Weights dtype. With LoRA + 4-bit, trainable adapters and norms are kept in float32 regardless."""
    attn_implementation: str | None = None
    """``eager``, ``sdpa``, ``flash_attention_2``...; ``None`` lets transformers pick."""
    trust_remote_code: bool = False
    """Run modelling code shipped with the checkpoint. Off unless you trust its author."""
    dropout: float | None = 0.0
    """Overrides every dropout probability of the model (config fields and ``nn.Dropout`` modules);
    ``None`` keeps the checkpoint's. RLHF needs 0 (docs/conventions.md#dropout)."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass to save memory."""
    lora: LoraSpec | None = None
    """Train low-rank adapters instead of all weights."""
    quantization: QuantizationSpec | None = None
    """Load the frozen base weights in 4 or 8 bits."""
    extra_kwargs: dict = field(default_factory=dict)
    """Passed to ``from_pretrained`` as-is (e.g. ``{"low_cpu_mem_usage": true}``)."""

    def __post_init__(self) -> None:
        if not self.name_or_path:
            raise ValueError("ModelSpec.name_or_path must name a hub id or a local folder")
        if self.dropout is not None and not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must lie in [0, 1) or be null, got {self.dropout}")

    @property
    def tokenizer_path(self) -> str:
        return self.tokenizer or self.name_or_path


# Specs are saved in checkpoints' hyper-parameters; allow them in `torch.load(weights_only=True)` so
# checkpoints never need the unsafe unpickler.
torch.serialization.add_safe_globals([ModelSpec, LoraSpec, QuantizationSpec])
