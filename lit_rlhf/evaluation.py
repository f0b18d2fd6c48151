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

The prompts are sampled and scored in batches of ``batch_size``; batch ``k`` is sampled with seed ``seed + k``
(docs/conventions.md#sampling-seeds), so its responses depend on the seed, ``k`` and its own prompts only.
That lets the batches be shared out over processes: ``python -m torch.distributed.run --nproc-per-node N -m
lit_rlhf.evaluation ...`` gives process ``r`` the batches ``r, r + N, ...`` and gathers every batch's rows to rank 0,
which writes the same summary and rows, in the same order, as one process (the others write nothing). Each
process holds whole models, or, with ``--shard fsdp2``, a shard of each (FSDP2, :mod:`lit_rlhf.hf.sharding`), or
with ``--shard fsdp1`` (torch's ``FullyShardedDataParallel``, :func:`~lit_rlhf.hf.sharding.shard_model_fsdp1`;
the root unit's weights, embeddings and heads, are gathered for each sampling and scoring call):
a sharded forward is a collective, so there every process runs as many batches as the busiest (repeating one
and discarding it where it has fewer) and samples with ``synced_gpus`` (responses of different lengths).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import torch

from lit_rlhf.datamodules.prompts import PromptRow, read_prompt_rows
from lit_rlhf.errors import ConfigError
from lit_rlhf.hf import processes
from lit_rlhf.hf.engines import HFEngine, RolloutEngine
from lit_rlhf.hf.generation import SamplingConfig
from lit_rlhf.hf.loading import load_model, load_tokenizer
from lit_rlhf.hf.scorers import Scorer, ScoringRows, load_scorer
from lit_rlhf.hf.specs import ModelSpec
from lit_rlhf.hf.tokenization import Messages, tokenize_prompt
from lit_rlhf.imports import RewardFn
from lit_rlhf.outputs import keep_earlier
from lit_rlhf.rlhf.logprobs import logprobs_from_logits
from lit_rlhf.rlhf.masking import response_masks
from lit_rlhf.rlhf.padding import pad_batch, pad_sequences


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

    @classmethod
    def join(cls, parts: list[Samples], pad_token_id: int) -> Samples:
        """The samples of ``parts`` one after another (``response_ids`` padded again to the longest)."""
        rows = [row.tolist() for part in parts for row in part.response_ids]
        return cls(
            prompts=[p for part in parts for p in part.prompts],
            prompt_ids=[p for part in parts for p in part.prompt_ids],
            responses=[r for part in parts for r in part.responses],
            response_ids=pad_sequences(rows, pad_token_id) if rows else torch.zeros(0, 0, dtype=torch.long),
            lengths=torch.cat([part.lengths for part in parts]) if parts else torch.zeros(0, dtype=torch.long),
            contains_eos=torch.cat([p.contains_eos for p in parts]) if parts else torch.zeros(0, dtype=torch.bool),
            prompt_texts=[t for part in parts for t in part.prompt_texts],
        )


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
    seed_each_batch: bool = True,
) -> Samples:
    """Sample one response per prompt (pure ancestral sampling at ``temperature``; left-padded prompts) from the
    rollout ``engine`` serving ``model`` (default :class:`~lit_rlhf.hf.engines.HFEngine`, the one seeded
    sampler). A prompt is a text, tokenized as in SFT data, or a conversation, rendered with the chat template
    and its generation prompt (:func:`~lit_rlhf.hf.tokenization.tokenize_prompt`, as PPO's prompts).

    ``seed_each_batch``: batch ``k`` (prompts ``k·B .. (k+1)·B - 1``) is one engine call with seed ``seed + k``, so
    its responses do not depend on the other batches (evaluation, which shares the batches out over processes:
    docs/conventions.md#sampling-seeds); ``False``: the engine's
    :meth:`~lit_rlhf.hf.engines.RolloutEngine.generate_many` with the one ``seed`` (for :class:`HFEngine`, one
    random stream continued over the batches, as labelling samples).
    """
    sampling = SamplingConfig(max_new_tokens=max_new_tokens, temperature=temperature)
    engine = engine if engine is not None else HFEngine()
    engine.bind(model, tokenizer)
    if seed_each_batch:
        device = next(model.parameters()).device
        starts = range(0, len(prompts), batch_size)
        parts = [
            sample_batch(engine, tokenizer, prompts[i : i + batch_size], sampling, seed + k, device, start=i)
            for k, i in enumerate(starts)
        ]
        return Samples.join(parts, tokenizer.pad_token_id)
    texts, prompt_ids = _tokenize(tokenizer, prompts)
    responses = engine.generate_many(prompt_ids, sampling, seed, batch_size)
    return _samples(tokenizer, prompts, texts, prompt_ids, responses)


@torch.no_grad()
def sample_batch(
    engine: RolloutEngine,
    tokenizer,
    prompts: list[str | Messages],
    sampling: SamplingConfig,
    seed: int,
    device: torch.device | str = "cpu",
    start: int = 0,
) -> Samples:
    """One response per prompt of one batch: a single ``engine.generate`` call with ``seed`` on the left-padded
    prompts, sent to ``device`` (the policy's). ``engine`` must be bound; ``start``: the index of the first
    prompt in the whole list (for error messages)."""
    texts, prompt_ids = _tokenize(tokenizer, prompts, start)
    ids, mask = pad_batch(prompt_ids, tokenizer.pad_token_id, side="left")
    responses = engine.generate(ids.to(device), mask.to(device), sampling, seed).responses.cpu()
    return _samples(tokenizer, prompts, texts, prompt_ids, responses)


def _tokenize(tokenizer, prompts: list[str | Messages], start: int = 0) -> tuple[list[str], list[list[int]]]:
    texts, prompt_ids = [], []
    for i, prompt in enumerate(prompts, start):
        text, ids = tokenize_prompt(tokenizer, prompt, f"prompt {i}")
        texts.append(text)
        prompt_ids.append(ids)
    return texts, prompt_ids


def _samples(tokenizer, prompts, texts, prompt_ids, responses: torch.Tensor) -> Samples:
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
        """Write ``summary.json`` and ``samples.jsonl`` into ``output_dir``; those of an earlier run there are moved
        into ``output_dir/previous/<k>/`` first (announced), never overwritten."""
        output_dir = Path(output_dir)
        output_dir.mkdir(parents=True, exist_ok=True)
        kept = keep_earlier([output_dir / "summary.json", output_dir / "samples.jsonl"], output_dir)
        if kept is not None:
            print(f"[evaluation] earlier outputs kept in {kept}")
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
    shard: Literal["fsdp1", "fsdp2"] | None = None,
    timeout_s: float = 1800.0,
) -> EvaluationResult:
    """Sample from ``policy`` (and ``baseline``) on ``prompts`` and score the responses.

    Under torchrun the batches are shared out over the processes and the result is rank 0's (see the module
    docstring); the other processes return an empty :class:`EvaluationResult` and write nothing.

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
        batch_size: prompts per generation/scoring batch (per process: each batch is one process's).
        seed: sampling seed: batch ``k`` is sampled with ``seed + k`` (the same for policy and baseline), whatever
            the number of processes.
        output_dir: where to write ``summary.json`` and ``samples.jsonl`` (rank 0 only).
        engine: where responses come from (:class:`~lit_rlhf.hf.engines.RolloutEngine`, ``--engine
            my.module.MyEngine``); default :class:`~lit_rlhf.hf.engines.HFEngine`. It serves the policy, then the
            baseline, and is closed at the end.
        shard: ``fsdp2``: under torchrun, shard every model (policy, baseline, reference, reward model) over the
            processes with FSDP2 (:func:`~lit_rlhf.hf.sharding.shard_model`), for models too large to hold whole
            on each device; ``fsdp1``: the same with FSDP1 (:func:`~lit_rlhf.hf.sharding.shard_model_fsdp1`; the
            embeddings and heads are whole during each call); ``None``: each process holds whole models.
        timeout_s: process-group timeout under torchrun: a process waiting this long on the others fails.

    Raises:
        ConfigError: ``shard`` without torchrun, or with an engine other than :class:`HFEngine`.
    """
    if reward_model is None and reward_fn is None:
        raise ValueError("evaluate needs a scorer: `reward_model`, `reward_fn` or both.")
    if shard not in (None, "fsdp1", "fsdp2"):
        raise ConfigError(f"shard must be null, 'fsdp1' or 'fsdp2', got {shard!r}.")
    if shard is not None and not processes.is_launched():
        raise ConfigError(
            f"--shard {shard} shards the models over processes: launch the evaluation with torchrun, "
            "`python -m torch.distributed.run --nproc-per-node N -m lit_rlhf.evaluation ...`."
        )
    if shard is not None and engine is not None and not isinstance(engine, HFEngine):
        raise ConfigError(
            f"--shard {shard} samples the sharded policy with HFEngine; {type(engine).__name__} keeps its own "
            "weights: evaluate without --shard."
        )
    sharded = shard is not None
    with processes.group_from_env(timeout_s, force=sharded):
        rows = read_prompt_rows(prompts) if isinstance(prompts, str) else [as_prompt_row(p) for p in prompts]
        rows = [row for row in rows for _ in range(num_samples)]
        place = _Placement(shard)
        judges = {"rm_score": (reward_model, None), "fn_score": (None, reward_fn)}
        scorers = {
            key: load_scorer(model, fn, batch_size=batch_size)
            for key, (model, fn) in judges.items()
            if model is not None or fn is not None
        }
        if "rm_score" in scorers and scorers["rm_score"].model is not None:
            scorers["rm_score"].model = place(scorers["rm_score"].model, reward_model)
        sampling = SamplingConfig(max_new_tokens=max_new_tokens, temperature=temperature)
        engine = engine if engine is not None else HFEngine()
        schedule = _schedule(len(rows), batch_size, sharded)
        mine = {}
        for name, path in (("policy", policy), ("baseline", baseline)):
            if path is not None:
                ref = reference if name == "policy" else None
                mine[name] = _run_batches(path, ref, rows, scorers, engine, sampling, schedule, batch_size, seed, place)
        engine.close()
        gathered = processes.all_gather_object(mine)
        if processes.rank() != 0:
            return EvaluationResult()
        result = _summarize({name: _merge(name, gathered) for name in mine})
        if output_dir is not None:
            result.save(output_dir)
        return result


