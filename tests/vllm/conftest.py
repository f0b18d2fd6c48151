"""The real vLLM engine on CPU (tests/vllm): a tiny Llama whose head size vLLM's CPU attention supports, and one
engine for the whole session where the tests allow it.

These tests run in the vLLM venv (``make test`` builds ``.venv-vllm``); where vLLM is not installed each module is
skipped by ``pytest.importorskip`` with the reason.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from lit_rlhf.datamodules.base import write_jsonl
from lit_rlhf.quickstart.assets import build_tiny_llama
from lit_rlhf.quickstart.task import prompt_examples

os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")
os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")


@pytest.fixture(scope="session")
def vllm_model_dir(tmp_path_factory, tiny_tokenizer) -> Path:
    """A random 2-layer Llama, hidden 64 with 2 heads: head size 32 (vLLM's CPU attention needs one of 32, 64,
    80, 96, 112, 128, ...; the suite's tiny model has 16)."""
    return build_tiny_llama(tmp_path_factory.mktemp("vllm_llama"), tiny_tokenizer, hidden_size=64, num_heads=2)


@pytest.fixture(scope="session")
def vllm_prompts(tmp_path_factory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("vllm_prompts") / "train.jsonl", prompt_examples(16, seed=1))


@pytest.fixture(scope="session")
def served(vllm_model_dir):
    """``(engine, policy, tokenizer)``: one full-weight engine bound to a trainable copy of the tiny model, for
    the session (a test that changes the policy's weights puts them back and syncs)."""
    pytest.importorskip("vllm", reason="vLLM is not installed (tests/vllm run in the vLLM venv: make test)")
    from lit_rlhf.hf import ModelSpec, load_model, load_tokenizer
    from lit_rlhf.hf.vllm_engine import VLLMEngine

    tokenizer = load_tokenizer(str(vllm_model_dir), padding_side="left")
    policy = load_model(ModelSpec(str(vllm_model_dir)), tokenizer, trainable=True)
    engine = VLLMEngine(kv_cache_memory_bytes=64 << 20)
    with torch.random.fork_rng():
        engine.bind(policy, tokenizer)
    yield engine, policy, tokenizer
    engine.close()


@torch.no_grad()
def teacher_forced(model, prompt_ids, prompt_mask, responses, temperature: float, pad: int, eos: int):
    """``(logprobs [B, T], mask [B, T])``: ``model``'s log-probs of ``responses`` at ``temperature`` in one
    forward over prompt + response (the trainer's recomputation), and the response mask (up to the first EOS)."""
    from lit_rlhf.hf.forwards import response_logits
    from lit_rlhf.rlhf import logprobs_from_logits, response_masks

    mask = response_masks(responses, pad, eos).mask
    query_responses = torch.cat([prompt_ids, responses], 1)
    attention = torch.cat([prompt_mask, mask.long()], 1)
    was_training = model.training
    model.eval()
    try:
        logits, _ = response_logits(model, query_responses, attention, responses.shape[1])
    finally:
        model.train(was_training)
    return logprobs_from_logits(logits.float(), responses, temperature), mask


def max_gap(a, b, mask) -> float:
    return float(torch.where(mask.bool(), (a - b).abs(), 0).max())
