"""Any reward model a user already has: encoder RMs, RMs with their own tokenizer in PPO and evaluation, hub
RMs normalised at PPO start, and exports that score the same with plain transformers."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from lit_rlhf.cli import main
from lit_rlhf.datamodules.base import write_jsonl
from lit_rlhf.evaluation import evaluate
from lit_rlhf.hf import ModelSpec, load_model, load_tokenizer
from lit_rlhf.hf.scorers import load_scorer
from lit_rlhf.hf.scoring import reward_normalization, sequence_scores, set_reward_normalization
from lit_rlhf.hf.tokenization import reward_chat_ids, reward_ids, reward_text_ids
from lit_rlhf.labelling import judge_scores
from lit_rlhf.models.ppo import PPOConfig, PPOModule, RewardConfig, SamplingConfig
from lit_rlhf.models.reward import RewardModule
from lit_rlhf.quickstart.assets import build_tiny_bert, build_tiny_llama, build_tokenizer, build_wordpiece_tokenizer
from lit_rlhf.quickstart.task import prompt_examples, ranking_examples, sft_examples
from lit_rlhf.rlhf.padding import pad_batch
from tests.conftest import TOKENIZER_TEXTS
from tests.helpers import cpu_trainer

ROOT = Path(__file__).resolve().parents[1]
PAIRS = [
    ("The phone was", " great, I loved it."),
    ("I stayed at this hotel and it was", " boring and I hated the pace."),
    ("The movie was", " fairly average from start to finish."),
]


@pytest.fixture(scope="session")
def bert_dir(tmp_path_factory) -> Path:
    """A random 1-layer BERT encoder (``BertModel``) with a WordPiece tokenizer: ``[CLS]``/``[SEP]``, no EOS."""
    tokenizer = build_wordpiece_tokenizer(TOKENIZER_TEXTS, vocab_size=300)
    return build_tiny_bert(
        tmp_path_factory.mktemp("bert"), tokenizer, hidden_size=32, num_layers=1, intermediate_size=64
    )


@pytest.fixture(scope="session")
def other_decoder_rm_dir(tmp_path_factory) -> Path:
    """A decoder reward model from "elsewhere": its own BPE vocabulary (not the policy's), saved by plain
    transformers as a ``LlamaForSequenceClassification`` with no lit_rlhf keys in its config."""
    from transformers import LlamaForSequenceClassification

    tokenizer = build_tokenizer(TOKENIZER_TEXTS[:200], vocab_size=290)
    base = build_tiny_llama(tmp_path_factory.mktemp("other_lm"), tokenizer, hidden_size=32, num_layers=1, seed=3)
    torch.manual_seed(3)
    model = LlamaForSequenceClassification.from_pretrained(base, num_labels=1)
    with torch.no_grad():
        model.score.weight.normal_(0, 0.5)  # scores that differ between texts
    out = tmp_path_factory.mktemp("other_rm")
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def trained_bert_rm(tmp_path_factory, bert_dir) -> tuple[Path, dict[str, float]]:
    """The BERT encoder trained as a reward model through the CLI on quickstart rankings: (export, metrics)."""
    root = tmp_path_factory.mktemp("bert_rm")
    train = write_jsonl(root / "train.jsonl", ranking_examples(96, seed=1))
    val = write_jsonl(root / "val.jsonl", ranking_examples(32, seed=2))
    reference = write_jsonl(root / "sft.jsonl", sft_examples(32, seed=3))
    run = root / "run"
    override = {
        "trainer": {
            "max_epochs": 2,
            "default_root_dir": str(run),
            "enable_progress_bar": False,
            "enable_model_summary": False,
            "logger": False,
            "enable_checkpointing": False,
            "callbacks": [
                {
                    "class_path": "lit_rlhf.callbacks.RewardNormalization",
                    "init_args": {"reference_data": str(reference)},
                },
                {"class_path": "lit_rlhf.callbacks.HFExport", "init_args": {"dirpath": str(run / "export")}},
            ],
        },
        "model": {
            "init_args": {
                "model": {"name_or_path": str(bert_dir)},
                "optimizer": {"class_path": "torch.optim.AdamW", "init_args": {"lr": 5.0e-3, "weight_decay": 0.0}},
                # 24 steps in all: no warm-up (the quickstart's 10 would be half the run)
                "lr_scheduler": {
                    "class_path": "lit_rlhf.models.WarmupCosineLR",
                    "init_args": {"warmup_steps": 0, "min_lr_ratio": 0.5},
                },
            }
        },
        "data": {"init_args": {"train_data": str(train), "val_data": str(val), "batch_size": 8}},
    }
    config = root / "override.yaml"
    config.write_text(yaml.safe_dump(override))
    cli = main(["fit", "--config", str(ROOT / "configs/quickstart/rm.yaml"), "--config", str(config)])
    metrics = {k: float(v) for k, v in cli.trainer.callback_metrics.items()}
    return run / "export", metrics


def plain_transformers_logit(path: Path, *encoding_args: str) -> float:
    """The score a user gets from the export with transformers alone."""
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForSequenceClassification.from_pretrained(path).eval()
    with torch.no_grad():
        return model(**tokenizer(*encoding_args, return_tensors="pt")).logits[0, 0].item()


def lit_rlhf_raw_scores(path: Path, prompts, responses) -> torch.Tensor:
    tokenizer = load_tokenizer(str(path), role="reward_model")
    model = load_model(ModelSpec(str(path)), tokenizer, "sequence_classifier", trainable=False)
    ids = [reward_text_ids(tokenizer, p, r) for p, r in zip(prompts, responses)]
    with torch.no_grad():
        return sequence_scores(model, *pad_batch(ids, tokenizer.pad_token_id), normalize=False)


# ---- encoders: tokenizer, read-out, refusal as policy -------------------------------------------------------
def test_encoder_tokenizer_is_a_reward_model_and_never_a_policy(bert_dir, tiny_classifier_dir):
    tokenizer = load_tokenizer(str(bert_dir), role="reward_model")
    assert tokenizer.eos_token_id is None and tokenizer.pad_token == "[PAD]"
    ids = reward_text_ids(tokenizer, "The movie was", " great fun.")
    assert ids == tokenizer("The movie was", " great fun.")["input_ids"]
    tokens = tokenizer.convert_ids_to_tokens(ids)
    assert (
        tokens[:5] == ["[CLS]", "the", "movie", "was", "[SEP]"] and tokens[-1] == "[SEP]" and tokens.count("[SEP]") == 2
    )
    # no chat template: the turns' text as a pair
    chat = [{"role": "user", "content": "The movie was"}, {"role": "assistant", "content": "great fun."}]
    assert reward_chat_ids(tokenizer, chat[:1], chat[1:]) == tokenizer("The movie was", "great fun.")["input_ids"]

    with pytest.raises(ValueError, match="cannot be the policy"):
        load_tokenizer(str(bert_dir))
    with pytest.raises(ValueError, match="Encoder models .* cannot be the policy"):
        PPOModule(
            policy=ModelSpec(str(bert_dir)), reward_model=ModelSpec(str(tiny_classifier_dir)), value_head=True
        ).configure_model()


def test_encoder_score_is_its_own_pooled_output_under_either_padding(bert_dir):
    tokenizer = load_tokenizer(str(bert_dir), role="reward_model")
    torch.manual_seed(0)
    model = load_model(ModelSpec(str(bert_dir)), tokenizer, "sequence_classifier", trainable=False)
    with torch.no_grad():  # a random init scores every text almost alike: spread it so that a misread shows
        for linear in (model.bert.pooler.dense, model.classifier):
            linear.weight.normal_(0.0, 1.0)
    ids = [reward_text_ids(tokenizer, p, r) for p, r in PAIRS]
    # what transformers computes on its own pair encoding, token type ids included, one row at a time
    expected = []
    with torch.no_grad():
        for p, r in PAIRS:
            encoding = tokenizer(p, r, return_tensors="pt")
            assert encoding["token_type_ids"].sum() > 0
            expected.append(model(**encoding).logits[0, 0].item())
        right = sequence_scores(model, *pad_batch(ids, tokenizer.pad_token_id, "right"), normalize=False)
        left = sequence_scores(model, *pad_batch(ids, tokenizer.pad_token_id, "left"), normalize=False)
    assert right.tolist() == pytest.approx(expected, abs=1e-5)
    assert left.tolist() == pytest.approx(expected, abs=1e-5)
    assert max(expected) - min(expected) > 1e-3  # the rows really differ: a shifted read-out would show


# ---- training through the CLI and the export ------------------------------------------------------------------
def test_encoder_rm_trained_through_the_cli_beats_chance_and_its_export_scores_the_same(trained_bert_rm):
    export, metrics = trained_bert_rm
    assert metrics["val/accuracy"] > 0.7, metrics  # chance is 0.5; measured 0.79 (192 held-out pairs)
    config = json.loads((export / "config.json").read_text())
    assert config["architectures"] == ["BertForSequenceClassification"] and config["sep_token_id"] is not None
    card = (export / "README.md").read_text()
    assert "tokenizer(prompt, response" in card and "reward_bias" in card and "ranking loss" in card
    prompts, responses = zip(*PAIRS)
    raw = lit_rlhf_raw_scores(export, prompts, responses)
    plain = [plain_transformers_logit(export, p, r) for p, r in PAIRS]
    assert raw.tolist() == pytest.approx(plain, abs=1e-5)
    # the normalised score is one line away
    scorer = load_scorer(str(export))
    normalised = [(logit - config["reward_bias"]) / config["reward_scale"] for logit in plain]
    assert scorer.score_texts(prompts, responses).tolist() == pytest.approx(normalised, abs=1e-5)
    # it learned the task: positive above negative
    assert raw[0] > raw[1]

    # `predict` reads the same scores (normalised) through the datamodule and the module
    pairs = write_jsonl(export.parent / "pairs.jsonl", [{"prompt": p, "response": r} for p, r in PAIRS])
    out = export.parent / "scores.jsonl"
    writer = {"class_path": "lit_rlhf.callbacks.JsonlPredictionWriter", "init_args": {"output_path": str(out)}}
    main(
        [
            "predict",
            "--config",
            str(ROOT / "configs/quickstart/rm.yaml"),
            "--model.init_args.model.name_or_path",
            str(export),
            "--data.init_args.train_data",
            str(pairs),
            "--data.init_args.predict_data",
            str(pairs),
            "--trainer.callbacks",
            json.dumps([writer]),
            "--trainer.logger=false",
            "--trainer.enable_progress_bar=false",
        ]
    )
    predicted = [json.loads(line)["prediction"] for line in out.read_text().splitlines()]
    assert predicted == pytest.approx(normalised, abs=1e-5)


def test_decoder_rm_export_scores_the_same_with_plain_transformers(tiny_model_dir, tmp_path):
    module = RewardModule(ModelSpec(str(tiny_model_dir)))
    module.configure_model()
    set_reward_normalization(module.model, bias=0.25, scale=2.0)
    export = tmp_path / "export"
    module.export_hf(export)

    prompts, responses = zip(*PAIRS)
    tokenizer = AutoTokenizer.from_pretrained(export)
    lit_tokenizer = load_tokenizer(str(export), role="reward_model")
    for p, r in PAIRS:
        # the same ids: the export's tokenizer appends the EOS lit_rlhf reads the score at, and lit_rlhf leaves
        # that EOS off prompts (it tokenizes prompt and response separately: identical here, see the card)
        assert tokenizer(p + r)["input_ids"] == reward_text_ids(lit_tokenizer, p, r)
        assert reward_text_ids(lit_tokenizer, p, r) == reward_text_ids(module.tokenizer, p, r)
        assert tokenizer(p + r)["input_ids"][-1] == tokenizer.eos_token_id
    raw = lit_rlhf_raw_scores(export, prompts, responses)
    plain = [plain_transformers_logit(export, p + r) for p, r in PAIRS]
    assert raw.tolist() == pytest.approx(plain, abs=1e-5)
    config = json.loads((export / "config.json").read_text())
    assert (config["reward_bias"], config["reward_scale"]) == (0.25, 2.0)
    scorer = load_scorer(str(export))
    expected = [(logit - config["reward_bias"]) / config["reward_scale"] for logit in plain]
    assert scorer.score_texts(prompts, responses).tolist() == pytest.approx(expected, abs=1e-5)
    card = (export / "README.md").read_text()
    assert "tokenizer(prompt + response" in card and "(logit - reward_bias) / reward_scale" in card


# ---- PPO with reward models that have their own tokenizer ----------------------------------------------------
@pytest.fixture(scope="session")
def prompts_file(tmp_path_factory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("ppo_prompts") / "train.jsonl", prompt_examples(16, seed=1))


class ScoreRecorder:
    """Wraps ``RewardScorer.score_rollout`` and keeps what PPO saw."""

    def __init__(self, scorer) -> None:
        self.calls = []
        self.inner = scorer.score_rollout

    def __call__(self, policy_tokenizer, qr, am, mask, prompts=None):
        scores = self.inner(policy_tokenizer, qr, am, mask, prompts)
        self.calls.append((qr.clone(), mask.clone(), list(prompts), scores.clone()))
        return scores


@pytest.mark.parametrize("rm", ["encoder", "decoder"])
def test_ppo_scores_with_a_reward_model_of_another_tokenizer(
    rm, request, tiny_model_dir, prompts_file, monkeypatch, tmp_path
):
    rm_dir = (
        request.getfixturevalue("trained_bert_rm")[0]
        if rm == "encoder"
        else request.getfixturevalue("other_decoder_rm_dir")
    )
    module = PPOModule(
        policy=ModelSpec(str(tiny_model_dir)),
        reward_model=ModelSpec(str(rm_dir)),
        value_head=True,
        sampling=SamplingConfig(max_new_tokens=8),
        ppo=PPOConfig(ppo_epochs=1),
    )
    module.configure_model()
    assert not module.scorer.shares_tokens(module.tokenizer)
    recorder = ScoreRecorder(module.scorer)
    monkeypatch.setattr(module.scorer, "score_rollout", recorder)
    from lit_rlhf.datamodules.prompts import PromptDataModule

    data = PromptDataModule(str(prompts_file), batch_size=4)
    cpu_trainer(max_steps=2, default_root_dir=tmp_path).fit(module, datamodule=data)  # 2 iterations
    assert len(recorder.calls) == 2 and module.iteration == 2

    # the scores PPO saw are the reward model's own scores of the decoded texts, one text at a time
    rm_tokenizer = load_tokenizer(str(rm_dir), role="reward_model")
    rm_model = load_model(ModelSpec(str(rm_dir)), rm_tokenizer, "sequence_classifier", trainable=False)
    policy_tokenizer = module.tokenizer
    for qr, mask, prompts, scores in recorder.calls:
        responses = qr[:, -mask.shape[1] :]
        texts = [policy_tokenizer.decode(r[m], skip_special_tokens=True) for r, m in zip(responses, mask)]
        expected = []
        for prompt, text in zip(prompts, texts):
            ids = torch.tensor([reward_ids(rm_tokenizer, prompt, text)])
            with torch.no_grad():
                expected.append(sequence_scores(rm_model, ids, torch.ones_like(ids)).item())
        assert scores.tolist() == pytest.approx(expected, abs=1e-5)


def test_grpo_scores_chat_prompts_with_the_reward_models_own_template(tiny_model_dir, other_decoder_rm_dir, tmp_path):
    """Critic-free RL (GRPO, K = 2) on chat prompts with a reward model of another tokenizer: every response's
    raw score is the RM's score of the conversation rendered with the RM's own chat template plus the decoded
    response, as in PPO; a plain prompt in the same batch is scored as text."""
    from lit_rlhf.datamodules.prompts import PromptDataModule
    from lit_rlhf.models import CriticFreeConfig, CriticFreeModule

    rm_dir = tmp_path / "rm"  # the RM with a chat template of its own, unlike the policy's
    shutil.copytree(other_decoder_rm_dir, rm_dir)
    own = AutoTokenizer.from_pretrained(rm_dir)
    own.chat_template = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}{{ eos_token }}"
    own.save_pretrained(rm_dir)
    chats = [[{"role": "user", "content": "The phone was"}], [{"role": "user", "content": "Tell me: the hotel was"}]]
    rows = [{"messages": chats[0]}, {"prompt": "The movie was"}, {"messages": chats[1]}]
    module = CriticFreeModule(
        policy=ModelSpec(str(tiny_model_dir)),
        reward_model=ModelSpec(str(rm_dir)),
        algorithm=CriticFreeConfig("grpo", group_size=2),
        sampling=SamplingConfig(max_new_tokens=8),
    )
    module.configure_model()
    assert not module.scorer.shares_tokens(module.tokenizer)
    reward = module.reward
    assert not reward.normalize and reward.clip is None and reward.missing_eos_penalty is None  # raw = shaped
    data = PromptDataModule(str(write_jsonl(tmp_path / "prompts.jsonl", rows)), batch_size=3)
    data.tokenizer = module.tokenizer
    data.setup("fit")
    batch = data.collate(data.train_dataset)
    rollout, stats = module.collect_rollout(module.grouped(batch))
    assert len(rollout.scores) == 6

    policy_tokenizer = module.tokenizer
    rm_tokenizer = load_tokenizer(str(rm_dir), role="reward_model")
    rm_model = load_model(ModelSpec(str(rm_dir)), rm_tokenizer, "sequence_classifier", trainable=False)
    texts = [policy_tokenizer.decode(r[m], skip_special_tokens=True) for r, m in zip(rollout.responses, rollout.mask)]
    expected_ids, as_plain_text = [], []
    for i, text in enumerate(texts):
        row = rows[i // 2]  # a prompt's two copies are adjacent
        if "messages" in row:
            chat = rm_tokenizer.apply_chat_template(
                row["messages"] + [{"role": "assistant", "content": text}], tokenize=False
            )
            expected_ids.append(rm_tokenizer(chat, add_special_tokens=False)["input_ids"])  # ends with EOS
            # what scoring the policy's own rendering of the conversation as plain text would give
            as_plain_text.append(reward_text_ids(rm_tokenizer, batch["prompts"][i // 2], text))
        else:
            expected_ids.append(reward_text_ids(rm_tokenizer, row["prompt"], text))
            as_plain_text.append(expected_ids[-1])
    with torch.no_grad():
        expected = sequence_scores(rm_model, *pad_batch(expected_ids, rm_tokenizer.pad_token_id))
        plain = sequence_scores(rm_model, *pad_batch(as_plain_text, rm_tokenizer.pad_token_id))
    assert rollout.scores.tolist() == pytest.approx(expected.tolist(), abs=1e-5)
    assert float(stats["objective/raw_score"]) == pytest.approx(expected.mean().item(), abs=1e-5)
    chat_rows = [0, 1, 4, 5]
    assert (expected - plain)[chat_rows].abs().min() > 1e-3  # the template changes every chat row's score


def test_a_critic_with_another_tokenizer_is_refused(tiny_model_dir, tiny_classifier_dir, other_decoder_rm_dir):
    module = PPOModule(
        policy=ModelSpec(str(tiny_model_dir)),
        critic=ModelSpec(str(other_decoder_rm_dir)),
        reward_model=ModelSpec(str(tiny_classifier_dir)),
    )
    with pytest.raises(ValueError, match="a critic must share the policy's tokens"):
        module.configure_model()


# ---- classifiers with several outputs (a hub sentiment model) --------------------------------------------------
@pytest.fixture(scope="session")
def sentiment_classifiers(tmp_path_factory, tiny_model_dir, bert_dir) -> dict[str, Path]:
    """Hub-style sentiment classifiers with two logits (``id2label`` NEGATIVE/POSITIVE), saved by plain
    transformers: a Llama on the policy's tokenizer and a BERT encoder."""
    from transformers import BertForSequenceClassification, LlamaForSequenceClassification

    out = {}
    for name, base, cls in (
        ("llama", tiny_model_dir, LlamaForSequenceClassification),
        ("bert", bert_dir, BertForSequenceClassification),
    ):
        torch.manual_seed(0)
        labels = {0: "NEGATIVE", 1: "POSITIVE"}
        model = cls.from_pretrained(base, num_labels=2, id2label=labels, label2id={v: k for k, v in labels.items()})
        out[name] = tmp_path_factory.mktemp(f"sentiment_{name}")
        shutil.copytree(base, out[name], dirs_exist_ok=True)  # the tokenizer; config and weights replaced below
        model.save_pretrained(out[name])
    return out


def _head(model: torch.nn.Module) -> torch.nn.Linear:
    return model.score if hasattr(model, "score") else model.classifier


@pytest.mark.parametrize("kind", ["llama", "bert"])
def test_a_two_label_classifier_is_refused_as_reward_model_in_one_line_saying_what_to_do(
    sentiment_classifiers, tiny_model_dir, kind
):
    from lit_rlhf.errors import ConfigError

    path = sentiment_classifiers[kind]
    for load in (lambda: load_scorer(str(path)), lambda: load_scorer(ModelSpec(str(path)), device=None)):
        with pytest.raises(ConfigError) as error:
            load()
        message = str(error.value)
        assert "\n" not in message
        assert message.startswith(f"{path}: a sequence classifier with 2 labels (0: NEGATIVE, 1: POSITIVE)")
        assert "num_labels=1" in message and "train a reward-model stage from it" in message
    # the same through a PPO run's reward model
    module = PPOModule(policy=ModelSpec(str(tiny_model_dir)), reward_model=ModelSpec(str(path)), value_head=True)
    with pytest.raises(ConfigError, match="with 2 labels"):
        module.configure_model()


def test_a_two_label_classifier_is_refused_as_critic(sentiment_classifiers, tiny_model_dir, tiny_classifier_dir):
    from lit_rlhf.errors import ConfigError

    module = PPOModule(
        policy=ModelSpec(str(tiny_model_dir)),
        critic=ModelSpec(str(sentiment_classifiers["llama"])),  # the policy's tokenizer: only its labels are wrong
        reward_model=ModelSpec(str(tiny_classifier_dir)),
    )
    with pytest.raises(ConfigError, match=f"^{sentiment_classifiers['llama']}: a sequence classifier with 2 labels"):
        module.configure_model()


@pytest.mark.parametrize("kind", ["llama", "bert"])
def test_a_reward_model_stage_starts_from_a_two_label_classifier_with_a_fresh_one_output_head(
    sentiment_classifiers, kind
):
    path = sentiment_classifiers[kind]
    module = RewardModule(ModelSpec(str(path)))
    torch.manual_seed(0)  # the fresh head's draw
    module.configure_model()
    original = AutoModelForSequenceClassification.from_pretrained(path)
    head = _head(module.model)
    assert module.model.config.num_labels == 1 and head.weight.shape == (1, original.config.hidden_size)
    # the backbone is the classifier's, weight for weight; only the head is new
    head_name = "score" if kind == "llama" else "classifier"
    ours = {k: v for k, v in module.model.state_dict().items() if not k.startswith(head_name)}
    theirs = {k: v for k, v in original.state_dict().items() if not k.startswith(head_name)}
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    # RewardModule's init of a fresh head, N(0, 1/sqrt(d + 1)) with bias 0, not the classifier's rows
    std = 1 / (original.config.hidden_size + 1) ** 0.5
    assert 0.8 * std < head.weight.std().item() < 1.2 * std  # measured 1.04 (d = 64) and 1.09 (d = 32) × std
    assert head.bias is None or torch.equal(head.bias, torch.zeros(1))
    assert not any(torch.allclose(head.weight[0], row) for row in _head(original).weight)


def test_hub_rm_normalize_on_makes_the_pairs_mean_zero(tiny_model_dir, other_decoder_rm_dir, tmp_path):
    assert "reward_bias" not in json.loads((other_decoder_rm_dir / "config.json").read_text())
    rows = [{"prompt": p, "response": r} for p, r in PAIRS] + [
        {"messages": [{"role": "user", "content": "The book was"}, {"role": "assistant", "content": " dull."}]}
    ]
    pairs = write_jsonl(tmp_path / "pairs.jsonl", rows)
    prompts = [p for p, _ in PAIRS] + [[{"role": "user", "content": "The book was"}]]
    responses = [r for _, r in PAIRS] + [" dull."]

    plain = load_scorer(str(other_decoder_rm_dir))
    before = plain.score_texts(prompts, responses)
    assert abs(before.mean().item()) > 1e-3  # never normalised
    module = PPOModule(
        policy=ModelSpec(str(tiny_model_dir)),
        reward_model=ModelSpec(str(other_decoder_rm_dir)),
        value_head=True,
        reward=RewardConfig(normalize_on=str(pairs)),
    )
    module.configure_model()
    after = module.scorer.score_texts(prompts, responses)
    assert after.mean().item() == pytest.approx(0.0, abs=1e-5)
    assert (after - before).tolist() == pytest.approx([-before.mean().item()] * len(rows), abs=1e-5)
    assert reward_normalization(module.reward_model)[0] == pytest.approx(before.mean().item(), abs=1e-5)
    with pytest.raises(ValueError, match="normalize_on"):
        PPOModule(
            policy=ModelSpec(str(tiny_model_dir)), value_head=True, reward=RewardConfig(fn="a:b", normalize_on="x")
        )


def test_evaluation_and_labelling_rescore_with_the_reward_models_tokenizer(
    tiny_model_dir, other_decoder_rm_dir, tmp_path
):
    prompts = [p for p, _ in PAIRS]
    result = evaluate(str(tiny_model_dir), prompts, reward_model=str(other_decoder_rm_dir), max_new_tokens=6)
    scorer = load_scorer(str(other_decoder_rm_dir))
    responses = [row["policy_response"] for row in result.rows]
    expected = scorer.score_texts(prompts, responses).tolist()
    assert [row["policy_rm_score"] for row in result.rows] == pytest.approx(expected, abs=1e-5)
    judged = judge_scores(prompts, [r for _, r in PAIRS], str(other_decoder_rm_dir), None)
    assert judged == pytest.approx(scorer.score_texts(prompts, [r for _, r in PAIRS]).tolist(), abs=1e-6)


def test_chat_prompts_are_rerendered_with_the_reward_models_own_template(
    tiny_model_dir, other_decoder_rm_dir, tmp_path
):
    from lit_rlhf.datamodules.prompts import PromptDataModule
    from lit_rlhf.hf.reward import scoring_prompts

    rows = [
        {"messages": [{"role": "user", "content": "The phone was"}]},
        {"prompt": "The movie was"},
    ]
    policy_tokenizer = load_tokenizer(str(tiny_model_dir), padding_side="left")
    data = PromptDataModule(str(write_jsonl(tmp_path / "prompts.jsonl", rows)), batch_size=2)
    data.tokenizer = policy_tokenizer
    data.setup("fit")
    batch = data.collate(data.train_dataset)
    assert batch["prompt_messages"] == [rows[0]["messages"], None]
    answers = [" great, I loved it.", " dull."]
    response_ids = [
        policy_tokenizer(a, add_special_tokens=False)["input_ids"] + [policy_tokenizer.eos_token_id] for a in answers
    ]
    responses, mask = pad_batch(response_ids, policy_tokenizer.pad_token_id)
    qr = torch.cat([batch["prompt_input_ids"], responses], 1)
    am = torch.cat([batch["prompt_attention_mask"], mask], 1)

    scorer = load_scorer(str(other_decoder_rm_dir))
    prompts = scoring_prompts(batch["prompts"], batch["prompt_messages"])
    scores = scorer.score_rollout(policy_tokenizer, qr, am, mask.bool(), prompts)

    rm_tokenizer = scorer.tokenizer
    chat = rm_tokenizer.apply_chat_template(
        rows[0]["messages"] + [{"role": "assistant", "content": answers[0]}], tokenize=False
    )
    expected_ids = [
        rm_tokenizer(chat, add_special_tokens=False)["input_ids"],  # the template ends the turn with EOS itself
        reward_text_ids(rm_tokenizer, "The movie was", answers[1]),
    ]
    assert expected_ids[0][-1] == rm_tokenizer.eos_token_id
    with torch.no_grad():
        expected = sequence_scores(scorer.model, *pad_batch(expected_ids, rm_tokenizer.pad_token_id))
    assert scores.tolist() == pytest.approx(expected.tolist(), abs=1e-5)


def test_the_exported_tokenizer_keeps_its_bos_and_appends_eos(tmp_path):
    from tokenizers import processors

    from lit_rlhf.hf.export import tokenizer_appending_eos
    from lit_rlhf.hf.tokenization import prompt_ids

    tokenizer = build_tokenizer(TOKENIZER_TEXTS[:100], vocab_size=280)
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="<|bos|> $A", pair="<|bos|> $A $B:1", special_tokens=[("<|bos|>", bos)]
    )  # Llama-style: a BOS in front, nothing behind
    text = tokenizer("The phone was", add_special_tokens=False)["input_ids"]
    assert prompt_ids(tokenizer, "The phone was") == [bos, *text]
    tokenizer_appending_eos(tokenizer).save_pretrained(tmp_path)
    exported = AutoTokenizer.from_pretrained(tmp_path)
    assert exported("The phone was")["input_ids"] == [bos, *text, eos]
    assert prompt_ids(exported, "The phone was") == [bos, *text]  # lit_rlhf leaves the appended EOS off prompts
    assert prompt_ids(tokenizer, "The phone was") == [bos, *text]  # the original is untouched
