"""Sampling from a causal LM with every sampling setting explicit (nothing leaks from ``generation_config``)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from lit_rlhf.datamodules.base import pad_sequences


def sampling_kwargs(
    tokenizer,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    do_sample: bool = True,
) -> dict:
    """``generate`` keyword arguments that fully define the sampling distribution.

    A checkpoint's ``generation_config`` may carry ``top_k=50``, a repetition penalty or its own EOS list;
    passing everything explicitly keeps the sampled distribution equal to ``softmax(logits / T)``, the one
    every log-prob is computed from (spec §4.2, pitfall P7).
    """
    kwargs = dict(
        max_new_tokens=max_new_tokens,
        do_sample=do_sample,
        top_k=top_k,
        top_p=top_p,
        repetition_penalty=1.0,
        num_beams=1,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    if do_sample:
        kwargs["temperature"] = temperature
    return kwargs


def left_pad(
    prompts: Sequence[Sequence[int]], pad_token_id: int, device=None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad prompt token lists into ``input_ids`` and ``attention_mask`` of shape ``[B, P]``."""
    input_ids = pad_sequences(prompts, pad_token_id, side="left")
    attention_mask = pad_sequences([[1] * len(p) for p in prompts], 0, side="left")
    return input_ids.to(device), attention_mask.to(device)


@torch.no_grad()
def generate_texts(
    model,
    tokenizer,
    prompts: Sequence[str],
    max_new_tokens: int,
    temperature: float = 1.0,
    do_sample: bool = True,
) -> list[str]:
    """Sample one continuation per prompt and decode it (special tokens and padding removed)."""
    prompt_ids = [tokenizer(p, add_special_tokens=True)["input_ids"] for p in prompts]
    device = next(model.parameters()).device
    input_ids, attention_mask = left_pad(prompt_ids, tokenizer.pad_token_id, device)
    was_training = model.training
    model.eval()
    out = model.generate(
        input_ids=input_ids,
        attention_mask=attention_mask,
        **sampling_kwargs(tokenizer, max_new_tokens, temperature, do_sample=do_sample),
    )
    model.train(was_training)
    return tokenizer.batch_decode(out[:, input_ids.shape[1] :], skip_special_tokens=True)
