"""The built-in synthetic task of the offline quickstart: review continuations judged by VADER.

The quickstart runs the whole InstructGPT recipe (SFT -> reward model -> PPO) on a *tiny* Llama-style model
trained from scratch on CPU in a couple of minutes. That only works when the language is small and regular,
so this module generates it from a handful of templates with slots:

* **Prompts** are short, sentiment-free review openings such as ``"The movie was"`` or
  ``"I stayed at this hotel and it was"`` (subjects: movie, book, restaurant, hotel, phone, album, game, ...).
* **Responses** are short continuations (4-12 words, ending with ``"."``) of one of three intended
  sentiments: ``"positive"`` (``" absolutely wonderful and the ending was great."``), ``"negative"``
  (``" boring and I hated the pace."``) or ``"neutral"`` (``" fairly average from start to finish."``).
  Intensities are mixed within a class (``"good"`` vs ``"absolutely wonderful"``, one sentiment word vs
  two), so a ranking of K responses carries more information than the class labels alone.

The whole vocabulary is a few hundred words (see :func:`corpus`), small enough for a two-layer model to learn
in a few hundred steps.

**Gold judge.** Alignment is measured with VADER (Hutto & Gilbert, 2014), a rule-based sentiment analyser
whose compound score lies in ``[-1, 1]``. It is a good gold judge for a quickstart: it is deterministic,
offline, fast on CPU, independent of every model trained here (so PPO cannot "share" its reward model's
blind spots with the judge), and every sentiment word of this task is in its lexicon while the slot fillers
of the neutral class are not, so the compound of a response tracks its intended sentiment closely.
The same gold scores, plus Gaussian labeller noise, produce the rankings the reward model is trained on.
SFT data mixes the three sentiments evenly, the reward model learns to prefer positive responses, and PPO
should push the policy's VADER mean clearly above the SFT policy's.

**Determinism.** Every generator takes an integer ``seed`` and draws only from its own
:class:`random.Random`, so the same arguments always produce identical rows (across processes and
platforms), and different seeds produce different rows. :func:`write_quickstart_data` derives a separate
seed for every split, and the prompts of ``prompts/eval.jsonl`` come from a fixed held-out part of the
prompt space that no training split uses.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

from lit_rlhf.datamodules.base import write_jsonl

Sentiment = Literal["positive", "negative", "neutral"]
Split = Literal["all", "train", "eval"]

SENTIMENTS: tuple[Sentiment, ...] = ("positive", "negative", "neutral")
"""The three intended sentiments of a response."""

# --------------------------------------------------------------------------------------------------------
# Vocabulary. Prompt words are all outside VADER's lexicon, so prompts are neutral. Sentiment words are all in
# it; the neutral fillers (adjectives, softeners, verbs) are not. Checked by tests/quickstart/test_task.py.
# --------------------------------------------------------------------------------------------------------

# subject -> the verb phrase used by the "I ... this {subject} and it was" opening.
_SUBJECTS: dict[str, str] = {
    "movie": "watched",
    "book": "read",
    "restaurant": "ate at",
    "hotel": "stayed at",
    "phone": "bought",
    "album": "listened to",
    "game": "tried",
    "show": "watched",
    "museum": "visited",
    "laptop": "bought",
    "cafe": "visited",
    "podcast": "listened to",
    "concert": "went to",
    "camera": "bought",
    "series": "watched",
    "course": "took",
    "app": "used",
}
_SUBJECT_MODIFIERS: tuple[str, ...] = ("", "new ")
_PROMPT_TEMPLATES: tuple[str, ...] = (
    "The {m}{s} was",
    "This {m}{s} was",
    "I thought the {m}{s} was",
    "My brother said the {m}{s} was",
    "To me the {m}{s} was",
    "In my opinion the {m}{s} was",
    "Overall, the {m}{s} was",
    "After a week, the {m}{s} was",
    "Last night the {m}{s} was",
    "I {v} this {m}{s} and it was",
)
_HELD_OUT_FRACTION = 0.2
_HELD_OUT_SEED = 20240611  # fixed: the held-out prompts must not depend on the user's seed

_ASPECTS: tuple[str, ...] = ("price", "ending", "start", "pace", "style", "design", "details", "length")

_BOOSTERS: tuple[str, ...] = ("really", "very", "absolutely", "extremely", "incredibly", "so")
_SOFTENERS: tuple[str, ...] = ("fairly", "mostly", "rather", "quite")  # no valence, mirror the boosters

_POS_MILD: tuple[str, ...] = ("good", "nice", "enjoyable", "pleasant", "fun")
_POS_STRONG: tuple[str, ...] = (
    "great",
    "wonderful",
    "amazing",
    "excellent",
    "fantastic",
    "brilliant",
    "superb",
    "delightful",
    "lovely",
    "awesome",
    "perfect",
)
_NEG_MILD: tuple[str, ...] = ("boring", "dull", "weak", "annoying", "disappointing", "poor")
_NEG_STRONG: tuple[str, ...] = ("terrible", "awful", "horrible", "bad", "painful", "dreadful", "miserable")
_NEUTRAL_ADJ: tuple[str, ...] = (
    "average",
    "ordinary",
    "typical",
    "standard",
    "normal",
    "plain",
    "simple",
    "usual",
    "long",
    "short",
    "quiet",
)

_POS_VERBS: tuple[str, ...] = ("loved", "enjoyed", "liked")
_NEG_VERBS: tuple[str, ...] = ("hated", "disliked")
_NEUTRAL_VERBS: tuple[str, ...] = ("noticed", "remember", "checked")

# Response templates. Slots: {a}/{a2} adjectives of the response's sentiment, {b} an optional booster
# (softener for neutral) with its trailing space, {v} a verb of the response's sentiment, {x} an aspect.
_POLAR_TEMPLATES: tuple[str, ...] = (
    " {b}{a} from start to finish.",
    " {b}{a} in almost every way.",
    " {b}{a} and the {x} was {a2}.",
    " {b}{a} and I {v} the {x}.",
    " {a} and {a2}, I {v} every minute of it.",
    " {b}{a}, even the {x} was {a2}.",
)
_POSITIVE_TEMPLATES: tuple[str, ...] = (
    *_POLAR_TEMPLATES,
    " {b}{a}, and I would recommend it to everyone.",
)
_NEGATIVE_TEMPLATES: tuple[str, ...] = (
    *_POLAR_TEMPLATES,
    " {b}{a}, and I would not recommend it to anyone.",
)
_NEUTRAL_TEMPLATES: tuple[str, ...] = (
    " {b}{a} from start to finish.",
    " {b}{a} in almost every way.",
    " {b}{a} and the {x} was {a2}.",
    " {b}{a} and I {v} the {x}.",
    " {a} and {a2}, about what I expected.",
    " {b}{a}, and the {x} was {a2} as usual.",
)

# sentiment -> (templates, mild adjectives, strong adjectives, verbs, modifiers).
_RESPONSE_SLOTS: dict[str, tuple[tuple[str, ...], ...]] = {
    "positive": (_POSITIVE_TEMPLATES, _POS_MILD, _POS_STRONG, _POS_VERBS, _BOOSTERS),
    "negative": (_NEGATIVE_TEMPLATES, _NEG_MILD, _NEG_STRONG, _NEG_VERBS, _BOOSTERS),
    "neutral": (_NEUTRAL_TEMPLATES, _NEUTRAL_ADJ, _NEUTRAL_ADJ, _NEUTRAL_VERBS, _SOFTENERS),
}


@lru_cache(maxsize=1)
def _analyzer() -> Any:
    """Return the (cached) VADER analyser; building it parses the lexicon, so do it once per process."""
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    return SentimentIntensityAnalyzer()


def gold_scores(prompts: Sequence[str], responses: Sequence[str]) -> list[float]:
    """Score responses with the gold judge: the VADER compound score of the response text.

    Only the response is scored. Every prompt is a sentiment-free review opening shared by all candidate
    responses to it, so including it would only add a constant (usually zero) to the text VADER sees, while
    VADER's normalisation and its rules around punctuation make the compound of ``prompt + response`` a
    slightly noisier function of what the policy actually wrote. ``prompts`` is accepted so the signature
    matches a general ``(prompts, responses) -> scores`` judge.

    Args:
        prompts: The prompts, one per response (only checked for length).
        responses: The generated continuations.

    Returns:
        One compound score in ``[-1, 1]`` per response; higher is more positive.

    Raises:
        ValueError: If ``prompts`` and ``responses`` differ in length.
    """
    if len(prompts) != len(responses):
        raise ValueError(f"got {len(prompts)} prompts but {len(responses)} responses")
    analyzer = _analyzer()
    return [float(analyzer.polarity_scores(response)["compound"]) for response in responses]


def derive_seed(seed: int, tag: str) -> int:
    """Derive a stable 63-bit seed from ``seed`` and a tag (independent of ``PYTHONHASHSEED``)."""
    digest = hashlib.sha256(f"{seed}:{tag}".encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1


def all_prompts(split: Split = "all") -> list[str]:
    """Enumerate the prompt space (or one of its fixed parts) in a stable order.

    A fixed fraction of the prompt space (independent of any user seed) is held out for evaluation; the
    ``"train"`` part is everything else.

    Args:
        split: ``"all"`` for every prompt, ``"train"`` or ``"eval"`` for the two disjoint parts.

    Returns:
        The distinct prompt strings of that part.

    Raises:
        ValueError: If ``split`` is not one of ``"all"``, ``"train"``, ``"eval"``.
    """
    if split not in ("all", "train", "eval"):
        raise ValueError(f"split must be 'all', 'train' or 'eval', got {split!r}")
    prompts = [
        template.format(m=modifier, s=subject, v=verb)
        for template in _PROMPT_TEMPLATES
        for subject, verb in _SUBJECTS.items()
        for modifier in _SUBJECT_MODIFIERS
    ]
    if split == "all":
        return prompts
    shuffled = list(prompts)
    random.Random(_HELD_OUT_SEED).shuffle(shuffled)
    held_out = set(shuffled[: round(_HELD_OUT_FRACTION * len(shuffled))])
    return [p for p in prompts if (p in held_out) == (split == "eval")]


def make_prompts(n: int, seed: int, *, split: Split = "all") -> list[str]:
    """Draw ``n`` review openings, deterministically.

    Prompts are drawn without replacement from a seeded shuffle of the prompt space (re-shuffled whenever it
    is exhausted), so up to the size of the space they are all distinct.

    Args:
        n: Number of prompts.
        seed: Random seed.
        split: Which part of the prompt space to draw from (see :func:`all_prompts`).

    Returns:
        ``n`` prompts such as ``"The movie was"``.

    Raises:
        ValueError: If ``n < 0``.
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    rng = random.Random(seed)
    pool = all_prompts(split)
    out: list[str] = []
    while len(out) < n:
        order = list(pool)
        rng.shuffle(order)
        out.extend(order[: n - len(out)])
    return out


