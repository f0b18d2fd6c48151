"""One scoring rule for chat reward models, checked across every path (issue 20, item 2;
docs/conventions.md#reward-model-input).

A tiny random reward model (seeded; its score differs from one token position to the next by far more than
the 1e-5 tolerance) scores the same conversations on every path that reads a chat RM:

1. RM training/validation: ``PreferenceDataModule`` rows → batch → ``RewardModule.score_batch``;
2. RM ``predict``: ``build_predict_example`` / ``collate_predict`` / ``predict_step``;
3. ``RewardNormalization``'s reference sequences (its fitted bias must be the training path's mean);
4. PPO / critic-free scoring, ``RewardScorer.score_rollout``, with the prompt ids of ``PromptDataModule`` and
   the response ids a policy trained by SFT samples (the final assistant turn's tokens of the SFT rendering,
   up to and including the first EOS, then padding), with the RM's vocabulary (scored as they are) and with
   another vocabulary (decoded and re-encoded);
5. evaluation, ``sample_scores``;
6. the HF export read with plain transformers, following the export's model card.

The tokenizers mimic real families offline: Llama 3 (no pad, no spare embedding row, a template that trims
the content), ChatML (``<|im_end|>\\n`` after every turn), Qwen3 (reasoning of earlier answers dropped: a
history-rewriting template) and pad = EOS (Mistral-like).
"""

from __future__ import annotations

import re
import sys

import pytest
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from lit_rlhf.callbacks.reward_normalization import RewardNormalization
from lit_rlhf.datamodules.base import read_rows, write_jsonl
from lit_rlhf.datamodules.preference import PreferenceDataModule
from lit_rlhf.datamodules.prompts import PromptDataModule
from lit_rlhf.evaluation import Samples, sample_scores
from lit_rlhf.hf import ModelSpec, load_model, load_tokenizer
from lit_rlhf.hf.export import save_pretrained_atomic
from lit_rlhf.hf.reward import RewardScorer, reward_model_card, scoring_prompts
from lit_rlhf.hf.scoring import sequence_scores
from lit_rlhf.hf.tokenization import (
    IGNORE_INDEX,
    chat_prompt,
    reward_chat_ids,
    reward_prompt_length,
    tokenize_messages,
)
from lit_rlhf.models.reward import RewardModule
from lit_rlhf.quickstart.assets import build_tiny_llama, build_tokenizer
from lit_rlhf.quickstart.task import corpus
from lit_rlhf.rlhf.masking import response_masks
from lit_rlhf.rlhf.padding import pad_batch
from tests.helpers import cpu_trainer

#: "llama3_merged": a Llama-3 tokenizer whose BPE merged "\n\n" (see the last tests): no SFT span is a whole number
#: of tokens there, so its policy is one that writes the answer's own tokens after the prompt's
FAMILIES = ("chatml", "llama3", "qwen3", "pad_eos", "llama3_merged")
MERGING_TEXTS = ["Question\n\nAnswer.\n\nThe phone was great.\n\n"] * 50
TOL = 1e-5

PROMPTS = [
    [{"role": "user", "content": "How was the phone?"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "And the movie?"}],
    # an earlier answer with reasoning: the qwen3 template drops it (before the last user turn)
    [
        {"role": "user", "content": "How was the hotel?"},
        {"role": "assistant", "content": "<think>I recall it.</think>\nIt was fine."},
        {"role": "user", "content": "And the cafe?"},
    ],
]
#: per prompt: (demonstration, chosen, rejected). "It was great." to the first prompt is the model card's example;
#: " It was bad." starts with a space that Llama 3's template trims; the last prompt's answers reason.
ANSWERS = [
    ("It was great, I loved it.", "It was great.", " It was bad."),
    ("The movie was fun.", "Fun.", "The movie was dull and weak."),
    ("<think>Think.</think>\nThe cafe was lovely.", "The cafe was nice.", "<think>Hm.</think>\nIt was awful."),
]
#: (prompt index, answer) of every scored conversation, in the order of the K = 3 rows: demo, chosen, rejected
CONVERSATIONS = [(p, a) for p, answers in enumerate(ANSWERS) for a in answers]
DEMOS = [3 * p for p in range(len(PROMPTS))]


