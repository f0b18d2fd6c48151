"""The one model-loading path shared by every stage: hub id or folder → tokenizer + model (+ bnb, + peft).

Nothing else in lit_rlhf calls ``from_pretrained``, bitsandbytes or peft. Order of operations:

1. ``AutoConfig`` with dropout overridden (docs/conventions.md#dropout) and the tokenizer's pad token id;
2. ``from_pretrained`` with ``BitsAndBytesConfig`` when quantizing (transformers keeps the output head in
   full precision and marks the model ``is_loaded_in_4bit``, which peft relies on);
3. embeddings resized when the tokenizer gained a pad token (docs/conventions.md#pad-token-distinct-from-eos);
4. ``prepare_model_for_kbit_training`` (fp32 norms, input grads) for quantized models that will train;
5. ``get_peft_model`` for LoRA; frozen roles get ``requires_grad_(False)`` and ``eval()``.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Literal

import torch
from torch import nn
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    BitsAndBytesConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from lit_rlhf.hf.specs import ModelSpec

log = logging.getLogger(__name__)

PAD_TOKEN = "<|pad|>"
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
ModelKind = Literal["causal_lm", "sequence_classifier"]
#: beside an unmerged reward-model adapter: its ``reward_bias``/``reward_scale`` (the merged export's config has them)
REWARD_NORMALIZATION_FILE = "reward_normalization.json"


def load_tokenizer(spec: ModelSpec | str, padding_side: Literal["left", "right"] = "right"):
    """Load a tokenizer and guarantee a pad token distinct from EOS.

    When the pad token is missing or equal to EOS, ``<|pad|>`` is added: if EOS doubled as padding, the EOS
    would be masked out of every loss and the model would never learn to stop
    (docs/conventions.md#pad-token-distinct-from-eos). Models loaded with :func:`load_model` resize their
    embeddings to match.
    """
    spec = ModelSpec(name_or_path=spec) if isinstance(spec, str) else spec
    tokenizer = AutoTokenizer.from_pretrained(
        spec.tokenizer_path, revision=spec.revision, trust_remote_code=spec.trust_remote_code
    )
    if tokenizer.eos_token is None:
        raise ValueError(f"Tokenizer of {spec.tokenizer_path!r} has no EOS token; lit_rlhf needs one to end responses.")
    if tokenizer.pad_token is None or tokenizer.pad_token_id == tokenizer.eos_token_id:
        tokenizer.add_special_tokens({"pad_token": PAD_TOKEN})
    tokenizer.padding_side = padding_side
    return tokenizer


def load_model(
    spec: ModelSpec,
    tokenizer: PreTrainedTokenizerBase,
    kind: ModelKind = "causal_lm",
    trainable: bool = True,
    device: torch.device | str | None = None,
    adapter_name: str = "default",
) -> nn.Module:
    """Build a model from ``spec``; the returned module is a peft ``PeftModel`` when ``spec.lora`` is set.

    Args:
        spec: where and how to load.
        tokenizer: from :func:`load_tokenizer`; its pad id is written to the config and its size to the
            embeddings.
        kind: ``causal_lm`` (SFT, policy, reference) or ``sequence_classifier`` (a scalar head, ``num_labels=1``:
            reward model and critic). A causal-LM checkpoint loads as a classifier with a fresh ``score`` head,
            i.e. the unembedding replaced by a scalar head (InstructGPT's RM).
        trainable: ``False`` freezes every parameter and sets eval mode (reference and reward roles).
        device: where quantized weights are placed at load time (bitsandbytes quantizes on placement);
            unquantized models load on CPU and the Trainer's strategy moves them.
        adapter_name: name of the LoRA adapter (a shared base carries several: :mod:`lit_rlhf.hf.shared_base`).
    """
    config = AutoConfig.from_pretrained(
        spec.name_or_path, revision=spec.revision, trust_remote_code=spec.trust_remote_code
    )
    if spec.dropout is not None:
        _override_config_dropout(config, spec.dropout)
    config.pad_token_id = tokenizer.pad_token_id
    kwargs: dict = dict(spec.extra_kwargs)
    if kind == "sequence_classifier":
        config.num_labels = 1
    if spec.dtype != "auto":
        kwargs["dtype"] = _DTYPES[spec.dtype]
    if spec.attn_implementation:
        kwargs["attn_implementation"] = spec.attn_implementation
    if spec.quantization is not None:
        kwargs["quantization_config"] = _bnb_config(spec)
        kwargs["device_map"] = {"": torch.device(device) if device is not None else "cpu"}
    auto_cls = AutoModelForCausalLM if kind == "causal_lm" else AutoModelForSequenceClassification
    model = auto_cls.from_pretrained(
        spec.name_or_path,
        config=config,
        revision=spec.revision,
        trust_remote_code=spec.trust_remote_code,
        **kwargs,
    )
    if len(tokenizer) > model.get_input_embeddings().num_embeddings:
        model.resize_token_embeddings(len(tokenizer))
    if spec.dropout is not None:
        set_dropout(model, spec.dropout)
    if not trainable:
        return model.requires_grad_(False).eval()
    # from_pretrained returns eval mode; Lightning keeps module modes as they are at fit start
    return _prepare_for_training(model.train(), spec, kind, adapter_name)


def is_sequence_classifier_checkpoint(spec: ModelSpec) -> bool:
    """Whether ``spec`` names a ``*ForSequenceClassification`` checkpoint (an existing reward model, whose head
    is kept) rather than a causal LM (whose unembedding a fresh scalar head replaces)."""
    config = AutoConfig.from_pretrained(
        spec.name_or_path, revision=spec.revision, trust_remote_code=spec.trust_remote_code
    )
    return any(a.endswith("ForSequenceClassification") for a in config.architectures or [])


def _prepare_for_training(
    model: PreTrainedModel, spec: ModelSpec, kind: ModelKind, adapter_name: str = "default"
) -> nn.Module:
    # Non-reentrant checkpointing: gradients reach LoRA weights under a frozen base without input grads, and
    # the recomputation can run under the context it was recorded in (a shared base's active adapter).
    checkpointing_kwargs = {"use_reentrant": False}
    if spec.quantization is not None:
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(
            model,
            use_gradient_checkpointing=spec.gradient_checkpointing,
            gradient_checkpointing_kwargs=checkpointing_kwargs,
        )
    elif spec.gradient_checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=checkpointing_kwargs)
    if spec.lora is None:
        if spec.quantization is not None:
            raise ValueError(
                f"{spec.name_or_path}: quantized weights cannot be trained directly; add a LoRA spec "
                "(QLoRA) or load this model as a frozen role."
            )
        return model
    from peft import LoraConfig, get_peft_model

    lora = spec.lora
    peft_config = LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=lora.target_modules,
        bias=lora.bias,
        task_type="CAUSAL_LM" if kind == "causal_lm" else "SEQ_CLS",
    )
    return get_peft_model(model, peft_config, adapter_name=adapter_name)


def _bnb_config(spec: ModelSpec) -> BitsAndBytesConfig:
    q = spec.quantization
    assert q is not None
    if q.bits == 8:
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=q.skip_modules)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=q.quant_type,
        bnb_4bit_use_double_quant=q.double_quant,
        bnb_4bit_compute_dtype=_DTYPES[q.compute_dtype],
        llm_int8_skip_modules=q.skip_modules,
    )


def _override_config_dropout(config, p: float) -> None:
    # Attention layers copy config fields such as `attention_dropout` at construction, so the config must
    # be patched before the model is built, not only the nn.Dropout modules afterwards.
    for name, value in list(vars(config).items()):
        if isinstance(value, float) and ("dropout" in name or name.endswith("_pdrop")):
            setattr(config, name, p)


def set_dropout(model: nn.Module, p: float) -> None:
    """Set the probability of every ``nn.Dropout`` and of attention-dropout attributes in ``model``."""
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = p
        if isinstance(getattr(module, "attention_dropout", None), float):
            module.attention_dropout = p


def unwrap_peft(model: nn.Module) -> nn.Module:
    """The transformers model under a peft wrapper (the model itself when there is none)."""
    from peft import PeftModel

    return model.get_base_model() if isinstance(model, PeftModel) else model


def is_peft(model: nn.Module) -> bool:
    from peft import PeftModel

    return isinstance(model, PeftModel)


def save_pretrained_atomic(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    dirpath: str | os.PathLike,
    spec: ModelSpec,
    kind: ModelKind = "causal_lm",
    merge_adapters: bool = True,
) -> Path:
    """Write ``model`` and ``tokenizer`` as a Hugging Face folder that ``from_pretrained`` loads back.

    A LoRA model is written merged into full weights (``merge_adapters=True``: the base is re-loaded
    unquantized through :func:`load_model` so 4-bit bases merge correctly) or as a peft adapter folder; of a
    model carrying several adapters (a shared base), the active one. An unmerged sequence classifier (a LoRA
    reward model) keeps its ``score`` head in the adapter file (peft's ``modules_to_save``) and its reward
    normalisation in :data:`REWARD_NORMALIZATION_FILE`, so a shared-base PPO run can load it as its reward role.
    The folder is written under a temporary name and renamed into place, so an interrupted export never
    leaves a half-written folder where a good one was. Weights are safetensors.
    """
    dirpath = Path(dirpath)
    dirpath.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dirpath.name}.", dir=dirpath.parent))
    try:
        if is_peft(model) and merge_adapters:
            adapter_dir = tmp / "_adapter"
            save_active_adapter(model, adapter_dir)
            merged = _merged_model(spec, tokenizer, kind, adapter_dir)
            # the merged copy's config comes from the base checkpoint: carry over the reward normalisation
            # set during training (lit_rlhf.hf.scoring), but not e.g. the 4-bit quantization_config
            for key in ("reward_bias", "reward_scale"):
                if hasattr(unwrap_peft(model).config, key):
                    setattr(merged.config, key, getattr(unwrap_peft(model).config, key))
            merged.save_pretrained(tmp, safe_serialization=True)
            shutil.rmtree(adapter_dir)
        elif is_peft(model):
            save_active_adapter(model, tmp)
            if kind == "sequence_classifier":
                write_reward_normalization(tmp, unwrap_peft(model).config)
        else:
            model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        _replace_dir(tmp, dirpath)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dirpath


def save_active_adapter(model: nn.Module, dirpath: str | os.PathLike) -> Path:
    """Write the active adapter of a peft model as a top-level adapter folder (``adapter_config.json``,
    ``adapter_model.safetensors``); peft itself puts adapters not named ``default`` in sub-folders."""
    dirpath = Path(dirpath)
    name = model.active_adapter
    model.save_pretrained(dirpath, selected_adapters=[name], safe_serialization=True)
    if name != "default":
        sub = dirpath / name
        for item in sub.iterdir():
            item.rename(dirpath / item.name)
        sub.rmdir()
    return dirpath


def write_reward_normalization(dirpath: str | os.PathLike, config) -> None:
    """Write ``reward_bias``/``reward_scale`` of ``config`` (lit_rlhf.hf.scoring) beside an adapter."""
    values = {
        key: float(getattr(config, key, default)) for key, default in (("reward_bias", 0.0), ("reward_scale", 1.0))
    }
    (Path(dirpath) / REWARD_NORMALIZATION_FILE).write_text(json.dumps(values, indent=2) + "\n")


def read_reward_normalization(dirpath: str | os.PathLike) -> tuple[float, float] | None:
    """``(reward_bias, reward_scale)`` written by :func:`write_reward_normalization`, ``None`` without the file."""
    path = Path(dirpath) / REWARD_NORMALIZATION_FILE
    if not path.exists():
        return None
    values = json.loads(path.read_text())
    return float(values["reward_bias"]), float(values["reward_scale"])


def _merged_model(spec: ModelSpec, tokenizer, kind: ModelKind, adapter_dir: Path) -> PreTrainedModel:
    from dataclasses import replace

    from peft import PeftModel

    dtype = spec.dtype if spec.quantization is None else spec.quantization.compute_dtype
    base_spec = replace(spec, lora=None, quantization=None, gradient_checkpointing=False, dtype=dtype)
    base = load_model(base_spec, tokenizer, kind=kind, trainable=False)
    return PeftModel.from_pretrained(base, adapter_dir).merge_and_unload()


def _replace_dir(src: Path, dst: Path) -> None:
    if dst.exists():
        old = dst.with_name(f".{dst.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        dst.rename(old)
        src.rename(dst)
        shutil.rmtree(old, ignore_errors=True)
    else:
        src.rename(dst)