def make_response(rng: random.Random, sentiment: Sentiment) -> str:
    """Generate one continuation of the given intended sentiment.

    Args:
        rng: The random generator to draw from (advanced in place).
        sentiment: ``"positive"``, ``"negative"`` or ``"neutral"``.

    Returns:
        A continuation of 4-12 words with a leading space and a final ``"."``, so that ``prompt + response``
        reads naturally, e.g. ``" absolutely wonderful and the ending was great."``.

    Raises:
        ValueError: If ``sentiment`` is not one of the three sentiments.
    """
    if sentiment not in _RESPONSE_SLOTS:
        raise ValueError(f"sentiment must be one of {SENTIMENTS}, got {sentiment!r}")
    templates, mild, strong, verbs, mods = _RESPONSE_SLOTS[sentiment]
    template = rng.choice(templates)
    # Intensity: mild or strong head adjective, with or without a booster; second adjective independent.
    adjective = rng.choice(strong if rng.random() < 0.5 else mild)
    second = rng.choice(strong if rng.random() < 0.5 else mild)
    while second == adjective:
        second = rng.choice(mild + strong)
    booster = f"{rng.choice(mods)} " if rng.random() < 0.5 else ""
    return template.format(a=adjective, a2=second, b=booster, v=rng.choice(verbs), x=rng.choice(_ASPECTS))


