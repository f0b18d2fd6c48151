"""Evaluate policies: sample on held-out prompts, score, compare, and measure drift from a reference.

``evaluate(policy, prompts, ...)`` samples one response per prompt from a policy export and reports, for each
scorer (a reward-model export and/or a Python reward function named by import path, called as in PPO with the
prompt row's other columns, docs/conventions.md#reward-functions):
the mean score and, when a ``baseline`` policy is given, the win rate of the policy over it on the same
prompts (ties count half). With a ``reference`` it also reports the KL to it in nats per response
(the Monte-Carlo estimate Σ_t log π(y_t|·) − log π_ref(y_t|·) on the policy's own samples); it always reports
response length and the fraction of responses that end with EOS.

Command line: ``python -m lit_rlhf.evaluation --policy runs/quickstart/ppo/export --prompts eval.jsonl
--baseline runs/quickstart/sft/export --reference runs/quickstart/sft/export
--reward_fn lit_rlhf.quickstart.task:gold_scores --output_dir runs/quickstart/eval``.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from lit_rlhf.datamodules.prompts import PromptRow, read_prompt_rows
from lit_rlhf.hf.engines import HFEngine, RolloutEngine
from lit_rlhf.hf.generation import SamplingConfig
from lit_rlhf.hf.loading import load_model, load_tokenizer
from lit_rlhf.hf.scorers import Scorer, ScoringRows, load_scorer
from lit_rlhf.hf.specs import ModelSpec
from lit_rlhf.hf.tokenization import Messages, tokenize_prompt
from lit_rlhf.imports import RewardFn
from lit_rlhf.rlhf.logprobs import logprobs_from_logits
from lit_rlhf.rlhf.masking import response_masks
from lit_rlhf.rlhf.padding import pad_batch


@dataclass
class Samples:
    """Responses sampled for a list of prompts (one each), with their token ids."""

    prompts: list[str | Messages]  # as given: a text or a conversation
    prompt_ids: list[list[int]]
    responses: list[str]
    response_ids: torch.Tensor  # [N, T] after EOS truncation, padded with the pad id
    lengths: torch.Tensor  # [N] response tokens including the EOS
    contains_eos: torch.Tensor  # [N] bool
    prompt_texts: list[str] = field(default_factory=list)  # what the policy read: the text, or the rendered chat

    @property
    def messages(self) -> list[Messages | None]:
        """Per prompt, its conversation, or ``None`` for a text prompt."""
        return [p if isinstance(p, list) else None for p in self.prompts]

    def completion_ids(self) -> list[list[int]]:
        """Per response, its token ids up to and with the EOS."""
        return [r[: int(n)].tolist() for r, n in zip(self.response_ids, self.lengths)]


@torch.no_grad()
def sample(
    model,
    tokenizer,
    prompts: list[str | Messages],
    max_new_tokens: int,
    temperature: float = 1.0,
    batch_size: int = 32,
    seed: int = 0,
    engine: RolloutEngine | None = None,
) -> Samples:
    """Sample one response per prompt (pure ancestral sampling at ``temperature``; left-padded prompts) from the
    rollout ``engine`` serving ``model`` (default :class:`~lit_rlhf.hf.engines.HFEngine`, the one seeded
    sampler). A prompt is a text, tokenized as in SFT data, or a conversation, rendered with the chat template
    and its generation prompt (:func:`~lit_rlhf.hf.tokenization.tokenize_prompt`, as PPO's prompts)."""
    texts, prompt_ids = [], []
    for i, prompt in enumerate(prompts):
        text, ids = tokenize_prompt(tokenizer, prompt, f"prompt {i}")
        texts.append(text)
        prompt_ids.append(ids)
    sampling = SamplingConfig(max_new_tokens=max_new_tokens, temperature=temperature)
    engine = engine if engine is not None else HFEngine()
    engine.bind(model, tokenizer)
    responses = engine.generate_many(prompt_ids, sampling, seed, batch_size)
    masks = response_masks(responses, tokenizer.pad_token_id, tokenizer.eos_token_id)
    return Samples(
        prompts=list(prompts),
        prompt_ids=prompt_ids,
        responses=tokenizer.batch_decode(responses, skip_special_tokens=True),
        response_ids=responses,
        lengths=masks.mask.sum(-1),
        contains_eos=masks.contains_eos,
        prompt_texts=texts,
    )


def _sequences(samples: Samples, rows: slice, pad_token_id: int) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """Right-padded ``prompt + response`` ids of ``rows``, their mask, and each prompt's length."""
    seqs, prompt_lens = [], []
    for p, r, n in zip(samples.prompt_ids[rows], samples.response_ids[rows], samples.lengths[rows]):
        seqs.append(p + r[: int(n)].tolist())
        prompt_lens.append(len(p))
    return *pad_batch(seqs, pad_token_id), prompt_lens


@torch.no_grad()
def sample_scores(
    scorer: Scorer, samples: Samples, tokenizer, columns: list[dict] | None = None, batch_size: int = 32
) -> torch.Tensor:
    """Scores ``[N]`` (on the CPU) of the samples under any :class:`~lit_rlhf.hf.scoring.Scorer`, exactly as PPO
    scores its rollouts (:meth:`~lit_rlhf.hf.scoring.Scorer.score`): in batches of ``batch_size``, left-padded
    ``prompt + response`` ids with each row's prompt text, conversation and other ``columns``.

    A reward model reads the policy's token ids as they are when it shares their vocabulary, else re-encodes
    prompt and response with its own tokenizer; a reward function gets the prompts (a conversation's
    messages), the completions, their token ids and the columns (docs/conventions.md#reward-functions).
    """
    texts = samples.prompt_texts or [p if isinstance(p, str) else "" for p in samples.prompts]
    rows = ScoringRows(texts, samples.messages, columns)
    scores = []
    for start in range(0, len(samples.prompts), batch_size):
        chunk = slice(start, start + batch_size)
        prompt_ids, prompt_mask = pad_batch(samples.prompt_ids[chunk], tokenizer.pad_token_id, side="left")
        lengths = samples.lengths[chunk]
        length = max(int(lengths.max()), 1)
        responses = samples.response_ids[chunk, :length]
        mask = torch.arange(responses.shape[1])[None] < lengths[:, None]
        qr = torch.cat([prompt_ids, responses], 1)
        am = torch.cat([prompt_mask, mask.long()], 1)
        scores.append(scorer.score(tokenizer, qr, am, mask, rows.select(chunk)).cpu())
    return torch.cat(scores) if scores else torch.zeros(0)


@torch.no_grad()
def sequence_kl(
    policy, reference, samples: Samples, pad_token_id: int, temperature: float = 1.0, batch_size: int = 32
) -> torch.Tensor:
    """KL estimate in nats per response ``[N]``: Σ over response tokens of log π − log π_ref (k1)."""
    device = next(policy.parameters()).device
    kls = []
    for start in range(0, len(samples.prompts), batch_size):
        rows = slice(start, start + batch_size)
        input_ids, mask, prompt_lens = _sequences(samples, rows, pad_token_id)
        input_ids, mask = input_ids.to(device), mask.to(device)
        logps = [
            logprobs_from_logits(
                m(input_ids=input_ids, attention_mask=mask).logits[:, :-1], input_ids[:, 1:], temperature
            )
            for m in (policy, reference)
        ]
        positions = torch.arange(input_ids.shape[1] - 1, device=device)
        in_response = (positions[None] >= torch.tensor(prompt_lens, device=device)[:, None] - 1) & mask[:, 1:].bool()
        kls.append(((logps[0] - logps[1]) * in_response).sum(-1).cpu())
    return torch.cat(kls)


def win_rate(scores: torch.Tensor, baseline_scores: torch.Tensor) -> float:
    """Fraction of prompts where ``scores`` beat ``baseline_scores`` (ties count half)."""
    return float(((scores > baseline_scores).float() + 0.5 * (scores == baseline_scores).float()).mean())


@dataclass
class EvaluationResult:
    """Summary numbers (``summary``) and one row per prompt (``rows``)."""

    summary: dict[str, float] = field(default_factory=dict)
    rows: list[dict] = field(default_factory=list)

    def save(self, output_dir: str | Path) -> None:
        output_dir = Path(output_dir)
        output_dir.mkdir(parents=True, exist_ok=True)
        (output_dir / "summary.json").write_text(json.dumps(self.summary, indent=2) + "\n")
        with (output_dir / "samples.jsonl").open("w") as f:
            f.writelines(json.dumps(row) + "\n" for row in self.rows)


def load_frozen(path: str, kind: str = "causal_lm"):
    """``(model, tokenizer)`` of the export or hub id ``path``, frozen in eval mode, the tokenizer padding left.

    ``kind``: ``causal_lm`` (a policy, whose tokenizer must have an EOS) or ``sequence_classifier`` (a reward
    model, whose tokenizer may lack one).
    """
    spec = ModelSpec(name_or_path=path)
    role = "policy" if kind == "causal_lm" else "reward_model"
    tokenizer = load_tokenizer(spec, padding_side="left", role=role)
    return load_model(spec, tokenizer, kind=kind, trainable=False), tokenizer


def evaluate(
    policy: str,
    prompts: str | list[str | Messages | PromptRow],
    reward_model: str | None = None,
    reward_fn: str | RewardFn | None = None,
    baseline: str | None = None,
    reference: str | None = None,
    max_new_tokens: int = 32,
    temperature: float = 1.0,
    num_samples: int = 1,
    batch_size: int = 32,
    seed: int = 0,
    output_dir: str | None = None,
    engine: RolloutEngine | None = None,
) -> EvaluationResult:
    """Sample from ``policy`` (and ``baseline``) on ``prompts`` and score the responses.

    Args:
        policy: Hugging Face folder or hub id of the policy.
        prompts: a list of prompts (texts, conversations or :class:`~lit_rlhf.datamodules.prompts.PromptRow`), or
            a file, ``save_to_disk`` folder or hub dataset in any format that holds a prompt (docs/data.md);
            each row's other columns (e.g. an ``answer``) go to ``reward_fn``.
        reward_model: reward-model export (normalised scores, as PPO sees them), or any
            ``*ForSequenceClassification`` with one output; it may have its own tokenizer (responses are then
            re-encoded with it).
        reward_fn: ``package.module:function`` (or a callable): ``fn(prompts=, completions=, completion_ids=,
            **columns)`` or ``fn(prompts, responses)`` (docs/conventions.md#reward-functions).
        baseline: another policy to compare with (win rates and its own summary, prefixed ``baseline/``).
        reference: model to measure the policy's KL from (typically the SFT export).
        max_new_tokens: response length cap.
        temperature: sampling temperature (also used for the KL log-probs).
        num_samples: responses sampled per prompt (the summary averages over all of them; win rates compare
            the policy's i-th sample with the baseline's i-th sample of the same prompt).
        batch_size: prompts per generation/scoring batch.
        seed: sampling seed (the same for policy and baseline).
        output_dir: where to write ``summary.json`` and ``samples.jsonl``.
        engine: where responses come from (:class:`~lit_rlhf.hf.engines.RolloutEngine`, ``--engine
            my.module.MyEngine``); default :class:`~lit_rlhf.hf.engines.HFEngine`. It serves the policy, then the
            baseline, and is closed at the end.
    """
    if reward_model is None and reward_fn is None:
        raise ValueError("evaluate needs a scorer: `reward_model`, `reward_fn` or both.")
    rows = read_prompt_rows(prompts) if isinstance(prompts, str) else [as_prompt_row(p) for p in prompts]
    rows = [row for row in rows for _ in range(num_samples)]
    prompts, columns = [row.prompt for row in rows], [row.columns for row in rows]
    judges = {"rm_score": (reward_model, None), "fn_score": (None, reward_fn)}
    scorers = {
        key: load_scorer(model, fn, batch_size=batch_size)
        for key, (model, fn) in judges.items()
        if model is not None or fn is not None
    }

    def score(samples: Samples, tokenizer) -> dict[str, torch.Tensor]:
        return {key: sample_scores(s, samples, tokenizer, columns, batch_size) for key, s in scorers.items()}

    result = EvaluationResult()
    sampled = {}
    for name, path in (("policy", policy), ("baseline", baseline)):
        if path is None:
            continue
        model, tokenizer = load_frozen(path)
        samples = sample(model, tokenizer, prompts, max_new_tokens, temperature, batch_size, seed, engine)
        scores = score(samples, tokenizer)
        prefix = "" if name == "policy" else "baseline/"
        result.summary.update({f"{prefix}{k}": float(v.mean()) for k, v in scores.items()})
        result.summary[f"{prefix}response_length"] = float(samples.lengths.float().mean())
        result.summary[f"{prefix}eos_rate"] = float(samples.contains_eos.float().mean())
        if name == "policy" and reference is not None:
            ref_model = load_frozen(reference)[0]
            kl = sequence_kl(model, ref_model, samples, tokenizer.pad_token_id, temperature, batch_size)
            result.summary["kl_to_reference"] = float(kl.mean())
            scores["kl"] = kl
        sampled[name] = (samples, scores)
    for key in ("rm_score", "fn_score"):
        if baseline is not None and key in sampled["policy"][1]:
            result.summary[f"win_rate/{key}"] = win_rate(sampled["policy"][1][key], sampled["baseline"][1][key])
    if engine is not None:
        engine.close()
    result.rows = _rows(sampled)
    if output_dir is not None:
        result.save(output_dir)
    return result


def as_prompt_row(prompt: str | Messages | PromptRow) -> PromptRow:
    """A prompt given in Python (a text, a conversation or already a row) as a :class:`PromptRow`."""
    return prompt if isinstance(prompt, PromptRow) else PromptRow(prompt)


def _rows(sampled: dict[str, tuple[Samples, dict[str, torch.Tensor]]]) -> list[dict]:
    rows = []
    for i, prompt in enumerate(sampled["policy"][0].prompts):
        row = {"prompt": prompt}
        for name, (samples, scores) in sampled.items():
            row[f"{name}_response"] = samples.responses[i]
            row.update({f"{name}_{k}": float(v[i]) for k, v in scores.items()})
        rows.append(row)
    return rows


def main(args: list[str] | None = None) -> None:
    """``python -m lit_rlhf.evaluation``: the arguments of :func:`evaluate`; prints the summary as JSON."""
    from jsonargparse import auto_cli

    result = auto_cli(evaluate, args=args, as_positional=False)
    print(json.dumps(asdict(result)["summary"], indent=2))


if __name__ == "__main__":
    from lit_rlhf.errors import run_command

    run_command(main)
