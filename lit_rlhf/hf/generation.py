"""The one sampler: every ``generate`` in lit_rlhf (PPO rollouts, SFT samples and predictions, evaluation,
labelling) goes through :func:`sample_responses`.

Two guarantees (docs/conventions.md#sampling):

* **The sampled distribution is exactly** ``softmax(logits / temperature)`` (restricted by ``top_k``/``top_p``
  only when asked). ``generate`` fills every setting it is not given from the checkpoint's
  ``generation_config.json`` (``min_p``, ``no_repeat_ngram_size``, ``suppress_tokens``, ``bad_words_ids``,
  forced tokens, a repetition penalty, another EOS list ...); each would silently make the stored behaviour
  log-probs differ from the distribution that was sampled. The sampler therefore runs ``generate`` with a fresh
  :class:`~transformers.GenerationConfig` built only from :class:`SamplingConfig`, with the model's own
  generation config swapped out for the call.
* **Seeded, without side effects.** Sampling draws from its own seed inside a forked RNG, so it neither depends
  on nor disturbs the global RNG (a resumed run samples the same responses; other processes pass other seeds).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from transformers import GenerationConfig

from lit_rlhf.hf.loading import unwrap_peft
from lit_rlhf.rlhf.masking import truncate_after_eos
from lit_rlhf.rlhf.padding import pad_batch, pad_sequences


@dataclass
class SamplingConfig:
    """How responses are sampled (every setting reaches ``generate``; nothing else does)."""

    max_new_tokens: int = 32
    """Response length limit ``T``; a response cut here gets the score on its last token."""
    temperature: float = 1.0
    """Sampling temperature; every log-prob and the KL use ``logits / temperature`` too."""
    top_k: int = 0
    """0 disables top-k, so the sampled distribution is exactly ``softmax(logits / T)``."""
    top_p: float = 1.0
    """1.0 disables nucleus sampling."""

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"sampling.max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if not self.temperature > 0:
            raise ValueError(f"sampling.temperature must be > 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"sampling.top_k must be >= 0 (0 disables it), got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"sampling.top_p must lie in (0, 1], got {self.top_p}")


# Sampling settings are saved in checkpoints' hyper-parameters; allow them in `torch.load(weights_only=True)`.
torch.serialization.add_safe_globals([SamplingConfig])


def generation_config(sampling: SamplingConfig, eos_token_id: int, pad_token_id: int) -> GenerationConfig:
    """A fresh ``GenerationConfig`` holding only ``sampling``'s settings, the stop token and the pad token."""
    return GenerationConfig(
        max_new_tokens=sampling.max_new_tokens,
        do_sample=True,
        temperature=sampling.temperature,
        top_k=sampling.top_k,
        top_p=sampling.top_p,
        num_beams=1,
        eos_token_id=eos_token_id,
        pad_token_id=pad_token_id,
        use_cache=True,
    )


@contextmanager
def _without_checkpoint_generation_config(model: nn.Module) -> Iterator[None]:
    """Swap the model's own ``generation_config`` (read from its checkpoint) for an empty one during a call."""
    base = unwrap_peft(model)
    saved = getattr(base, "generation_config", None)
    base.generation_config = GenerationConfig()
    try:
        yield
    finally:
        base.generation_config = saved


@contextmanager
def _seeded(seed: int, device: torch.device) -> Iterator[None]:
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


def generate(model: nn.Module, prompt_ids: Tensor, prompt_mask: Tensor, config: GenerationConfig, **kwargs):
    """``model.generate`` under ``config`` alone (the checkpoint's generation config swapped out), in eval mode.

    The sampler's one call into transformers; ``kwargs`` are ``generate``'s non-config arguments (e.g.
    ``synced_gpus``, or ``output_scores`` to inspect the processed distribution). Seeding is the caller's.
    """
    was_training = model.training
    # eval(): with gradient checkpointing, HF turns the KV cache off in train mode. Dropout is 0 either way.
    model.eval()
    try:
        with _without_checkpoint_generation_config(model):
            return model.generate(input_ids=prompt_ids, attention_mask=prompt_mask, generation_config=config, **kwargs)
    finally:
        model.train(was_training)


@torch.no_grad()
def sample_responses(
    model: nn.Module,
    prompt_ids: Tensor,
    prompt_mask: Tensor,
    sampling: SamplingConfig,
    seed: int,
    eos_token_id: int,
    pad_token_id: int,
    synced_gpus: bool = False,
) -> Tensor:
    """Sample one response per left-padded prompt with KV caching; pad after the first EOS.

    Args:
        model: causal LM (peft-wrapped or not).
        prompt_ids: LongTensor ``[B, P]``, left-padded.
        prompt_mask: ``[B, P]``, 1 on real tokens.
        sampling: every sampling setting.
        seed: sampling seed of this call (this process, this iteration).
        eos_token_id: stop token.
        pad_token_id: written after the first EOS.
        synced_gpus: keep running forwards until every process has finished (sharded weights are gathered
            inside each forward, a collective: a process that stopped early would hang the others).

    Returns:
        LongTensor ``[B, T]`` with ``T <= max_new_tokens``.
    """
    config = generation_config(sampling, eos_token_id, pad_token_id)
    with _seeded(seed, prompt_ids.device):
        out = generate(model, prompt_ids, prompt_mask, config, synced_gpus=synced_gpus)
    return truncate_after_eos(out[:, prompt_ids.shape[1] :], eos_token_id, pad_token_id)


@torch.no_grad()
def sample_many(
    model: nn.Module,
    prompts: Sequence[Sequence[int]],
    sampling: SamplingConfig,
    seed: int,
    eos_token_id: int,
    pad_token_id: int,
    batch_size: int = 32,
) -> Tensor:
    """Sample one response per prompt (token id lists) in left-padded batches of ``batch_size``, with one seed
    for the whole list (its batches continue one random stream).

    Returns:
        LongTensor ``[N, T]``, padded after each response's first EOS.
    """
    device = next(model.parameters()).device
    config = generation_config(sampling, eos_token_id, pad_token_id)
    chunks = []
    with _seeded(seed, device):
        for start in range(0, len(prompts), batch_size):
            ids, mask = pad_batch(prompts[start : start + batch_size], pad_token_id, side="left")
            out = generate(model, ids.to(device), mask.to(device), config)
            chunks.append(out[:, ids.shape[1] :].cpu())
    responses = pad_sequences([row.tolist() for chunk in chunks for row in chunk], pad_token_id)
    return truncate_after_eos(responses, eos_token_id, pad_token_id)