def sft_examples(n: int, seed: int, *, split: Split = "all") -> list[dict[str, str]]:
    """Generate supervised fine-tuning rows with evenly mixed sentiments.

    The sentiments cycle positive/negative/neutral and are then shuffled, so each is ``n / 3`` (up to
    rounding) of the rows.

    Args:
        n: Number of rows.
        seed: Random seed.
        split: Which part of the prompt space the prompts come from (see :func:`all_prompts`).

    Returns:
        Rows ``{"prompt": str, "completion": str}``.
    """
    rng = random.Random(seed)
    prompts = make_prompts(n, derive_seed(seed, "sft-prompts"), split=split)
    sentiments = [SENTIMENTS[i % len(SENTIMENTS)] for i in range(n)]
    rng.shuffle(sentiments)
    return [
        {"prompt": prompt, "completion": make_response(rng, sentiment)}
        for prompt, sentiment in zip(prompts, sentiments, strict=True)
    ]


def ranking_examples(
    n: int, seed: int, k: int = 4, noise: float = 0.1, *, split: Split = "all"
) -> list[dict[str, Any]]:
    """Generate reward-model rows: ``k`` distinct responses per prompt, ranked by noisy gold scores.

    Each response's sentiment is drawn at random (re-drawn until at least two distinct sentiments occur),
    so the responses of a prompt span sentiments and intensities. The ranking sorts the responses by
    :func:`gold_scores` plus independent Gaussian noise of standard deviation ``noise`` (labellers
    disagree). The noise comes from its own seeded generator, so changing ``noise`` changes only the
    rankings, never the prompts or responses. The generator never writes ties: ``ranking`` is always a
    list of plain ints (the format also allows a nested list as a tie group, e.g. ``[2, [0, 3], 1]``).

    Args:
        n: Number of rows.
        seed: Random seed.
        k: Responses per prompt (at least 2).
        noise: Standard deviation of the labeller noise added to the gold scores (0 for the exact order).
        split: Which part of the prompt space the prompts come from (see :func:`all_prompts`).

    Returns:
        Rows ``{"prompt": str, "responses": list[str], "ranking": list[int]}`` where ``ranking`` lists
        response indices from best to worst.

    Raises:
        ValueError: If ``k < 2`` or ``noise < 0``.
    """
    if k < 2:
        raise ValueError(f"k must be >= 2, got {k}")
    if noise < 0:
        raise ValueError(f"noise must be >= 0, got {noise}")
    from lit_rlhf.labelling import ranking_from_scores  # the exact order groups ties, as judges' labels do

    rng = random.Random(seed)
    noise_rng = random.Random(derive_seed(seed, "ranking-noise"))
    prompts = make_prompts(n, derive_seed(seed, "ranking-prompts"), split=split)
    rows: list[dict[str, Any]] = []
    for prompt in prompts:
        sentiments = [rng.choice(SENTIMENTS) for _ in range(k)]
        while len(set(sentiments)) < 2:
            sentiments = [rng.choice(SENTIMENTS) for _ in range(k)]
        responses: list[str] = []
        for sentiment in sentiments:
            response = make_response(rng, sentiment)
            while response in responses:
                response = make_response(rng, sentiment)
            responses.append(response)
        scores = gold_scores([prompt] * k, responses)
        noisy = [score + noise_rng.gauss(0.0, noise) for score in scores]
        ranking = ranking_from_scores(noisy) if noise == 0 else sorted(range(k), key=lambda i: -noisy[i])
        rows.append({"prompt": prompt, "responses": responses, "ranking": ranking})
    return rows


