"""Export: a trained model as a Hugging Face folder that plain transformers (or peft) loads back.

A LoRA model is written merged into full weights (:func:`merged_model`: the base re-loaded unquantized through
:func:`~lit_rlhf.hf.loading.load_model`, so 4-bit bases merge correctly) or as an adapter folder
(:func:`save_active_adapter`; a reward model's normalisation beside it in :data:`REWARD_NORMALIZATION_FILE`).
Every export is written under a temporary name and swapped into place (:func:`lit_rlhf.outputs.replace_dir`),
so an interrupted export never leaves a half-written folder where a good one was.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import shutil
import tempfile
from dataclasses import replace
from pathlib import Path

import torch
from torch import nn
from transformers import AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from lit_rlhf.hf.loading import ModelKind, is_peft, load_model, unwrap_peft
from lit_rlhf.hf.sharding import full_state_dict, is_sharded
from lit_rlhf.hf.specs import ModelSpec
from lit_rlhf.hf.tokenization import appends_eos
from lit_rlhf.outputs import recover_export, replace_dir

__all__ = [
    "REWARD_NORMALIZATION_FILE",
    "merged_model",
    "read_reward_normalization",
    "save_active_adapter",
    "save_pretrained_atomic",
    "tokenizer_appending_eos",
    "write_reward_normalization",
]

log = logging.getLogger(__name__)

#: beside an unmerged reward-model adapter: its ``reward_bias``/``reward_scale`` (the merged export's config has them)
REWARD_NORMALIZATION_FILE = "reward_normalization.json"


def save_pretrained_atomic(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    dirpath: str | os.PathLike,
    spec: ModelSpec,
    kind: ModelKind = "causal_lm",
    merge_adapters: bool = True,
    model_card: str | None = None,
) -> Path:
    """Write ``model`` and ``tokenizer`` as a Hugging Face folder that ``from_pretrained`` loads back.

    A LoRA model is written merged into full weights (``merge_adapters=True``: the base is re-loaded
    unquantized through :func:`load_model` so 4-bit bases merge correctly) or as a peft adapter folder; of a
    model carrying several adapters (a shared base), the active one. An unmerged sequence classifier (a LoRA
    reward model) keeps its ``score`` head in the adapter file (peft's ``modules_to_save``) and its reward
    normalisation in :data:`REWARD_NORMALIZATION_FILE`, so a shared-base PPO run can load it as its reward role.
    The folder is written under a temporary name and renamed into place, so an interrupted export never
    leaves a half-written folder where a good one was. Weights are safetensors.

    Under FSDP2 (:func:`~lit_rlhf.hf.sharding.is_sharded`) every process must call it: the full weights are
    gathered to rank 0, on CPU one tensor at a time, and rank 0 writes the folder.

    The swap keeps a complete export at ``dirpath`` at every instant: on Linux the new and the old folder are
    exchanged in one atomic ``renameat2(RENAME_EXCHANGE)``; elsewhere (or where the filesystem cannot) the
    old folder is renamed to ``.NAME.old`` first, and a process killed between the two renames leaves it
    there, to be put back by the next load or export (:func:`recover_export`). Temporary folders left by
    killed exports are removed by the next export to the same path.

    A ``sequence_classifier`` (reward model, critic) is written so that plain transformers scores it as
    lit_rlhf does (docs/conventions.md#reward-model-export): its config always holds ``reward_bias`` and
    ``reward_scale``, and a decoder's tokenizer appends the EOS its score is read at
    (:func:`tokenizer_appending_eos`). ``model_card`` is written as the folder's ``README.md``.
    """
    state_dict = None
    if is_sharded(model):
        # FSDP2: every process takes part in gathering the weights; rank 0 alone holds them (on CPU) and writes
        state_dict = full_state_dict(model)
        if torch.distributed.get_rank() != 0:
            return Path(dirpath)
    if kind == "sequence_classifier":
        config = unwrap_peft(model).config
        for key, default in (("reward_bias", 0.0), ("reward_scale", 1.0)):
            setattr(config, key, float(getattr(config, key, default)))
        if tokenizer.eos_token_id is not None and getattr(unwrap_peft(model), "score", None) is not None:
            tokenizer = tokenizer_appending_eos(tokenizer)
    dirpath = Path(dirpath)
    dirpath.parent.mkdir(parents=True, exist_ok=True)
    recover_export(dirpath, clean=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dirpath.name}.", dir=dirpath.parent))
    try:
        if is_peft(model) and merge_adapters:
            adapter_dir = tmp / "_adapter"
            save_active_adapter(model, adapter_dir, state_dict)
            merged = merged_model(spec, tokenizer, kind, adapter_dir)
            # the merged copy's config comes from the base checkpoint: carry over the reward normalisation
            # set during training (lit_rlhf.hf.scoring), but not e.g. the 4-bit quantization_config
            for key in ("reward_bias", "reward_scale"):
                if hasattr(unwrap_peft(model).config, key):
                    setattr(merged.config, key, getattr(unwrap_peft(model).config, key))
            merged.save_pretrained(tmp, safe_serialization=True)
            shutil.rmtree(adapter_dir)
        elif is_peft(model):
            save_active_adapter(model, tmp, state_dict)
            if kind == "sequence_classifier":
                write_reward_normalization(tmp, unwrap_peft(model).config)
        else:
            model.save_pretrained(
                tmp, safe_serialization=True, **({} if state_dict is None else {"state_dict": state_dict})
            )
        tokenizer.save_pretrained(tmp)
        if kind == "sequence_classifier" and tokenizer.eos_token_id is not None:
            reloaded = AutoTokenizer.from_pretrained(tmp, trust_remote_code=spec.trust_remote_code)
            if not appends_eos(reloaded) and getattr(unwrap_peft(model), "score", None) is not None:
                log.warning(
                    "%s: the exported tokenizer does not append EOS; score it outside lit_rlhf on "
                    "tokenizer(prompt + response)['input_ids'] + [eos_token_id].",
                    dirpath,
                )
        if model_card is not None:
            (tmp / "README.md").write_text(model_card, encoding="utf-8")
        replace_dir(tmp, dirpath)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dirpath


def tokenizer_appending_eos(tokenizer: PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    """A copy of a fast ``tokenizer`` whose ``tokenizer(text)`` ends with EOS (after its other special tokens).

    A decoder reward model's score is read at the EOS that ends ``prompt + response + EOS``; with this
    post-processor ``model(**tokenizer(prompt + response, return_tensors="pt"))`` reads the same token outside
    lit_rlhf. lit_rlhf itself leaves such an appended EOS off prompts
    (:func:`lit_rlhf.hf.tokenization.prompt_ids`). A tokenizer that already appends EOS, or a slow one
    (no ``backend_tokenizer``), is returned unchanged.
    """
    from tokenizers import processors

    if appends_eos(tokenizer) or not hasattr(tokenizer, "backend_tokenizer"):
        return tokenizer
    probe = "a"
    bare = tokenizer(probe, add_special_tokens=False)["input_ids"]
    full = tokenizer(probe, add_special_tokens=True)["input_ids"]
    start = next((i for i in range(len(full) - len(bare) + 1) if full[i : i + len(bare)] == bare), None)
    if start is None:
        log.warning("Could not locate the special tokens of %s; its export does not append EOS.", type(tokenizer))
        return tokenizer
    prefix, suffix = full[:start], full[start + len(bare) :]
    eos = tokenizer.eos_token_id
    tokens = {i: tokenizer.convert_ids_to_tokens(i) for i in [*prefix, *suffix, eos]}
    single = " ".join([*(tokens[i] for i in prefix), "$A", *(tokens[i] for i in suffix), tokens[eos]])
    pair = " ".join(
        [*(tokens[i] for i in prefix), "$A", *(f"{tokens[i]}:1" for i in suffix), "$B:1", f"{tokens[eos]}:1"]
    )
    out = copy.deepcopy(tokenizer)
    out.__dict__.pop("_lit_rlhf_appends_eos", None)
    out.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single=single, pair=pair, special_tokens=[(t, i) for i, t in tokens.items()]
    )
    if {"add_bos_token", "add_eos_token"} & set(getattr(out, "init_kwargs", {})):
        # transformers rebuilds the post-processor from these saved flags when loading such a tokenizer
        object.__setattr__(out, "_add_eos_token", True)
        out.init_kwargs["add_eos_token"] = True
    return out


def save_active_adapter(model: nn.Module, dirpath: str | os.PathLike, state_dict: dict | None = None) -> Path:
    """Write the active adapter of a peft model as a top-level adapter folder (``adapter_config.json``,
    ``adapter_model.safetensors``); peft itself puts adapters not named ``default`` in sub-folders.
    ``state_dict``: the model's full weights when it is sharded (:func:`~lit_rlhf.hf.sharding.full_state_dict`)."""
    dirpath = Path(dirpath)
    name = model.active_adapter
    extra = {} if state_dict is None else {"state_dict": state_dict}
    model.save_pretrained(dirpath, selected_adapters=[name], safe_serialization=True, **extra)
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


def merged_model(
    spec: ModelSpec, tokenizer: PreTrainedTokenizerBase, kind: ModelKind, adapter_dir: str | os.PathLike
) -> PreTrainedModel:
    """The base of ``spec`` loaded unquantized and frozen, with the adapter folder ``adapter_dir`` merged into it.

    A 4-bit or 8-bit base is re-loaded in its compute dtype, so the merged weights are full precision; gradient
    checkpointing and LoRA of ``spec`` are dropped (the adapter comes from ``adapter_dir``).
    """
    from peft import PeftModel

    dtype = spec.dtype if spec.quantization is None else spec.quantization.compute_dtype
    base_spec = replace(spec, lora=None, quantization=None, gradient_checkpointing=False, dtype=dtype)
    base = load_model(base_spec, tokenizer, kind=kind, trainable=False)
    return PeftModel.from_pretrained(base, adapter_dir).merge_and_unload()
