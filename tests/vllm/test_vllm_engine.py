"""VLLMEngine on the real vLLM CPU engine: its log-probs are the trainer's, its samples are seeded, its padding is
HFEngine's, and the stale-weights guard stops a run whose engine missed a sync. One engine for the module."""

from __future__ import annotations

import pytest
import torch

from lit_rlhf.hf.generation import SamplingConfig
from lit_rlhf.rlhf import truncate_after_eos
from tests.vllm.conftest import max_gap, teacher_forced

pytest.importorskip("vllm", reason="vLLM is not installed (tests/vllm run in the vLLM venv: make test)")

PROMPTS = ["The movie was", "I thought the book was really", "The hotel was", "a"]
#: fp32 engine vs fp32 trainer on the tiny model: measured ~5e-7 nats; different kernels, so not bit-equal
TOLERANCE = 1e-4


def encode(tokenizer, texts=PROMPTS):
    enc = tokenizer(texts, return_tensors="pt", padding=True)
    return enc.input_ids, enc.attention_mask


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_engine_logprobs_equal_the_trainers_recomputation(served, temperature):
    engine, policy, tok = served
    ids, mask = encode(tok)
    sampling = SamplingConfig(max_new_tokens=12, temperature=temperature)
    out = engine.generate(ids, mask, sampling, seed=3)
    assert out.responses.dtype == torch.long and out.responses.shape == (4, 12)
    trainer, resp_mask = teacher_forced(
        policy, ids, mask, out.responses, temperature, tok.pad_token_id, tok.eos_token_id
    )
    assert max_gap(out.logprobs, trainer, resp_mask) < TOLERANCE
    assert out.logprobs[~resp_mask].eq(0).all()
    # at T = 0.7 the log-probs are those of softmax(logits / T): at T = 1 they would be far off
    if temperature != 1.0:
        untempered, _ = teacher_forced(policy, ids, mask, out.responses, 1.0, tok.pad_token_id, tok.eos_token_id)
        assert max_gap(out.logprobs, untempered, resp_mask) > 0.05


def test_same_seed_same_samples_and_the_global_rng_untouched(served):
    engine, _, tok = served
    ids, mask = encode(tok)
    sampling = SamplingConfig(max_new_tokens=10, temperature=0.9)
    state = torch.get_rng_state()
    first = engine.generate(ids, mask, sampling, seed=11)
    engine.generate(ids, mask, sampling, seed=12)  # another call in between leaves no trace
    again = engine.generate(ids, mask, sampling, seed=11)
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(first.responses, again.responses) and torch.equal(first.logprobs, again.logprobs)
    other = engine.generate(ids, mask, sampling, seed=12)
    assert not torch.equal(first.responses, other.responses)
    # a prompt's response depends on its row's seed, not on the batch it is in (generate_many = one call)
    rows = [tok(p)["input_ids"] for p in PROMPTS]
    many = engine.generate_many(rows, sampling, seed=11)
    assert torch.equal(many, first.responses)
    # two rows with the same prompt (a GRPO group) get different samples
    twins = engine.generate(ids[:1].repeat(2, 1), mask[:1].repeat(2, 1), sampling, seed=11)
    assert not torch.equal(twins.responses[0], twins.responses[1])


def test_responses_end_at_the_first_eos_padded_as_hf_engine_pads(served):
    engine, _, tok = served
    ids, mask = encode(tok)
    sampling = SamplingConfig(max_new_tokens=12, temperature=1.0)
    free = engine.generate(ids, mask, sampling, seed=5).responses
    # the random tiny model almost never samples its EOS: stop on a token it did sample instead
    stop = int(free[0, 3])
    pad = tok.pad_token_id
    engine.eos_token_id = stop
    try:
        out = engine.generate(ids, mask, sampling, seed=5)
    finally:
        engine.eos_token_id = tok.eos_token_id
    lengths = [(row.tolist().index(stop) + 1) if stop in row.tolist() else 12 for row in free]
    assert lengths[0] <= 4
    assert out.responses.shape[1] == max(lengths)  # as generate: the longest response of the call
    expected = truncate_after_eos(free[:, : max(lengths)], stop, pad)
    assert torch.equal(out.responses, expected)
    assert out.logprobs[0, lengths[0] :].eq(0).all() and out.logprobs[0, : lengths[0]].lt(0).all()