def prompt_examples(n: int, seed: int, *, split: Split = "all") -> list[dict[str, str]]:
    """Generate PPO prompt rows.

    Args:
        n: Number of rows.
        seed: Random seed.
        split: Which part of the prompt space the prompts come from (see :func:`all_prompts`).

    Returns:
        Rows ``{"prompt": str}``.
    """
    return [{"prompt": prompt} for prompt in make_prompts(n, seed, split=split)]


def corpus(seed: int = 0, n: int = 2000) -> list[str]:
    """Build texts that cover every word of the task, for training the tiny tokenizer.

    The corpus is every prompt of the prompt space, one text per slot-filler list and per response template
    (so coverage is guaranteed, not left to chance), and ``n`` sampled ``prompt + response`` texts of all
    sentiments (so frequencies and word order look like the task).

    Args:
        seed: Random seed of the sampled texts.
        n: Number of sampled ``prompt + response`` texts.

    Returns:
        The texts.
    """
    rng = random.Random(seed)
    texts = all_prompts("all")
    fillers = (
        _ASPECTS,
        _BOOSTERS,
        _SOFTENERS,
        _POS_MILD,
        _POS_STRONG,
        _NEG_MILD,
        _NEG_STRONG,
        _NEUTRAL_ADJ,
        _POS_VERBS,
        _NEG_VERBS,
        _NEUTRAL_VERBS,
    )
    texts.extend(" ".join(words) for words in fillers)
    for template in (*_POSITIVE_TEMPLATES, *_NEGATIVE_TEMPLATES, *_NEUTRAL_TEMPLATES):
        texts.append(template.format(a="", a2="", b="", v="", x="").strip())
    prompts = make_prompts(n, derive_seed(seed, "corpus-prompts"))
    texts.extend(prompt + make_response(rng, SENTIMENTS[i % len(SENTIMENTS)]) for i, prompt in enumerate(prompts))
    return texts


