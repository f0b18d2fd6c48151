"""The one Scorer protocol (docs/conventions.md#scorers): every reward model and a reward function give exactly
the numbers of the code paths they replaced; scoring per forward chunk equals scoring the whole batch; a scorer
defined here runs in PPO and critic-free with no other change."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from jsonargparse import ArgumentParser

from lit_rlhf.callbacks import RolloutScorer
from lit_rlhf.datamodules.prompts import PromptDataModule
from lit_rlhf.evaluation import Samples, load_frozen, sample, sample_scores
from lit_rlhf.hf import LoraSpec, ModelSpec
from lit_rlhf.hf.reward import RewardScorer
from lit_rlhf.hf.scorers import FunctionScorer, Scorer, ScoringRows, load_scorer, scoring_prompts
from lit_rlhf.imports import call_reward_fn
from lit_rlhf.labelling import judge_scores
from lit_rlhf.models import CriticFreeConfig, CriticFreeModule
from lit_rlhf.models.ppo import PPOConfig, PPOModule, RewardConfig, SamplingConfig, SharedBaseConfig
from lit_rlhf.quickstart.assets import build_tiny_llama, build_tokenizer
from lit_rlhf.quickstart.task import prompt_examples
from lit_rlhf.rlhf import padding_bounds
from tests.conftest import TOKENIZER_TEXTS, write_jsonl
from tests.helpers import cpu_trainer

CALLS: list[dict] = []


def keyword_fn(prompts, completions, completion_ids, **columns):
    """A keyword-convention reward function that records what it was given."""
    CALLS.append({"prompts": prompts, "completions": completions, "completion_ids": completion_ids, **columns})
    texts = [c if isinstance(c, str) else c[0]["content"] for c in completions]
    ids = completion_ids or [[] for _ in texts]
    return [
        len(t) + 0.25 * len(i) + (1.0 if isinstance(p, str) and p.startswith("The") else 0.0)
        for p, t, i in zip(prompts, texts, ids)
    ]


class LengthScorer(Scorer):
    """A user-defined scorer: the number of response tokens, minus a tenth of the prompt text's length."""

    def __init__(self, offset: float = 0.0) -> None:
        self.offset = offset
        self.calls = 0

    def score(self, tokenizer, query_responses, attention_mask, mask, rows):
        self.calls += 1
        penalty = torch.tensor([0.1 * len(p) for p in rows.prompts], device=query_responses.device)
        return mask.sum(1).float() - penalty + self.offset

    def score_texts(self, prompts, responses, messages=None, columns=None):
        return torch.tensor([float(len(r)) + self.offset for r in responses])


@pytest.fixture(scope="module")
def prompts_file(tmp_path_factory) -> Path:
    rows = prompt_examples(8, seed=1, split="train")
    rows[1] = {"messages": [{"role": "user", "content": "Tell me: the hotel was"}], "answer": "x"}
    rows[4] = {**rows[4], "answer": "great"}
    return write_jsonl(tmp_path_factory.mktemp("scorer_prompts") / "train.jsonl", rows)


@pytest.fixture(scope="module")
def own_tokenizer_rm_dir(tmp_path_factory) -> Path:
    """A decoder reward model with its own BPE vocabulary (re-encoded path)."""
    from transformers import LlamaForSequenceClassification

    tokenizer = build_tokenizer(TOKENIZER_TEXTS[:200], vocab_size=290)
    base = build_tiny_llama(tmp_path_factory.mktemp("own_lm"), tokenizer, hidden_size=32, num_layers=1, seed=3)
    torch.manual_seed(3)
    model = LlamaForSequenceClassification.from_pretrained(base, num_labels=1)
    with torch.no_grad():
        model.score.weight.normal_(0, 0.5)
    out = tmp_path_factory.mktemp("own_rm")
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def batch_of(module: PPOModule, path: Path, size: int = 8) -> dict:
    dm = PromptDataModule(str(path), batch_size=size)
    dm.tokenizer = module.tokenizer
    dm.setup("fit")
    return dm.collate([dm.train_dataset[i] for i in range(size)])