def assistant(text: str) -> list[dict[str, str]]:
    return [{"role": "assistant", "content": text}]


def family_tokenizer(family: str, vocab_size: int):
    if family == "llama3_merged":
        return build_tokenizer(corpus(seed=0, n=200) + MERGING_TEXTS, vocab_size=vocab_size + 100, family="llama3")
    return build_tokenizer(corpus(seed=0, n=200), vocab_size=vocab_size, family=family)


@pytest.fixture(scope="module", params=FAMILIES)
def family(request, tmp_path_factory):
    """``(name, reward module, policy tokenizer of another vocabulary, folder)``; both tokenizers loaded through
    lit_rlhf, as a user's checkpoint (a pad token added where the family has none or pads with EOS)."""
    name = request.param
    root = tmp_path_factory.mktemp(f"chat_scoring_{name}")
    rm_dir = build_tiny_llama(root / "rm", family_tokenizer(name, 300), seed=0)
    torch.manual_seed(0)  # the fresh scalar head
    module = RewardModule(ModelSpec(str(rm_dir)))
    module.configure_model()
    module.model.eval()
    family_tokenizer(name, 280).save_pretrained(root / "policy")
    other = load_tokenizer(ModelSpec(str(root / "policy")))
    assert other.get_vocab() != module.tokenizer.get_vocab()
    return name, module, other, root


def sft_answer_ids(tokenizer, prompt, answer: str) -> tuple[list[int], list[int]]:
    """``(prompt ids, response ids)`` as a policy trained by SFT on ``prompt + answer`` samples them in PPO: the
    prompt's :func:`chat_prompt` ids, then the tokens of the final assistant turn of the SFT rendering (the span
    rule of docs/conventions.md#assistant-masks) up to and including the first EOS, where sampling stops. Where
    the prompt ends with a merged ``"\n\n"`` that the whole rendering splits (llama3_merged), no SFT span is a
    whole number of tokens: the policy there writes the answer's own tokens after the prompt's."""
    text, prompt_ids = chat_prompt(tokenizer, prompt, "test")
    rendered = tokenizer.apply_chat_template(prompt + assistant(answer), tokenize=False)
    eos = tokenizer.eos_token_id
    if tokenizer.convert_ids_to_tokens(prompt_ids[-1]) == "ĊĊ":  # llama3_merged: the answer's own tokens
        span = tokenizer(rendered[len(text) :], add_special_tokens=False)["input_ids"]
        return prompt_ids, span[: span.index(eos) + 1]
    ids = tokenizer(rendered, add_special_tokens=False)["input_ids"]
    assert ids[: len(prompt_ids)] == prompt_ids  # the span is a whole number of tokens for these tokenizers
    span = ids[len(prompt_ids) :]
    if not any(m["role"] == "assistant" for m in prompt):  # the SFT module's own labels supervise exactly it
        _, labels = tokenize_messages(tokenizer, prompt + assistant(answer), "test")
        assert labels == [IGNORE_INDEX] * len(prompt_ids) + span
    assert eos in span
    return prompt_ids, span[: span.index(eos) + 1]