def write_quickstart_data(out_dir: str | Path, seed: int = 0, **sizes: int) -> dict[str, Path]:
    """Write every data file of the quickstart: :func:`quickstart_rows` under ``out_dir``.

    Args:
        out_dir: Output directory.
        seed: Base random seed.
        **sizes: The row counts of :func:`quickstart_rows` (``n_sft_train``, ...).

    Returns:
        The written paths keyed ``"sft_train"``, ``"sft_val"``, ``"rm_train"``, ``"rm_val"``,
        ``"prompts_train"`` and ``"prompts_eval"``.
    """
    out = Path(out_dir)
    return {key: write_jsonl(out / rel, rows) for key, (rel, rows) in quickstart_rows(seed, **sizes).items()}


def quickstart_rows(
    seed: int = 0,
    n_sft_train: int = 2000,
    n_sft_val: int = 200,
    n_rank_train: int = 1000,
    n_rank_val: int = 200,
    n_prompts_train: int = 512,
    n_prompts_eval: int = 64,
) -> dict[str, tuple[str, list[dict[str, Any]]]]:
    """Every data file of the quickstart, as rows (the chat variant renders the same rows as conversations:
    :mod:`lit_rlhf.quickstart.chat`).

    Each split uses its own seed derived from ``seed``. All SFT, reward-model and PPO training prompts come
    from the ``"train"`` part of the prompt space; the PPO evaluation prompts come from the held-out
    ``"eval"`` part, so they are prompt strings no training file contains. The validation splits use
    ``"train"``-part prompts with fresh responses (they check fitting, not prompt generalisation).

    Args:
        seed: Base random seed.
        n_sft_train: Rows of ``sft/train.jsonl``.
        n_sft_val: Rows of ``sft/val.jsonl``.
        n_rank_train: Rows of ``rm/train.jsonl``.
        n_rank_val: Rows of ``rm/val.jsonl``.
        n_prompts_train: Rows of ``prompts/train.jsonl``.
        n_prompts_eval: Rows of ``prompts/eval.jsonl``.

    Returns:
        ``key -> (path relative to the data folder, rows)`` for the keys ``"sft_train"``, ``"sft_val"``,
        ``"rm_train"``, ``"rm_val"``, ``"prompts_train"`` and ``"prompts_eval"``.
    """

    def split_seed(name: str) -> int:
        return derive_seed(seed, name)

    files: dict[str, tuple[str, list[dict[str, Any]]]] = {
        "sft_train": ("sft/train.jsonl", sft_examples(n_sft_train, split_seed("sft_train"), split="train")),
        "sft_val": ("sft/val.jsonl", sft_examples(n_sft_val, split_seed("sft_val"), split="train")),
        "rm_train": ("rm/train.jsonl", ranking_examples(n_rank_train, split_seed("rm_train"), split="train")),
        # held-out rankings carry the exact gold order (ties grouped), so val/accuracy is accuracy against
        # the gold judge; training rankings carry labeller noise
        "rm_val": ("rm/val.jsonl", ranking_examples(n_rank_val, split_seed("rm_val"), noise=0.0, split="train")),
        "prompts_train": (
            "prompts/train.jsonl",
            prompt_examples(n_prompts_train, split_seed("prompts_train"), split="train"),
        ),
        "prompts_eval": (
            "prompts/eval.jsonl",
            prompt_examples(n_prompts_eval, split_seed("prompts_eval"), split="eval"),
        ),
    }
    return files