def old_scores(module: PPOModule, samples, batch: dict, chunk: int | None) -> torch.Tensor:
    """Raw scores as the code before the Scorer protocol computed them: a reward model per forward chunk on the
    trimmed chunk (``RewardScorer.score_rollout`` with ``scoring_prompts`` sliced), a reward function once on the
    whole batch (``PPOModule._scores_from_fn``)."""
    qr_all, am_all, mask_all = samples.query_responses, samples.attention_mask, samples.mask
    if module.reward_model is None:
        responses = qr_all[:, -mask_all.shape[1] :]
        tokens = [r[m] for r, m in zip(responses, mask_all, strict=True)]
        texts = module.tokenizer.batch_decode(tokens, skip_special_tokens=True)
        scores = call_reward_fn(
            module.scorer.fn,
            batch["prompts"],
            texts,
            messages=batch.get("prompt_messages"),
            completion_ids=[t.tolist() for t in tokens],
            columns=batch.get("prompt_columns"),
        )
        return torch.tensor(scores, dtype=torch.float32)
    rm_prompts = scoring_prompts(batch.get("prompts"), batch.get("prompt_messages"))
    size = len(qr_all)
    chunk = chunk or size
    parts = []
    for start in range(0, size, chunk):
        qr, am, m = (t[start : start + chunk] for t in (qr_all, am_all, mask_all))
        context = qr.shape[1] - m.shape[1]
        lead, length = padding_bounds(am, m, context)
        qr, am, m = qr[:, lead : context + length], am[:, lead : context + length], m[:, :length]
        rows = rm_prompts[start : start + chunk] if rm_prompts is not None else None
        parts.append(RewardScorer.score_rollout(module.scorer, module.tokenizer, qr, am, m, rows))
    return torch.cat(parts)


def build(kind: str, tiny_model_dir, tiny_classifier_dir, own_tokenizer_rm_dir, rm_adapter_dir) -> PPOModule:
    sampling = SamplingConfig(max_new_tokens=6)
    if kind == "adapter":
        module = PPOModule(
            policy=ModelSpec(str(tiny_model_dir), lora=LoraSpec(r=4, alpha=8)),
            shared_base=SharedBaseConfig(reward_adapter=str(rm_adapter_dir)),
            sampling=sampling,
        )
    else:
        judge = {"shared_vocab": tiny_classifier_dir, "own_tokenizer": own_tokenizer_rm_dir}.get(kind)
        module = PPOModule(
            policy=ModelSpec(str(tiny_model_dir)),
            reward_model=ModelSpec(str(judge)) if judge is not None else None,
            reward=RewardConfig(fn=keyword_fn) if judge is None else None,
            value_head=True,
            sampling=sampling,
        )
    module.configure_model()
    return module


@pytest.mark.parametrize("kind", ["shared_vocab", "own_tokenizer", "adapter", "function"])
def test_every_scorer_gives_the_old_numbers_and_chunks_change_nothing(
    kind, tiny_model_dir, tiny_classifier_dir, own_tokenizer_rm_dir, rm_adapter_dir, prompts_file
):
    module = build(kind, tiny_model_dir, tiny_classifier_dir, own_tokenizer_rm_dir, rm_adapter_dir)
    assert isinstance(module.scorer, FunctionScorer if kind == "function" else RewardScorer)
    assert (module.reward_model is None) == (kind == "function")
    if kind != "function":
        assert module.scorer.model is module.reward_model
        assert module.scorer.shares_tokens(module.tokenizer) == (kind != "own_tokenizer")
    batch = batch_of(module, prompts_file)
    runs = {}
    for chunk in (None, 3):
        module.ppo = dataclasses.replace(module.ppo, forward_batch_size=chunk)
        CALLS.clear()
        samples = module.sample_and_score(batch)  # the same samples every time: the seed is the iteration's
        runs[chunk] = samples.raw_scores
        calls = list(CALLS)
        expected = old_scores(module, samples, batch, chunk)
        assert torch.equal(samples.raw_scores, expected)  # bit-identical to the code it replaced
        if kind == "function":  # called per chunk, with the chunk's rows in order
            assert [len(c["prompts"]) for c in calls] == ([8] if chunk is None else [3, 3, 2])
            whole = {k: [v for c in calls for v in c[k]] for k in calls[0]}
            assert whole["prompts"][1] == batch["prompt_messages"][1]  # a chat row: its conversation
            assert whole["answer"] == [(c or {}).get("answer") for c in batch["prompt_columns"]]
    if kind == "function":
        assert torch.equal(runs[None], runs[3])
    else:  # another padding width per chunk: equal up to float rounding, as before
        torch.testing.assert_close(runs[None], runs[3], atol=1e-5, rtol=0)
    # validation scores through the same method
    module.validation_step(batch, 0)


