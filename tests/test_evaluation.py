"""Evaluation: sampling, KL to a reference, win rates and the scorer plumbing."""

from __future__ import annotations

import json

import pytest
import torch

from lit_rlhf.errors import ConfigError
from lit_rlhf.evaluation import EvaluationResult, evaluate, sample, sequence_kl, win_rate
from lit_rlhf.hf import ModelSpec, SamplingConfig, load_model, load_tokenizer, sample_many
from lit_rlhf.imports import import_callable
from lit_rlhf.quickstart.assets import build_tiny_llama

PROMPTS = ["The movie was", "The hotel was", "I thought the book was"]


def count_letter_e(prompts, responses):
    return [float(r.count("e")) for r in responses]


def test_win_rate_counts_ties_half():
    assert win_rate(torch.tensor([1.0, 2.0, 3.0, 0.0]), torch.tensor([0.0, 2.0, 4.0, -1.0])) == pytest.approx(0.625)


def test_import_callable_both_spellings_and_error():
    assert import_callable("tests.test_evaluation:count_letter_e") is count_letter_e
    assert import_callable("json.dumps") is json.dumps
    with pytest.raises(ValueError, match="cannot import 'nope.nothing:f'"):
        import_callable("nope.nothing:f")


def test_sequence_kl_is_zero_against_itself_and_matches_a_loop(tiny_model_dir, tiny_tokenizer, tmp_path):
    tokenizer = load_tokenizer(str(tiny_model_dir), padding_side="left")
    policy = load_model(ModelSpec(str(tiny_model_dir)), tokenizer, trainable=False)
    other_dir = build_tiny_llama(tmp_path / "other", tiny_tokenizer, hidden_size=64, num_layers=2, seed=1)
    reference = load_model(ModelSpec(str(other_dir)), tokenizer, trainable=False)
    samples = sample(policy, tokenizer, PROMPTS, max_new_tokens=6, temperature=0.7, seed=0)
    assert torch.equal(sequence_kl(policy, policy, samples, tokenizer.pad_token_id, 0.7), torch.zeros(3))

    kl = sequence_kl(policy, reference, samples, tokenizer.pad_token_id, temperature=0.7, batch_size=2)
    for i in range(3):
        ids = torch.tensor([samples.prompt_ids[i] + samples.response_ids[i, : samples.lengths[i]].tolist()])
        expected = 0.0
        with torch.no_grad():
            lp = [torch.log_softmax(m(input_ids=ids).logits[0] / 0.7, -1) for m in (policy, reference)]
        for t in range(len(samples.prompt_ids[i]), ids.shape[1]):
            token = ids[0, t]
            expected += float(lp[0][t - 1, token] - lp[1][t - 1, token])
        assert float(kl[i]) == pytest.approx(expected, abs=1e-4)


def test_evaluate_reports_scores_win_rate_and_writes_files(tiny_model_dir, tmp_path):
    result = evaluate(
        policy=str(tiny_model_dir),
        prompts=PROMPTS,
        reward_fn="tests.test_evaluation:count_letter_e",
        baseline=str(tiny_model_dir),
        reference=str(tiny_model_dir),
        max_new_tokens=5,
        output_dir=str(tmp_path / "eval"),
    )
    s = result.summary
    # same model, same seed: identical samples, so every comparison is a tie and the KL is zero
    assert s["win_rate/fn_score"] == 0.5 and s["kl_to_reference"] == 0.0
    assert s["fn_score"] == s["baseline/fn_score"]
    expected = sum(r["policy_response"].count("e") for r in result.rows) / 3
    assert s["fn_score"] == pytest.approx(expected)
    assert s["response_length"] >= 1 and s["response_length"] <= 5 and 0.0 <= s["eos_rate"] <= 1.0
    assert json.loads((tmp_path / "eval" / "summary.json").read_text()) == s
    assert len((tmp_path / "eval" / "samples.jsonl").read_text().splitlines()) == 3


def test_a_second_evaluation_into_the_same_folder_keeps_the_first(tmp_path, capsys):
    first = EvaluationResult(summary={"fn_score": 1.0}, rows=[{"prompt": "a"}])
    second = EvaluationResult(summary={"fn_score": 2.0}, rows=[{"prompt": "b"}, {"prompt": "c"}])
    first.save(tmp_path)
    second.save(tmp_path)
    assert json.loads((tmp_path / "summary.json").read_text()) == {"fn_score": 2.0}
    assert json.loads((tmp_path / "previous" / "1" / "summary.json").read_text()) == {"fn_score": 1.0}
    assert (tmp_path / "previous" / "1" / "samples.jsonl").read_text() == '{"prompt": "a"}\n'
    assert len((tmp_path / "samples.jsonl").read_text().splitlines()) == 2
    assert f"earlier outputs kept in {tmp_path / 'previous' / '1'}" in capsys.readouterr().out


def test_evaluate_needs_a_scorer(tiny_model_dir):
    with pytest.raises(ValueError, match="needs a scorer"):
        evaluate(policy=str(tiny_model_dir), prompts=PROMPTS)


def test_batch_k_is_sampled_with_seed_plus_k_and_labelling_keeps_one_stream(tiny_model_dir):
    """What lets evaluation share its batches out over processes: a batch's responses depend on the seed, its
    index and its own prompts only (docs/conventions.md#sampling-seeds)."""
    tokenizer = load_tokenizer(str(tiny_model_dir), padding_side="left")
    model = load_model(ModelSpec(str(tiny_model_dir)), tokenizer, trainable=False)
    prompts = [*PROMPTS, "The staff were", "a"]
    whole = sample(model, tokenizer, prompts, max_new_tokens=6, batch_size=2, seed=5)
    for k, start in enumerate(range(0, 5, 2)):
        alone = sample(model, tokenizer, prompts[start : start + 2], max_new_tokens=6, batch_size=2, seed=5 + k)
        assert whole.responses[start : start + 2] == alone.responses
        assert torch.equal(whole.lengths[start : start + 2], alone.lengths)
    # labelling's sampling, one random stream continued over the batches, is unchanged
    stream = sample(model, tokenizer, prompts, max_new_tokens=6, batch_size=2, seed=5, seed_each_batch=False)
    ids = [tokenizer(p)["input_ids"] for p in prompts]
    sampling = SamplingConfig(max_new_tokens=6)
    expected = sample_many(model, ids, sampling, 5, tokenizer.eos_token_id, tokenizer.pad_token_id, batch_size=2)
    assert torch.equal(stream.response_ids, expected)
    assert stream.responses[:2] == whole.responses[:2] and stream.responses[2:] != whole.responses[2:]


@pytest.mark.parametrize("shard", ["fsdp2", "fsdp1"])
def test_shard_without_torchrun_is_refused_in_one_line(tiny_model_dir, monkeypatch, shard):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with pytest.raises(ConfigError, match=rf"--shard {shard} .* launch the evaluation with torchrun"):
        evaluate(policy=str(tiny_model_dir), prompts=PROMPTS, reward_fn=count_letter_e, shard=shard)


def test_unknown_shard_is_refused_with_the_choices(tiny_model_dir):
    with pytest.raises(ConfigError, match=r"shard must be null, 'fsdp1' or 'fsdp2', got 'ddp'"):
        evaluate(policy=str(tiny_model_dir), prompts=PROMPTS, reward_fn=count_letter_e, shard="ddp")