def rollout(tokenizer, root, name: str):
    """A PPO batch of every conversation: ``PromptDataModule`` prompts (left-padded) and the SFT-sampled
    responses (right-padded, masked as PPO masks them), and the RM prompts PPO passes to the scorer."""
    path = write_jsonl(root / f"prompts_{name}.jsonl", [{"messages": PROMPTS[p]} for p, _ in CONVERSATIONS])
    data = PromptDataModule(str(path), batch_size=len(CONVERSATIONS))
    data.tokenizer = tokenizer
    batch = data.collate(data.build_examples(read_rows(str(path)), str(path)))
    responses = []
    for (p, answer), row in zip(CONVERSATIONS, batch["prompt_input_ids"], strict=True):
        prompt_ids, response_ids = sft_answer_ids(tokenizer, PROMPTS[p], answer)
        assert row[-len(prompt_ids) :].tolist() == prompt_ids
        responses.append(response_ids + [tokenizer.pad_token_id] * 3)  # padding after the EOS, as sampled
    responses, _ = pad_batch(responses, tokenizer.pad_token_id)
    _, mask, contains_eos = response_masks(responses, tokenizer.pad_token_id, tokenizer.eos_token_id)
    assert bool(contains_eos.all())
    qr = torch.cat([batch["prompt_input_ids"], responses], 1)
    am = torch.cat([batch["prompt_attention_mask"], mask.long()], 1)
    return qr, am, mask, scoring_prompts(batch["prompts"], batch["prompt_messages"])


def ppo_scores(scorer: RewardScorer, tokenizer, root, name: str) -> torch.Tensor:
    qr, am, mask, prompts = rollout(tokenizer, root, name)
    return scorer.score_rollout(tokenizer, qr, am, mask, prompts)


def evaluation_scores(scorer: RewardScorer, tokenizer, root, name: str) -> torch.Tensor:
    qr, _, mask, prompts = rollout(tokenizer, root, name)
    length = mask.shape[1]
    prompt_ids = [chat_prompt(tokenizer, PROMPTS[p], "test")[1] for p, _ in CONVERSATIONS]
    samples = Samples(
        prompts=prompts,
        prompt_ids=prompt_ids,
        responses=[],
        response_ids=qr[:, -length:],
        lengths=mask.sum(-1),
        contains_eos=torch.ones(len(prompts), dtype=torch.bool),
    )
    return sample_scores(scorer, samples, tokenizer)