def test_evaluation_scores_through_the_protocol_are_the_old_ones(tiny_model_dir, tiny_classifier_dir, prompts_file):
    model, tokenizer = load_frozen(str(tiny_model_dir))
    prompts = ["The movie was", [{"role": "user", "content": "Tell me: the hotel was"}], "The food was", "I think"]
    columns = [{"answer": "a"}, {}, {"answer": "b"}, {"answer": None}]
    samples = sample(model, tokenizer, prompts, max_new_tokens=6, batch_size=3, seed=0)
    # reward function: exactly as evaluation's old fn_scores
    old = call_reward_fn(
        keyword_fn,
        samples.prompt_texts,
        samples.responses,
        messages=samples.messages,
        completion_ids=samples.completion_ids(),
        columns=columns,
    )
    new = sample_scores(load_scorer(reward_fn=keyword_fn), samples, tokenizer, columns, batch_size=3)
    assert new.tolist() == old
    # reward model: as the old RewardScorer.score_sequences, up to float rounding of another padding
    scorer = load_scorer(str(tiny_classifier_dir))
    old = scorer.score_sequences(tokenizer, samples.prompt_ids, samples.completion_ids(), samples.prompts)
    torch.testing.assert_close(sample_scores(scorer, samples, tokenizer, batch_size=3), old, atol=1e-5, rtol=0)
    assert isinstance(samples, Samples)


def test_text_scoring_of_labelling_and_rollout_scorer_is_the_old_one(tiny_classifier_dir):
    prompts = ["The movie was", [{"role": "user", "content": "Tell me"}, {"role": "assistant", "content": "ok"}]]
    responses = [" great.", " fine."]
    columns = [{"answer": "x"}, {"answer": "y"}]

    def positional(prompts, responses):
        return [float(len(p) + len(r)) for p, r in zip(prompts, responses)]

    for fn in (keyword_fn, positional):  # labelling: a conversation is its turns' text for a positional fn
        texts = [p if isinstance(p, str) else "\n".join(m["content"] for m in p) for p in prompts]
        messages = [p if isinstance(p, list) else None for p in prompts]
        old = call_reward_fn(fn, texts, responses, messages=messages, columns=columns)
        assert judge_scores(prompts, responses, None, fn, columns=columns) == old
    rm = load_scorer(str(tiny_classifier_dir))
    assert (
        judge_scores(prompts, responses, str(tiny_classifier_dir), None) == rm.score_texts(prompts, responses).tolist()
    )

    # RolloutScorer: the texts PPO returns, with their conversations and columns
    logged = {}

    class Module:
        device = torch.device("cpu")

        def log(self, name, value, **kwargs):
            logged[name] = value

    class Trainer:
        world_size = 1

    outputs = {
        "prompts": ["The movie was", "<rendered chat>"],
        "responses": responses,
        "prompt_messages": [None, [{"role": "user", "content": "Tell me"}]],
        "prompt_columns": columns,
    }
    callback = RolloutScorer("tests.test_scorers:keyword_fn", name="gold")
    callback.on_train_batch_end(Trainer(), Module(), outputs, None, 0)
    old = call_reward_fn(
        keyword_fn, outputs["prompts"], responses, messages=outputs["prompt_messages"], columns=columns
    )
    assert logged["gold/score"].item() == pytest.approx(sum(old) / 2)
    callback = RolloutScorer(reward_model=str(tiny_classifier_dir), name="rm")
    callback.on_train_batch_end(Trainer(), Module(), outputs, None, 0)
    assert "rm/score" in logged


