"""The chat-model quickstart, ``python -m lit_rlhf.quickstart --chat``: the quickstart's task as conversations.

The rows are those of the plain quickstart (:func:`lit_rlhf.quickstart.task.quickstart_rows`, same seeds), each
review opening a user turn and each continuation an assistant turn, written in TRL's conversational formats
(docs/data.md) and rendered by a ChatML tokenizer (``<|im_start|>role\\n…<|im_end|>\\n``, pad ``<|endoftext|>``,
no BOS: the convention of Qwen2.5, ``build_tokenizer(..., family="chatml")``):

* ``sft/train.jsonl``: conversational prompt-completion ``{"prompt": [user], "completion": [assistant]}``;
* ``sft/val.jsonl``: conversational language modelling ``{"messages": [user, assistant]}`` (SFT's other chat
  format, so both are exercised; SFT supervises the assistant turn of either);
* ``rm/train.jsonl``: the project's K-wise rankings with a conversational prompt,
  ``{"prompt": [user], "responses": [[assistant] × K], "ranking": [...]}`` (one forward pass per prompt, as the
  plain quickstart);
* ``rm/val.jsonl``: TRL's conversational preference ``{"prompt": [user], "chosen": [assistant], "rejected":
  [assistant]}``, one row per non-tied pair of the plain quickstart's noise-free held-out rankings (the RM's
  ``val/accuracy`` is pair-weighted, so it is the same pairwise accuracy against the gold order);
* ``prompts/{train,eval}.jsonl``: conversational prompt-only ``{"prompt": [user]}``.

An assistant turn is the plain continuation without its leading space: the space only joins a continuation to
its prompt in plain text, and VADER scores both the same (checked by tests/quickstart/test_chat_variant.py).
Outputs go under ``runs/quickstart-chat/``, configs are ``configs/quickstart-chat/``.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from lit_rlhf.datamodules.base import write_jsonl

RUN_DIR = Path("runs/quickstart-chat")
CONFIG_DIR = Path("configs/quickstart-chat")
FAMILY = "chatml"

Messages = list[dict[str, str]]


def user_turn(prompt: str) -> Messages:
    """The conversation of a plain review opening: one user turn, ``[{"role": "user", "content": prompt}]``."""
    return [{"role": "user", "content": prompt}]


def assistant_turn(response: str) -> Messages:
    """The answer of a plain continuation: one assistant turn holding it without its leading space."""
    return [{"role": "assistant", "content": response.lstrip()}]


def preference_pairs(responses: Sequence[str], ranking: Sequence[Any]) -> list[tuple[int, int]]:
    """``(better, worse)`` response indices of every non-tied pair of a best→worst ``ranking`` (an element may
    be a tie group, a list of indices: its members are not compared, InstructGPT C.2), best pairs first."""
    groups = [list(g) if isinstance(g, list) else [g] for g in ranking]
    if sorted(i for g in groups for i in g) != list(range(len(responses))):
        raise ValueError(f"ranking {list(ranking)} does not rank the {len(responses)} responses once each")
    return [(w, lose) for p, better in enumerate(groups) for worse in groups[p + 1 :] for w in better for lose in worse]


def chat_rows(key: str, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The conversational rows of one plain quickstart file (``key`` as in
    :func:`~lit_rlhf.quickstart.task.quickstart_rows`), in the format the module docstring lists for it."""
    if key == "sft_train":
        return [{"prompt": user_turn(r["prompt"]), "completion": assistant_turn(r["completion"])} for r in rows]
    if key == "sft_val":
        return [{"messages": user_turn(r["prompt"]) + assistant_turn(r["completion"])} for r in rows]
    if key == "rm_train":
        return [
            {
                "prompt": user_turn(r["prompt"]),
                "responses": [assistant_turn(response) for response in r["responses"]],
                "ranking": r["ranking"],
            }
            for r in rows
        ]
    if key == "rm_val":
        return [
            {
                "prompt": user_turn(r["prompt"]),
                "chosen": assistant_turn(r["responses"][better]),
                "rejected": assistant_turn(r["responses"][worse]),
            }
            for r in rows
            for better, worse in preference_pairs(r["responses"], r["ranking"])
        ]
    if key in ("prompts_train", "prompts_eval"):
        return [{"prompt": user_turn(r["prompt"])} for r in rows]
    raise ValueError(f"no chat rendering for quickstart file {key!r}")