def _run_batches(
    path: str,
    reference: str | None,
    rows: list[PromptRow],
    scorers: dict[str, Scorer],
    engine: RolloutEngine,
    sampling: SamplingConfig,
    schedule: list[tuple[int, bool]],
    batch_size: int,
    seed: int,
    place: _Placement,
) -> tuple[int, dict[int, tuple[Samples, dict[str, torch.Tensor]]]]:
    """Sample the policy at ``path`` on this process's batches (``schedule``: batch ``k`` with seed ``seed + k``)
    and score them, with the KL to ``reference`` (key ``kl``). Returns the pad id and, per batch kept, its
    samples and scores."""
    model, tokenizer = load_frozen(path)
    model = place(model, path)
    ref_model = place(load_frozen(reference)[0], reference) if reference is not None else None
    engine.bind(model, tokenizer, synced_gpus=place.sharded)
    device = next(model.parameters()).device
    prompts, columns = [row.prompt for row in rows], [row.columns for row in rows]
    done = {}
    for k, keep in schedule:
        chunk = slice(k * batch_size, (k + 1) * batch_size)
        with place.whole(model):
            samples = sample_batch(engine, tokenizer, prompts[chunk], sampling, seed + k, device, chunk.start)
        scores = {}
        for key, scorer in scorers.items():
            if not keep and scorer.model is None:
                continue  # a repeat batch only keeps the sharded forwards in step; a reward function is no collective
            with place.whole(scorer.model):
                scores[key] = sample_scores(scorer, samples, tokenizer, columns[chunk], batch_size)
        if ref_model is not None:
            pad, temperature = tokenizer.pad_token_id, sampling.temperature
            with place.whole(model, ref_model):
                scores["kl"] = sequence_kl(model, ref_model, samples, pad, temperature, batch_size)
        if keep:
            done[k] = (samples, scores)
    place.release(model, ref_model)
    return tokenizer.pad_token_id, done