def test_load_scorer_takes_exactly_one_judge(tiny_classifier_dir):
    with pytest.raises(ValueError, match="exactly one judge"):
        load_scorer()
    with pytest.raises(ValueError, match="exactly one judge"):
        load_scorer(str(tiny_classifier_dir), keyword_fn)
    own = LengthScorer()
    assert load_scorer(reward_fn=own) is own
    assert isinstance(load_scorer(reward_fn="tests.test_scorers:keyword_fn"), FunctionScorer)
    with pytest.raises(ValueError, match="normalize_on"):
        load_scorer(reward_fn=keyword_fn, normalize_on=(["a"], ["b"]))


@pytest.mark.parametrize("module_class", [PPOModule, CriticFreeModule])
def test_a_scorer_of_ones_own_runs_in_ppo_and_critic_free(module_class, tiny_model_dir, prompts_file, tmp_path):
    scorer = LengthScorer(offset=0.5)
    settings = {"algorithm": CriticFreeConfig("grpo", group_size=2)} if module_class is CriticFreeModule else {}
    if module_class is PPOModule:
        settings = {"value_head": True, "ppo": PPOConfig(ppo_epochs=1, forward_batch_size=3)}
    module = module_class(
        policy=ModelSpec(str(tiny_model_dir)),
        reward=RewardConfig(scorer=scorer),
        sampling=SamplingConfig(max_new_tokens=6),
        **settings,
    )
    module.configure_model()
    assert module.scorer is scorer and module.reward_model is None
    batch = batch_of(module, prompts_file, size=4)
    if module_class is CriticFreeModule:
        batch = module.grouped(batch)
    samples = module.sample_and_score(batch)
    expected = samples.mask.sum(1).float() - torch.tensor([0.1 * len(p) for p in batch["prompts"]]) + 0.5
    torch.testing.assert_close(samples.raw_scores, expected)
    assert scorer.calls == (2 if module_class is PPOModule else 1)  # PPO: 4 rows in chunks of 3
    data = PromptDataModule(str(prompts_file), batch_size=4)
    cpu_trainer(max_steps=1, default_root_dir=tmp_path).fit(module, datamodule=data)
    assert module.iteration == 1


def test_reward_scorer_is_a_class_path_in_yaml():
    parser = ArgumentParser()
    parser.add_argument("--reward", type=RewardConfig)
    config = parser.parse_object(
        {"reward": {"scorer": {"class_path": "tests.test_scorers.LengthScorer", "init_args": {"offset": 2.0}}}}
    )
    reward = parser.instantiate(config).reward
    assert isinstance(reward.scorer, LengthScorer) and reward.scorer.offset == 2.0
    with pytest.raises(ValueError, match="not both"):
        RewardConfig(fn=keyword_fn, scorer=LengthScorer())


def test_rows_select_a_chunk_in_order():
    rows = ScoringRows(["a", "b", "c"], [None, [{"role": "user", "content": "b"}], None], [{}, {"x": 1}, {}])
    part = rows.select(slice(1, 3))
    assert part.prompts == ["b", "c"] and part.columns == [{"x": 1}, {"x": None}]
    assert rows.select(slice(2, 3)).columns == [{"x": None}]  # a chunk still names the batch's columns
    assert part.reward_model_prompts() == [[{"role": "user", "content": "b"}], "c"]
    assert ScoringRows().select(slice(0, 2)) == ScoringRows()


def test_rows_select_indices_and_concat():
    rows = ScoringRows(["a", "b", "c"], None, [{}, {"x": 1}, {}])
    picked = rows.select([2, 0])
    assert picked == ScoringRows(["c", "a"], None, [{"x": None}, {"x": None}])
    merged = ScoringRows.concat([picked, rows.select(slice(1, 2))])
    assert merged.prompts == ["c", "a", "b"] and merged.messages is None
    assert merged.columns == [{"x": None}, {"x": None}, {"x": 1}]