def test_a_chat_rm_scores_a_conversation_identically_on_every_path(family, monkeypatch, capsys):
    name, module, other, root = family
    tokenizer = module.tokenizer
    # 1. RM training: K = 3 ranked conversations per prompt (demonstration, chosen, rejected)
    rows = [
        {"responses": [PROMPTS[p] + assistant(a) for a in answers], "ranking": [1, 0, 2]}
        for p, answers in enumerate(ANSWERS)
    ]
    train_file = write_jsonl(root / "train.jsonl", rows)
    data = PreferenceDataModule(str(train_file), max_length=256)
    data.tokenizer = tokenizer
    examples = data.build_examples(read_rows(str(train_file)), str(train_file))
    assert len(examples) == len(PROMPTS)
    with torch.no_grad():
        trained = module.score_batch(data.collate(examples)).reshape(-1)  # raw, in CONVERSATIONS order
    # the sequences are the one rule's, and the prompt is PPO's prompt
    for (p, answer), example_ids in zip(CONVERSATIONS, [ids for e in examples for ids in e["input_ids"]], strict=True):
        assert example_ids == reward_chat_ids(tokenizer, PROMPTS[p], assistant(answer))
        assert example_ids[: reward_prompt_length(tokenizer, PROMPTS[p])] == chat_prompt(tokenizer, PROMPTS[p], "t")[1]
    # a score read one token later (the old rule read ChatML's "\n" + an appended EOS) is far off
    with torch.no_grad():
        ids = reward_chat_ids(tokenizer, PROMPTS[0], assistant(ANSWERS[0][0]))
        shifted = torch.tensor([ids + [tokenizer.eos_token_id]])
        assert abs(sequence_scores(module.model, shifted, torch.ones_like(shifted), False).item() - trained[0]) > 1e-3

    # 2. predict (normalisation still (0, 1): raw = normalised)
    predict_file = write_jsonl(
        root / "predict.jsonl", [{"response": PROMPTS[p] + assistant(a)} for p, a in CONVERSATIONS]
    )
    predict = PreferenceDataModule(str(train_file), predict_data=str(predict_file), max_length=256, batch_size=4)
    predict.tokenizer = tokenizer
    predict.setup("predict")
    with torch.no_grad():
        predicted = torch.cat([module.predict_step(b, i) for i, b in enumerate(predict.predict_dataloader())])
    torch.testing.assert_close(predicted, trained, atol=TOL, rtol=0)

    # 3. normalisation on the demonstrations: the callback's bias is their mean score on the training path
    reference = write_jsonl(
        root / "reference.jsonl", [{"messages": PROMPTS[p] + assistant(a[0])} for p, a in enumerate(ANSWERS)]
    )
    callback = RewardNormalization(str(reference), batch_size=2)
    callback.on_train_end(cpu_trainer(), module)
    assert callback.bias == pytest.approx(trained[DEMOS].double().mean().item(), abs=TOL)
    assert abs(callback.bias) > 1e-3  # a real shift
    expected = trained - callback.bias

    # 4. PPO / critic-free scoring, same vocabulary (the ids as sampled) and another one (decoded, re-encoded)
    scorer = RewardScorer(module.model, tokenizer, batch_size=4)
    assert scorer.shares_tokens(tokenizer) and not scorer.shares_tokens(other)
    for policy_tokenizer in (tokenizer, other):
        scores = ppo_scores(scorer, policy_tokenizer, root, name)
        torch.testing.assert_close(scores, expected, atol=TOL, rtol=0)
        assert abs(scores[DEMOS].double().mean().item()) < TOL  # normalised demonstrations: mean 0 in PPO
        # 5. evaluation
        torch.testing.assert_close(evaluation_scores(scorer, policy_tokenizer, root, name), expected, atol=TOL, rtol=0)

    # 6. the export read with plain transformers, by the model card's own recipe
    export = root / "export"
    module.export_hf(export)
    plain = AutoModelForSequenceClassification.from_pretrained(export).eval()
    plain_tokenizer = AutoTokenizer.from_pretrained(export)
    card = (export / "README.md").read_text()
    code = re.search(r"```python\n(.*?)```", card, re.S).group(1)
    monkeypatch.setattr(sys, "argv", ["README.md", str(export)])
    exec(compile(code, "README.md", "exec"), {"__name__": "__main__"})
    printed = [float(x) for x in capsys.readouterr().out.split()]
    assert len(printed) == 2
    assert printed[1] == pytest.approx(expected[1].item(), abs=TOL)  # "How was the phone?" → "It was great."
    for (p, answer), want in zip(CONVERSATIONS, expected, strict=True):
        ids = reward_chat_ids(plain_tokenizer, PROMPTS[p], assistant(answer))
        with torch.no_grad():
            logit = plain(input_ids=torch.tensor([ids])).logits[0, 0].item()
        assert (logit - plain.config.reward_bias) / plain.config.reward_scale == pytest.approx(want.item(), abs=TOL)


