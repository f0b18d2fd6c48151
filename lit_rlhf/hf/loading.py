"""The one model-loading path shared by every stage: hub id or folder → tokenizer + model (+ bnb, + peft).

Nothing else in lit_rlhf builds a model with ``from_pretrained``, bitsandbytes or peft (an export's merge re-loads
its base through :func:`load_model` too: :mod:`lit_rlhf.hf.export`). Order of operations:

1. ``AutoConfig`` with dropout overridden (docs/conventions.md#dropout) and the tokenizer's pad token id;
2. ``from_pretrained`` with ``BitsAndBytesConfig`` when quantizing (transformers keeps the output head in
   full precision and marks the model ``is_loaded_in_4bit``, which peft relies on); then the unquantized
   tensors are copied out of the checkpoint's memory map (:func:`release_checkpoint_map`) and the 4-bit layers
   keep the layout their backward pass reads (:func:`keep_4bit_training_layout`;
   docs/conventions.md#4-bit-weights-on-cpu);
3. embeddings resized when the tokenizer gained a pad token (docs/conventions.md#pad-token-distinct-from-eos);
4. ``prepare_model_for_kbit_training`` (fp32 norms, input grads) for quantized models that will train;
5. ``get_peft_model`` for LoRA; frozen roles get ``requires_grad_(False)`` and ``eval()``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import torch
from torch import nn
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    BitsAndBytesConfig,
    PreTrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from lit_rlhf.errors import ConfigError
from lit_rlhf.hf.specs import LoraSpec, ModelSpec
from lit_rlhf.outputs import recover_export

if TYPE_CHECKING:  # peft is imported where it is used: loading a model without LoRA does not need it
    from peft import LoraConfig

PAD_TOKEN = "<|pad|>"
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
ModelKind = Literal["causal_lm", "sequence_classifier"]
#: what a model is loaded for: a policy (SFT, PPO policy and reference) generates and must end its responses
#: with EOS; a reward model or critic only reads sequences, so an encoder tokenizer without EOS is fine
TokenizerRole = Literal["policy", "reward_model", "critic"]


#: files one of which holds a tokenizer's vocabulary (``tokenizer_config.json`` alone holds none): fast
#: tokenizers, BPE (GPT-2, Qwen), WordPiece (BERT), SentencePiece (Llama 2, T5), tiktoken
TOKENIZER_VOCAB_FILES = ("tokenizer.json", "vocab.json", "vocab.txt", "*.model", "*.tiktoken")


def load_tokenizer(
    spec: ModelSpec | str,
    padding_side: Literal["left", "right"] = "right",
    role: TokenizerRole = "policy",
    option: str | None = None,
):
    """Load a tokenizer and guarantee a pad token distinct from EOS.

    When the pad token is missing or equal to EOS, ``<|pad|>`` is added: if EOS doubled as padding, the EOS
    would be masked out of every loss and the model would never learn to stop
    (docs/conventions.md#pad-token-distinct-from-eos). Models loaded with :func:`load_model` resize their
    embeddings to match.

    Args:
        spec: the model (or tokenizer folder / hub id) whose tokenizer to load.
        padding_side: padding side of the returned tokenizer.
        role: ``policy`` needs an EOS to end responses; ``reward_model`` and ``critic`` accept a tokenizer
            without one (encoders such as BERT, DeBERTa, MiniLM: their sequences are text pairs, see
            :func:`lit_rlhf.hf.tokenization.reward_text_ids`).
        option: the config option that names this tokenizer (e.g. ``model.init_args.policy.tokenizer``), for
            the error messages; ``None`` names :attr:`ModelSpec.tokenizer`.

    Raises:
        ConfigError: the folder does not exist, holds no tokenizer files, or its tokenizer has an empty
            vocabulary (transformers would otherwise build a tokenizer of special tokens only from a model's
            ``config.json``, and every text would tokenize to nothing).
    """
    spec = ModelSpec(name_or_path=spec) if isinstance(spec, str) else spec
    path = spec.tokenizer_path
    check_local_source(path)
    where = option or "ModelSpec.tokenizer (e.g. model.init_args.model.tokenizer)"
    # the file list only words the error: whatever transformers loads with a vocabulary is accepted
    missing = Path(path).expanduser().is_dir() and not has_tokenizer_files(path)
    missing_message = (
        f"{path}: no tokenizer files (one of {', '.join(TOKENIZER_VOCAB_FILES)}); save the tokenizer there "
        f"(tokenizer.save_pretrained) or set {where} to a folder or hub id that has one"
    )
    try:
        tokenizer = AutoTokenizer.from_pretrained(
            path, revision=spec.revision, trust_remote_code=spec.trust_remote_code
        )
    except (OSError, ValueError) as exc:
        if missing:
            raise ConfigError(missing_message) from exc
        raise
    if not base_vocabulary_size(tokenizer):
        if missing:
            raise ConfigError(missing_message)
        raise ConfigError(
            f"{path}: the tokenizer has an empty vocabulary (special tokens only); set {where} to a folder or hub "
            "id with a complete tokenizer"
        )
    if tokenizer.eos_token is None:
        if role == "policy":
            raise ValueError(
                f"Tokenizer of {spec.tokenizer_path!r} has no EOS token, so this model cannot be a policy: a policy "
                "must end its responses with EOS. Encoder models (BERT, DeBERTa, MiniLM...) cannot be the policy "
                "(SFT, PPO policy or reference); use them as a reward model (RewardModule, PPO `reward_model`)."
            )
        if tokenizer.pad_token is None:
            tokenizer.add_special_tokens({"pad_token": PAD_TOKEN})
        tokenizer.padding_side = padding_side
        return tokenizer
    if tokenizer.pad_token is None or tokenizer.pad_token_id == tokenizer.eos_token_id:
        tokenizer.add_special_tokens({"pad_token": PAD_TOKEN})
    tokenizer.padding_side = padding_side
    return tokenizer


def has_tokenizer_files(folder: str | os.PathLike) -> bool:
    """Whether ``folder`` holds one of :data:`TOKENIZER_VOCAB_FILES` (a tokenizer's vocabulary)."""
    folder = Path(folder).expanduser()
    return any(next(folder.glob(pattern), None) is not None for pattern in TOKENIZER_VOCAB_FILES)


def base_vocabulary_size(tokenizer: PreTrainedTokenizerBase) -> int:
    """Tokens of ``tokenizer``'s vocabulary that are neither special nor added tokens (0: it cannot encode text)."""
    special = set(tokenizer.all_special_tokens) | set(tokenizer.get_added_vocab())
    return sum(1 for token in tokenizer.get_vocab() if token not in special)


def looks_local(name_or_path: str) -> bool:
    """Whether ``name_or_path`` names a folder rather than a hub repository (``org/name``).

    A path starting with ``.``, ``/`` or ``~``, or one with a separator that has more than one ``/`` or whose
    first part is an existing folder, is local; ``org/name`` stays a hub id.
    """
    if name_or_path.startswith((".", "/", "~")) or (os.altsep and name_or_path.startswith(os.altsep)):
        return True
    if os.sep not in name_or_path and "/" not in name_or_path:
        return False
    windows_path = os.sep != "/" and os.sep in name_or_path
    return windows_path or name_or_path.count("/") > 1 or Path(name_or_path).parent.is_dir()


def check_local_source(name_or_path: str) -> None:
    """Before loading from ``name_or_path``: put back an export whose replacement was interrupted (see
    :func:`lit_rlhf.outputs.recover_export`), and refuse a local path that does not exist, which the hub client would
    otherwise report as an invalid repository id.

    Raises:
        ConfigError: ``no such folder: <path>``.
    """
    path = Path(name_or_path).expanduser()
    if path.exists():
        return
    recover_export(path)
    if not path.exists() and looks_local(name_or_path):
        raise ConfigError(f"no such folder: {name_or_path}")


def load_model(
    spec: ModelSpec,
    tokenizer: PreTrainedTokenizerBase,
    kind: ModelKind = "causal_lm",
    trainable: bool = True,
    device: torch.device | str | None = None,
    adapter_name: str = "default",
    new_head: bool = False,
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
        new_head: ``sequence_classifier`` only: a classifier checkpoint with several outputs (e.g. a sentiment
            model's two logits) gets a fresh one-output head, for the reward-model stage to train, instead of
            being refused.

    Raises:
        ConfigError: ``spec`` is a classifier with several outputs, loaded as a ``sequence_classifier`` without
            ``new_head`` (a reward model or critic must have one output, the score).
    """
    check_local_source(spec.name_or_path)
    config = AutoConfig.from_pretrained(
        spec.name_or_path, revision=spec.revision, trust_remote_code=spec.trust_remote_code
    )
    if spec.dropout is not None:
        _override_config_dropout(config, spec.dropout)
    # the pad id is written after the resize: an id beyond the checkpoint's rows (Llama 3, Mistral: no spare row)
    # would fail the embedding's padding_idx check (docs/conventions.md#pad-token-distinct-from-eos)
    rows = getattr(config, "vocab_size", None)
    if config.pad_token_id is not None and (rows is None or not 0 <= config.pad_token_id < rows):
        config.pad_token_id = None
    if tokenizer.eos_token_id is None and getattr(tokenizer, "sep_token_id", None) is not None:
        # an encoder's score reads segment ids derived from its separator (lit_rlhf.hf.scoring.encoder_inputs)
        config.sep_token_id = tokenizer.sep_token_id
    kwargs: dict = dict(spec.extra_kwargs)
    if kind == "sequence_classifier":
        outputs = classifier_outputs(config)
        if outputs not in (None, 1):
            if not new_head:
                raise ConfigError(_several_outputs_message(spec.name_or_path, config))
            # its head is the one weight whose shape changes; the caller initialises the new one
            kwargs["ignore_mismatched_sizes"] = True
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
    if spec.quantization is not None:
        release_checkpoint_map(model)
        keep_4bit_training_layout(model)
    resize_embeddings(model, len(tokenizer))
    model.config.pad_token_id = tokenizer.pad_token_id
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    if spec.dropout is not None:
        set_dropout(model, spec.dropout)
    if not trainable:
        return model.requires_grad_(False).eval()
    # from_pretrained returns eval mode; Lightning keeps module modes as they are at fit start
    return _prepare_for_training(model.train(), spec, kind, adapter_name)


def resize_embeddings(model: PreTrainedModel, rows: int) -> None:
    """Grow the input (and an untied output) embedding matrix to ``rows`` rows, e.g. for an added pad token.

    The original rows are kept bitwise; each new row is the mean of the original rows (deterministic, no RNG
    drawn; pad positions are masked anyway: docs/conventions.md#pad-token-distinct-from-eos). A model with as
    many rows or more is left as it is.
    """
    old = model.get_input_embeddings().num_embeddings
    if rows <= old:
        return
    model.resize_token_embeddings(rows, mean_resizing=False)
    with torch.no_grad():
        for emb in {
            id(m): m for m in (model.get_input_embeddings(), model.get_output_embeddings()) if m is not None
        }.values():
            weight = emb.weight
            if weight.shape[0] == rows:
                weight[old:] = weight[:old].float().mean(0).to(weight.dtype)


def release_checkpoint_map(model: nn.Module) -> None:
    """Give the unquantized CPU tensors of a quantized model memory of their own.

    transformers reads safetensors through a memory map, and a tensor kept in the checkpoint's dtype (embeddings,
    output head, norms of a 4/8-bit model) is a view into that map, not a copy. One such view keeps the whole map
    open, and with it every page that quantization read: the full-precision checkpoint stays resident beside
    its quantized copy for the whole run (a 113M-parameter fp32 base: 432 MiB of map beside 54 MiB of 4-bit
    weights, which made the 4-bit shared-base PPO run peak above the fp32 one; benchmarks/README.md). Copying
    the unquantized tensors, a few percent of the weights, lets the map close. The values are unchanged
    (a bitwise copy); tied tensors stay tied.
    """
    for param in model.parameters():  # each shared Parameter once; swapping .data keeps every tie
        if param.device.type == "cpu" and not _is_quantized(param):
            param.data = param.detach().clone()
    # a buffer registered in several modules gets one copy; the originals stay referenced so no id is reused
    copies: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    for module in model.modules():
        for name, buffer in module._buffers.items():
            if buffer is not None and buffer.device.type == "cpu":
                if id(buffer) not in copies:
                    copies[id(buffer)] = (buffer, buffer.clone())
                module._buffers[name] = copies[id(buffer)][1]


def keep_4bit_training_layout(model: nn.Module) -> None:
    """Stop bitsandbytes from repacking 4-bit weights for its CPU inference kernel.

    On a CPU with AVX512-BF16, the first forward of a ``Linear4bit`` in eval mode without gradients (``generate``
    runs in eval mode: :mod:`lit_rlhf.hf.generation`) repacks its weight in place for a bf16 kernel
    (``bitsandbytes::gemv_4bit``), and every later forward goes through that kernel, in train mode too. Its
    outputs differ from the training kernel's (bf16 quantization constants), and it has no autograd formula: no
    gradient reaches the layer's input, so the LoRA weights of every earlier layer get wrong gradients, silently.
    Keeping the training layout costs CPU inference speed of 4-bit models, nothing on GPUs.
    """
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


def _is_quantized(tensor: torch.Tensor) -> bool:
    """A bitsandbytes weight (``Params4bit``, ``Int8Params``): created by quantization, it owns its memory."""
    return type(tensor).__module__.startswith("bitsandbytes")


def quantized_params(model: nn.Module) -> set[nn.Parameter]:
    """The bitsandbytes weights of ``model`` (``Params4bit``, ``Int8Params``: the 4/8-bit layers' weights; their
    biases, the norms, embeddings and output head stay ordinary tensors). Empty for an unquantized model."""
    return {p for p in model.parameters() if _is_quantized(p)}


def is_quantized(model: nn.Module) -> bool:
    """Whether ``model`` (peft-wrapped or not) was loaded in 4 or 8 bits: transformers sets ``hf_quantizer`` on
    it (``from_pretrained`` with a ``BitsAndBytesConfig``), or it holds bitsandbytes weights."""
    return getattr(unwrap_peft(model), "hf_quantizer", None) is not None or bool(quantized_params(model))


def is_sequence_classifier_checkpoint(spec: ModelSpec) -> bool:
    """Whether ``spec`` names a ``*ForSequenceClassification`` checkpoint with one output (an existing reward
    model, whose head is kept) rather than a causal LM (whose unembedding a fresh scalar head replaces) or a
    classifier with several outputs (whose head a fresh scalar head replaces)."""
    config = AutoConfig.from_pretrained(
        spec.name_or_path, revision=spec.revision, trust_remote_code=spec.trust_remote_code
    )
    return classifier_outputs(config) == 1


def classifier_outputs(config: PreTrainedConfig) -> int | None:
    """``num_labels`` of a ``*ForSequenceClassification`` checkpoint's config; ``None`` for any other model (a
    causal LM's config carries a meaningless ``num_labels`` too: transformers' default, 2)."""
    if any(a.endswith("ForSequenceClassification") for a in config.architectures or []):
        return config.num_labels
    return None


def _several_outputs_message(name_or_path: str, config: PreTrainedConfig) -> str:
    labels = [f"{i}: {name}" for i, name in sorted(config.id2label.items())]
    shown = ", ".join(labels[:4]) + (", ..." if len(labels) > 4 else "")
    return (
        f"{name_or_path}: a sequence classifier with {config.num_labels} labels ({shown}); lit_rlhf reward models "
        "and critics have one output (num_labels=1): train a reward-model stage from it (it gets a fresh one-output "
        "head), or save it re-headed with num_labels=1 (e.g. the positive label's head row minus the negative one's, "
        "a log-odds score)."
    )


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
    from peft import get_peft_model

    return get_peft_model(model, lora_config(spec.lora, kind), adapter_name=adapter_name)


def lora_config(lora: LoraSpec, kind: ModelKind) -> LoraConfig:
    """peft's ``LoraConfig`` of ``lora`` for a model of ``kind`` (its task type tells peft which head to keep
    trainable: a sequence classifier's ``score``)."""
    from peft import LoraConfig

    return LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=lora.target_modules,
        bias=lora.bias,
        task_type="CAUSAL_LM" if kind == "causal_lm" else "SEQ_CLS",
    )


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
