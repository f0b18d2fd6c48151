"""Shared fixtures: tiny offline models saved as Hugging Face folders and loaded through the real path."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from lit_rlhf.datamodules.base import write_jsonl
from lit_rlhf.hf import LoraSpec, ModelSpec, load_model, load_tokenizer
from lit_rlhf.quickstart.assets import build_tiny_llama, build_tokenizer
from lit_rlhf.quickstart.task import corpus, sft_examples

TOKENIZER_TEXTS = corpus(seed=0, n=300)

if os.environ.get("PYTEST_XDIST_WORKER"):  # `make test` runs one pytest worker per core: share the cores out
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))))


@pytest.fixture(autouse=True)
def _restore_default_dtype():
    dtype = torch.get_default_dtype()
    yield
    torch.set_default_dtype(dtype)


@pytest.fixture(scope="session")
def tiny_tokenizer():
    """Byte-level BPE tokenizer (vocab 320) trained on the quickstart corpus; pad, BOS, EOS distinct."""
    return build_tokenizer(TOKENIZER_TEXTS, vocab_size=320)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tiny_tokenizer) -> Path:
    """A random 2-layer Llama (hidden 64, a multiple of bitsandbytes' 4-bit block size) as an HF folder."""
    return build_tiny_llama(tmp_path_factory.mktemp("tiny_llama"), tiny_tokenizer, hidden_size=64, num_layers=2)


@pytest.fixture(scope="session")
def sft_jsonl(tmp_path_factory) -> tuple[Path, Path]:
    """Small prompt/completion train and validation files from the quickstart task."""
    root = tmp_path_factory.mktemp("sft_data")
    return (
        write_jsonl(root / "train.jsonl", sft_examples(64, seed=1)),
        write_jsonl(root / "val.jsonl", sft_examples(16, seed=2)),
    )


@pytest.fixture(scope="session")
def tiny_classifier_dir(tmp_path_factory, tiny_model_dir) -> Path:
    """The tiny causal LM with its unembedding replaced by a scalar head, as a reward model / critic."""
    torch.manual_seed(1)
    spec = ModelSpec(str(tiny_model_dir))
    tokenizer = load_tokenizer(spec)
    model = load_model(spec, tokenizer, "sequence_classifier", trainable=False)
    out = tmp_path_factory.mktemp("tiny_rm")
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def rm_adapter_dir(tmp_path_factory, tiny_model_dir) -> Path:
    """A LoRA reward model (r 4, α 8) on the tiny base, exported unmerged by the reward-model stage (the reward
    adapter of a shared-base PPO run), normalised (0.3, 2.0)."""
    from lit_rlhf.hf.scoring import set_reward_normalization
    from lit_rlhf.models.reward import RewardModule
    from tests.helpers import randomize_lora

    torch.manual_seed(3)
    module = RewardModule(ModelSpec(str(tiny_model_dir), lora=LoraSpec(r=4, alpha=8)))
    module.configure_model()
    randomize_lora(module.model, 0.3, seed=4)
    set_reward_normalization(module.model, bias=0.3, scale=2.0)
    out = tmp_path_factory.mktemp("rm") / "export_adapter"
    module.export_hf(out, merge_adapters=False)
    return out