def _summarize(sampled: dict[str, tuple[Samples, dict[str, torch.Tensor]]]) -> EvaluationResult:
    """The summary and rows of every prompt's samples and scores (policy, then baseline)."""
    result = EvaluationResult()
    for name, (samples, scores) in sampled.items():
        prefix = "" if name == "policy" else "baseline/"
        result.summary.update({f"{prefix}{k}": float(v.mean()) for k, v in scores.items() if k != "kl"})
        result.summary[f"{prefix}response_length"] = float(samples.lengths.float().mean())
        result.summary[f"{prefix}eos_rate"] = float(samples.contains_eos.float().mean())
        if "kl" in scores:
            result.summary["kl_to_reference"] = float(scores["kl"].mean())
    for key in ("rm_score", "fn_score"):
        if "baseline" in sampled and key in sampled["policy"][1]:
            result.summary[f"win_rate/{key}"] = win_rate(sampled["policy"][1][key], sampled["baseline"][1][key])
    result.rows = _rows(sampled)
    return result


class _Placement:
    """How this process holds a frozen model: sharded over every process (``shard``: FSDP2 or FSDP1), or whole on
    its device (the CPU in a single process, where :func:`load_frozen` leaves it; ``cuda:LOCAL_RANK`` under
    torchrun on CUDA).

    Under FSDP1 the model handed back is the wrapped Hugging Face model, whose ``generate`` and scoring bypass the
    root unit's forward: every call on it goes inside :meth:`whole`, which gathers the root's own weights
    (embeddings, final norm, heads) and frees them after; its decoder layers gather theirs in each forward."""

    def __init__(self, shard: str | None) -> None:
        self.shard = shard
        self.sharded = shard is not None
        self.mesh = processes.mesh() if shard == "fsdp2" else None
        self.device = processes.device()
        self._roots: dict[int, torch.nn.Module] = {}  # FSDP1: id(wrapped model) -> its root unit

    def __call__(self, model: torch.nn.Module, name: str) -> torch.nn.Module:
        if not self.sharded:
            return model.to(self.device)
        from lit_rlhf.hf.sharding import is_dtensor

        total = sum(p.numel() for p in model.parameters())
        if self.shard == "fsdp2":
            from lit_rlhf.hf.sharding import shard_model

            placed = shard_model(model, self.mesh)
        else:
            from lit_rlhf.hf.sharding import shard_model_fsdp1

            root = shard_model_fsdp1(model, self.device)
            self._roots[id(root.module)] = root
            placed = root.module
        # what this process holds between forwards: a DTensor's local shard; FSDP1's views into its flat shard
        held = sum(p.to_local().numel() if is_dtensor(p) else p.numel() for p in placed.parameters())
        if processes.rank() == 0:
            print(f"[evaluation] {name} sharded ({self.shard}): rank 0 holds {held:,} of its {total:,} weights")
        return placed

    @contextmanager
    def whole(self, *models: torch.nn.Module | None) -> Iterator[None]:
        """A context in which the FSDP1 root units of ``models`` hold their weights whole (a collective on entry:
        every process enters it together; nothing for other placements or ``None``)."""
        roots = [self._roots[id(m)] for m in models if m is not None and id(m) in self._roots]
        with ExitStack() as stack:
            for root in roots:
                # the root unit only (its layers gather in their own forwards); frozen, nothing to write back
                stack.enter_context(type(root).summon_full_params(root, recurse=False, writeback=False))
            yield

    def release(self, *models: torch.nn.Module | None) -> None:
        """Forget the FSDP1 roots of ``models`` (done with them: their memory can go)."""
        for model in models:
            self._roots.pop(id(model), None)