def write_chat_data(out_dir: str | Path, seed: int = 0, **sizes: int) -> dict[str, Path]:
    """Write the chat variant's data files: the plain quickstart's rows (:func:`quickstart_rows`, same ``seed``
    and ``sizes``) as conversations (:func:`chat_rows`), at the same relative paths under ``out_dir``."""
    from lit_rlhf.quickstart.task import quickstart_rows

    out = Path(out_dir)
    return {
        key: write_jsonl(out / rel, chat_rows(key, rows)) for key, (rel, rows) in quickstart_rows(seed, **sizes).items()
    }


def chat_corpus(seed: int = 0) -> list[str]:
    """Texts for the ChatML tokenizer: the plain corpus, plus each sampled text as the contents of a user and an
    assistant turn (role name, newline, content without the leading space), since that is how the words meet
    the tokenizer in a rendered conversation (``"assistant\\nabsolutely"`` pre-tokenizes differently from
    ``" absolutely"``). The special tokens are not in the texts: they are added tokens, never merged."""
    from lit_rlhf.quickstart.task import SENTIMENTS, corpus, derive_seed, make_prompts, make_response

    texts = corpus(seed=seed)
    rng = random.Random(derive_seed(seed, "chat-corpus"))
    for i, prompt in enumerate(make_prompts(2000, derive_seed(seed, "chat-corpus-prompts"))):
        texts.append(f"user\n{prompt}")
        texts.append(f"assistant\n{make_response(rng, SENTIMENTS[i % len(SENTIMENTS)]).lstrip()}")
    return texts


def prepare(run_dir: Path, base_model: dict[str, int], seed: int = 0, **sizes: int) -> None:
    """Write the chat data, a ChatML tokenizer and the tiny base model under ``run_dir`` (the chat variant of
    :func:`lit_rlhf.quickstart.__main__.prepare`; same model shape and vocabulary size)."""
    from lit_rlhf.quickstart.assets import build_tiny_llama, build_tokenizer

    paths = write_chat_data(run_dir / "data", seed=seed, **sizes)
    print(f"[quickstart] chat task data: {len(paths)} files under {run_dir / 'data'}")
    tokenizer = build_tokenizer(chat_corpus(seed=seed), vocab_size=512, family=FAMILY)
    build_tiny_llama(run_dir / "base", tokenizer, seed=seed, **base_model)
    print(
        f"[quickstart] tiny Llama {base_model} with a {len(tokenizer)}-token ChatML BPE tokenizer: {run_dir / 'base'}"
    )


def evaluation_prompts(prompts_file: str | Path, tokenizer) -> tuple[list[str], dict[str, str]]:
    """The held-out conversational prompts as the texts :func:`lit_rlhf.evaluation.evaluate` samples from, and
    ``text -> user turn`` to show them in the report.

    ``evaluate`` reads standard (text) prompts (docs/data.md), so each conversation is rendered with the chat
    template and its generation prompt (``…<|im_start|>assistant\\n``). Its token ids are those the policy sees
    for the conversation in PPO: ChatML has no BOS, the special tokens are added tokens matched in the text,
    and the tokenizer adds nothing (checked by tests/quickstart/test_chat_variant.py), so sampling, the KL and
    the reward-model scores (read on the sampled ids) are those of the conversations.
    """
    from lit_rlhf.datamodules.base import read_rows
    from lit_rlhf.hf.tokenization import validate_messages

    texts, shown = [], {}
    for row in read_rows(str(prompts_file)):
        messages = validate_messages(row.data.get("prompt"), row.where, "prompt")
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        texts.append(text)
        shown[text] = " / ".join(m["content"] for m in messages)
    return texts, shown


def demonstration_vocabulary(sft_files: Iterable[str | Path]) -> set[str]:
    """Every word of the turns of the chat demonstrations (the SFT jsonl files): the vocabulary of the
    degenerate-text measure (:func:`lit_rlhf.quickstart.compare.demonstration_vocabulary` of plain rows)."""
    from lit_rlhf.datamodules.base import read_rows
    from lit_rlhf.quickstart.compare import words

    vocabulary: set[str] = set()
    for path in sft_files:
        for row in read_rows(str(path)):
            for column in ("prompt", "completion", "messages"):
                for message in row.data.get(column) or []:
                    vocabulary.update(words(message["content"]))
    return vocabulary
