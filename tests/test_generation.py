"""The one sampler: exactly softmax(logits / T), whatever the checkpoint's generation_config.json says; seeded
without touching the global RNG."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from lit_rlhf.hf import ModelSpec, SamplingConfig, load_model, load_tokenizer, sample_responses
from lit_rlhf.hf.forwards import response_logits
from lit_rlhf.hf.generation import generate, generation_config
from lit_rlhf.hf.tokenization import batch_prompt_ids
from lit_rlhf.rlhf import logprobs_from_logits, pad_batch, response_masks

PROMPTS = ["The movie was", "I stayed at this hotel and it was", "The phone was", "The book was"]


@pytest.fixture(scope="module")
def poisoned_model_dir(tmp_path_factory, tiny_model_dir):
    """The tiny model with a generation_config.json that sets every logits processor generate knows."""
    folder = tmp_path_factory.mktemp("poisoned")
    shutil.copytree(tiny_model_dir, folder, dirs_exist_ok=True)
    tokenizer = load_tokenizer(str(folder))
    word = tokenizer(" great", add_special_tokens=False)["input_ids"][0]
    config = {
        "do_sample": False,
        "temperature": 0.05,
        "top_k": 2,
        "top_p": 0.1,
        "min_p": 0.5,
        "typical_p": 0.2,
        "repetition_penalty": 5.0,
        "no_repeat_ngram_size": 1,
        "suppress_tokens": [word, word + 1, word + 2],
        "begin_suppress_tokens": [word + 3],
        "bad_words_ids": [[word + 4]],
        "forced_bos_token_id": word + 5,
        "forced_eos_token_id": word + 6,
        "eos_token_id": [tokenizer.eos_token_id, word + 7],
        "max_new_tokens": 2,
        "min_new_tokens": 5,
    }
    (folder / "generation_config.json").write_text(json.dumps(config))
    return folder


def _load(folder):
    tokenizer = load_tokenizer(str(folder), padding_side="left")
    return load_model(ModelSpec(str(folder)), tokenizer, trainable=False), tokenizer


def _prompts(tokenizer):
    return pad_batch(batch_prompt_ids(tokenizer, PROMPTS * 4), tokenizer.pad_token_id, side="left")


def test_checkpoint_generation_config_does_not_shape_sampling(poisoned_model_dir, tiny_model_dir):
    model, tok = _load(poisoned_model_dir)
    assert model.generation_config.min_p == 0.5  # the poisoned settings really are loaded
    ids, mask = _prompts(tok)
    sampling = SamplingConfig(max_new_tokens=12, temperature=0.7)
    config = generation_config(sampling, tok.eos_token_id, tok.pad_token_id)
    with torch.random.fork_rng():
        torch.manual_seed(3)
        out = generate(model, ids, mask, config, output_scores=True, return_dict_in_generate=True)
    responses = out.sequences[:, ids.shape[1] :]
    _, response_mask, _ = response_masks(responses, tok.pad_token_id, tok.eos_token_id)
    # the log-probs PPO stores: log_softmax(logits / T) of a plain forward pass
    qr, am = torch.cat([ids, responses], 1), torch.cat([mask, response_mask.long()], 1)
    stored = logprobs_from_logits(response_logits(model, qr, am, responses.shape[1])[0], responses, 0.7)
    processed = torch.log_softmax(torch.stack(out.scores, 1), -1).gather(-1, responses[..., None])[..., 0]
    assert response_mask.sum() > 50
    assert torch.where(response_mask, stored - processed, 0).abs().max() < 1e-4
    # every token of the vocabulary keeps its probability: nothing was suppressed, forced or cut off
    full = torch.log_softmax(torch.stack(out.scores, 1), -1)
    assert torch.isfinite(full[response_mask]).all()

    # the sampler draws the same responses from the poisoned folder as from a clean copy of the weights
    clean, clean_tok = _load(tiny_model_dir)
    poisoned_draw = sample_responses(model, ids, mask, sampling, 3, tok.eos_token_id, tok.pad_token_id)
    clean_draw = sample_responses(clean, ids, mask, sampling, 3, clean_tok.eos_token_id, clean_tok.pad_token_id)
    assert torch.equal(poisoned_draw, clean_draw)
    assert model.generation_config.min_p == 0.5  # and the model's own config is given back afterwards


def test_without_the_sampler_the_checkpoint_config_would_leak(poisoned_model_dir):
    """The check above can fail: a bare generate() with the same explicit settings is shaped by the file."""
    model, tok = _load(poisoned_model_dir)
    ids, mask = _prompts(tok)
    config = generation_config(SamplingConfig(max_new_tokens=12, temperature=0.7), tok.eos_token_id, tok.pad_token_id)
    out = model.generate(
        input_ids=ids, attention_mask=mask, generation_config=config, output_scores=True, return_dict_in_generate=True
    )
    assert (~torch.isfinite(torch.stack(out.scores, 1))).any()  # min_p / suppress_tokens masked tokens out


def test_sampling_is_seeded_and_leaves_the_global_rng_alone(tiny_model_dir):
    model, tok = _load(tiny_model_dir)
    ids, mask = _prompts(tok)
    sampling = SamplingConfig(max_new_tokens=8)
    torch.manual_seed(123)
    before = torch.random.get_rng_state()
    first = sample_responses(model, ids, mask, sampling, 7, tok.eos_token_id, tok.pad_token_id)
    assert torch.equal(torch.random.get_rng_state(), before)
    again = sample_responses(model, ids, mask, sampling, 7, tok.eos_token_id, tok.pad_token_id)
    other = sample_responses(model, ids, mask, sampling, 8, tok.eos_token_id, tok.pad_token_id)
    assert torch.equal(first, again) and not torch.equal(first, other)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"temperature": 0.0}, "temperature must be > 0"),
        ({"top_p": 0.0}, "top_p must lie in"),
        ({"top_k": -1}, "top_k must be >= 0"),
        ({"max_new_tokens": 0}, "max_new_tokens must be >= 1"),
    ],
)
def test_sampling_config_is_checked_when_built(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SamplingConfig(**kwargs)