def _schedule(num_prompts: int, batch_size: int, sharded: bool) -> list[tuple[int, bool]]:
    """``(batch index, keep)`` of each batch this process runs: batches ``rank, rank + N, ...`` of the
    ``N`` processes; sharded, as many as the busiest (rank 0), the missing ones a repeat of one of its own
    (or of batch 0) whose result is dropped, since every sharded forward needs every process."""
    world, rank = processes.world_size(), processes.rank()
    batches = -(-num_prompts // batch_size)
    mine = [(k, True) for k in range(rank, batches, world)]
    if sharded:
        busiest = len(range(0, batches, world))
        mine += [(mine[0][0] if mine else 0, False)] * (busiest - len(mine))
    return mine


def _merge(name: str, gathered: list[dict]) -> tuple[Samples, dict[str, torch.Tensor]]:
    """One model's samples and scores from every process's batches, in batch order."""
    pad_token_id = gathered[0][name][0]
    batches = {k: part for per_process in gathered for k, part in per_process[name][1].items()}
    ordered = [batches[k] for k in sorted(batches)]
    samples = Samples.join([s for s, _ in ordered], pad_token_id)
    keys = ordered[0][1].keys() if ordered else ()
    return samples, {key: torch.cat([scores[key] for _, scores in ordered]) for key in keys}


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
    if int(os.environ.get("RANK", "0")) == 0:  # under torchrun, rank 0 holds the result
        print(json.dumps(asdict(result)["summary"], indent=2))


if __name__ == "__main__":
    from lit_rlhf.errors import run_command

    run_command(main)