def test_the_answer_is_tokenized_apart_from_the_prompt_as_ppo_samples_it():
    """Llama 3's template writes ``"\\n\\n"`` between the assistant header and the answer. A byte-level BPE that
    merged ``"\\n\\n"`` tokenizes it as one token at the end of the prompt PPO samples after, but as ``"\\n"``,
    ``"\\n"`` before a word of the whole rendering: the RM sequence is the prompt's ids then the answer's ids,
    tokenized apart, what PPO scores (it was the whole rendering, whose prefix is no PPO prompt)."""
    tokenizer = family_tokenizer("llama3_merged", 300)
    prompt, answer = PROMPTS[0], assistant(" It was great.")  # the template trims the leading space
    text, prompt_ids = chat_prompt(tokenizer, prompt, "test")
    assert tokenizer.convert_ids_to_tokens(prompt_ids[-1:]) == ["ĊĊ"]
    rendered = tokenizer.apply_chat_template(prompt + answer, tokenize=False)
    whole = tokenizer(rendered, add_special_tokens=False)["input_ids"]
    assert whole[: len(prompt_ids)] != prompt_ids  # the whole rendering merges across the boundary
    answer_ids = tokenizer(rendered[len(text) :], add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(answer_ids) == "It was great.<|eot_id|>"
    ids = reward_chat_ids(tokenizer, prompt, answer)
    assert ids == prompt_ids + answer_ids
    assert reward_prompt_length(tokenizer, prompt) == len(prompt_ids)


def test_a_template_without_a_place_where_the_answer_starts_reads_the_whole_rendering(
    tiny_tokenizer, tiny_model_dir, tmp_path, monkeypatch, capsys
):
    """A template that writes one EOS after the last turn, whoever wrote it, renders a prompt (with the
    generation prompt) that the conversation does not begin with: no policy samples that sequence, so only a
    reward model that re-encodes can read it (its template differs from the policy's: ``shares_tokens`` is
    False even with the same vocabulary), and its sequence is the whole rendering, ending at its EOS, in
    training and in PPO alike."""
    tokenizer = load_tokenizer(ModelSpec(str(tiny_model_dir)))
    tokenizer.chat_template = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}{{ eos_token }}"
    conversation = PROMPTS[0] + assistant("It was great.")
    rendered = "[user] How was the phone?\n[assistant] It was great.\n<|eos|>"
    assert tokenizer.apply_chat_template(conversation, tokenize=False) == rendered
    ids = reward_chat_ids(tokenizer, PROMPTS[0], assistant("It was great."))
    assert ids == tokenizer(rendered, add_special_tokens=False)["input_ids"] and ids[-1] == tokenizer.eos_token_id
    model = load_model(ModelSpec(str(tiny_model_dir)), tokenizer, "sequence_classifier", trainable=False)
    scorer = RewardScorer(model, tokenizer)
    assert tokenizer.get_vocab() == tiny_tokenizer.get_vocab()
    assert not scorer.shares_tokens(tiny_tokenizer) and scorer.shares_tokens(tokenizer)
    # PPO: the policy (tiny_tokenizer's own template) answered; the RM re-renders with its template
    _, prompt_ids = chat_prompt(tiny_tokenizer, PROMPTS[0], "test")
    response_ids = tiny_tokenizer("It was great.", add_special_tokens=False)["input_ids"] + [
        tiny_tokenizer.eos_token_id
    ]
    score = scorer.score_sequences(tiny_tokenizer, [prompt_ids], [response_ids], [PROMPTS[0]])
    with torch.no_grad():
        trained = sequence_scores(model, torch.tensor([ids]), torch.ones(1, len(ids), dtype=torch.long))
    torch.testing.assert_close(score, trained, atol=TOL, rtol=0)
    # the export's model card builds the same sequence
    model.config.reward_bias, model.config.reward_scale = 0.25, 2.0
    card = reward_model_card(model, tokenizer, base="tiny", training="test")
    out = save_pretrained_atomic(
        model, tokenizer, tmp_path / "rm", ModelSpec(str(tiny_model_dir)), "sequence_classifier", model_card=card
    )
    code = re.search(r"```python\n(.*?)```", card, re.S).group(1)
    monkeypatch.setattr(sys, "argv", ["README.md", str(out)])
    exec(compile(code, "README.md", "exec"), {"__name__": "__main__"})
    printed = [float(x) for x in capsys.readouterr().out.split()]
    assert printed[1] == pytest.approx((trained.item() - 0.25) / 2.0, abs=TOL)
    # one that writes no EOS: the trailing layout dropped, the EOS appended
    tokenizer.chat_template = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}[end]\n"
    expected = tokenizer("[user] How was the phone?\n[assistant] It was great.\n[end]", add_special_tokens=False)
    assert reward_chat_ids(tokenizer, PROMPTS[0], assistant("It was great.")) == expected["input_ids"] + [
        tokenizer.eos_token_id
    ]