def test_sampling_settings_reach_vllm_and_nothing_else(served):
    engine = served[0]
    params = engine.sampling_params(SamplingConfig(max_new_tokens=7, temperature=0.5, top_k=0, top_p=1.0), 1, 0)
    assert (params.temperature, params.top_k, params.top_p, params.max_tokens) == (0.5, 0, 1.0, 7)
    assert (params.min_p, params.repetition_penalty, params.presence_penalty, params.frequency_penalty) == (0, 1, 0, 0)
    assert params.stop_token_ids == [engine.eos_token_id] and params.logprobs == 0
    top = engine.sampling_params(SamplingConfig(top_k=5, top_p=0.9), 1, 0)
    assert (top.top_k, top.top_p) == (5, 0.9)
    assert engine.sampling_params(SamplingConfig(), 1, 0).seed != engine.sampling_params(SamplingConfig(), 1, 1).seed


def test_sync_reaches_the_engine_and_the_stale_weights_guard_fires_when_it_does_not(served, monkeypatch):
    engine, policy, tok = served
    ids, mask = encode(tok)
    sampling = SamplingConfig(max_new_tokens=8)
    saved = {k: v.clone() for k, v in policy.state_dict().items()}
    try:
        gen = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for p in policy.parameters():
                p.add_(torch.randn(p.shape, generator=gen) * 0.05)
        engine.sync_weights(policy)
        assert engine.last_sync_gap < TOLERANCE and engine.last_sync_seconds > 0
        out = engine.generate(ids, mask, sampling, seed=1)
        trainer, resp = teacher_forced(policy, ids, mask, out.responses, 1.0, tok.pad_token_id, tok.eos_token_id)
        assert max_gap(out.logprobs, trainer, resp) < TOLERANCE

        with torch.no_grad():
            for p in policy.parameters():
                p.add_(torch.randn(p.shape, generator=gen) * 0.05)
        monkeypatch.setattr(engine, "_push_full_weights", lambda policy: None)  # a sync that copies nothing
        with pytest.raises(RuntimeError, match="stale rollout weights"):
            engine.sync_weights(policy)
        monkeypatch.undo()
    finally:
        policy.load_state_dict(saved)
        engine.sync_weights(policy)
    assert engine.last_sync_gap < TOLERANCE


def test_a_restarted_engine_samples_what_the_first_one_did(served):
    """A resumed run starts a new engine on the restored weights and passes the same per-iteration seeds."""
    from lit_rlhf.hf.vllm_engine import VLLMEngine

    engine, policy, tok = served
    ids, mask = encode(tok)
    sampling = SamplingConfig(max_new_tokens=10, temperature=0.9)
    before = engine.generate(ids, mask, sampling, seed=21)
    fresh = VLLMEngine(kv_cache_memory_bytes=64 << 20)
    fresh.bind(policy, tok)
    try:
        after = fresh.generate(ids, mask, sampling, seed=21)
    finally:
        fresh.close()
    assert torch.equal(before.responses, after.responses)
    torch.testing.assert_close(before.logprobs, after.logprobs, atol=1e-5, rtol=0)


def test_an_engine_in_its_own_process_syncs_through_a_file(served):
    """``in_process=False``: vLLM's engine process; the weights cross as a safetensors file under /dev/shm."""
    from lit_rlhf.hf.vllm_engine import VLLMEngine

    _, policy, tok = served
    ids, mask = encode(tok)
    own = VLLMEngine(in_process=False, kv_cache_memory_bytes=64 << 20)
    saved = {k: v.clone() for k, v in policy.state_dict().items()}
    own.bind(policy, tok)
    try:
        assert own.last_sync_gap < TOLERANCE
        gen = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for p in policy.parameters():
                p.add_(torch.randn(p.shape, generator=gen) * 0.05)
        own.sync_weights(policy)
        assert (own._workdir / "weights" / "model.safetensors").exists()
        out = own.generate(ids, mask, SamplingConfig(max_new_tokens=8, temperature=0.7), seed=2)
        trainer, resp = teacher_forced(policy, ids, mask, out.responses, 0.7, tok.pad_token_id, tok.eos_token_id)
        assert max_gap(out.logprobs, trainer, resp) < TOLERANCE
    finally:
        own.close()
        policy.load_state_dict(saved)
    assert own._workdir is None
