"""Hugging Face glue: the one loading path (transformers + peft + bitsandbytes) and its specs."""

from lit_rlhf.hf.loading import (
    PAD_TOKEN,
    is_peft,
    load_model,
    load_tokenizer,
    save_pretrained_atomic,
    set_dropout,
    unwrap_peft,
)
from lit_rlhf.hf.specs import LoraSpec, ModelSpec, QuantizationSpec

__all__ = [
    "PAD_TOKEN",
    "LoraSpec",
    "ModelSpec",
    "QuantizationSpec",
    "is_peft",
    "load_model",
    "load_tokenizer",
    "save_pretrained_atomic",
    "set_dropout",
    "unwrap_peft",
]
