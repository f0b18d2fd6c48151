"""Assistant-only masks of chat conversations, for the chat templates of real model families
(docs/conventions.md#assistant-masks).

Each expected mask is computed by hand, independently of the chat-template machinery: the rendering of the
conversation is written out as text segments (``assistant`` or not), tokenized with its character offsets, and
a token is expected to be supervised exactly when it lies inside an assistant segment.
"""

from __future__ import annotations

import pytest

from lit_rlhf.datamodules import DataError, SFTDataModule
from lit_rlhf.errors import EXIT_ERROR, run_command
from lit_rlhf.hf.tokenization import IGNORE_INDEX, has_generation_markers, tokenize_messages
from lit_rlhf.quickstart.assets import FAMILIES, build_tokenizer
from lit_rlhf.quickstart.task import corpus
from tests.conftest import write_jsonl

SYSTEM, USER_1, USER_2 = "Be brief.", "Review the movie", "And the book?"
# reasoning in the content, as R1-style data holds it; only the qwen3 template treats it specially
ANSWER_1 = "<think>It moved me.</think>\nIt was great."
ANSWER_2 = "<think>It was long.</think>\nBad."
MESSAGES = [
    {"role": "system", "content": SYSTEM},
    {"role": "user", "content": USER_1},
    {"role": "assistant", "content": ANSWER_1},
    {"role": "user", "content": USER_2},
    {"role": "assistant", "content": ANSWER_2},
]

# The qwen3 family's template (reasoning dropped from answers before the last user turn) with TRL's
# `{% generation %}` markers around each answer and its end of turn; it renders the same text.
QWEN3_GENERATION_TEMPLATE = (
    "{% set ns = namespace(last_user=-1) %}{% for m in messages %}{% if m['role'] == 'user' %}"
    "{% set ns.last_user = loop.index0 %}{% endif %}{% endfor %}"
    "{% for m in messages %}{% set content = m['content'] %}"
    "{% if m['role'] == 'assistant' and loop.index0 < ns.last_user and '</think>' in content %}"
    "{% set content = content.split('</think>')[-1].lstrip('\n') %}{% endif %}"
    "{% if m['role'] == 'assistant' %}<|im_start|>assistant\n{% generation %}{{ content }}<|im_end|>\n"
    "{% endgeneration %}{% else %}<|im_start|>{{ m['role'] }}\n{{ content }}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# the rendering of MESSAGES by each family's template, written out: (text, is an assistant token)
SEGMENTS = {
    "tiny": [
        (f"<|system|>{SYSTEM}<|eos|><|user|>{USER_1}<|eos|><|assistant|>", False),
        (f"{ANSWER_1}<|eos|>", True),
        (f"<|user|>{USER_2}<|eos|><|assistant|>", False),
        (f"{ANSWER_2}<|eos|>", True),
    ],
    "chatml": [
        (
            f"<|im_start|>system\n{SYSTEM}<|im_end|>\n<|im_start|>user\n{USER_1}<|im_end|>\n<|im_start|>assistant\n",
            False,
        ),
        (f"{ANSWER_1}<|im_end|>\n", True),
        (f"<|im_start|>user\n{USER_2}<|im_end|>\n<|im_start|>assistant\n", False),
        (f"{ANSWER_2}<|im_end|>\n", True),
    ],
    "llama3": [
        (
            "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n"
            f"{SYSTEM}<|eot_id|><|start_header_id|>user<|end_header_id|>\n\n{USER_1}<|eot_id|>"
            "<|start_header_id|>assistant<|end_header_id|>\n\n",
            False,
        ),
        (f"{ANSWER_1}<|eot_id|>", True),
        (
            f"<|start_header_id|>user<|end_header_id|>\n\n{USER_2}<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n",
            False,
        ),
        (f"{ANSWER_2}<|eot_id|>", True),
    ],
    "pad_eos": [
        (f"<s>[INST] {SYSTEM} [/INST][INST] {USER_1} [/INST]", False),
        (f"{ANSWER_1}</s>", True),
        (f"[INST] {USER_2} [/INST]", False),
        (f"{ANSWER_2}</s>", True),
    ],
    # the first answer's reasoning is dropped: it precedes the last user turn
    "qwen3": [
        (
            f"<|im_start|>system\n{SYSTEM}<|im_end|>\n<|im_start|>user\n{USER_1}<|im_end|>\n<|im_start|>assistant\n",
            False,
        ),
        ("It was great.<|im_end|>\n", True),
        (f"<|im_start|>user\n{USER_2}<|im_end|>\n<|im_start|>assistant\n", False),
        (f"{ANSWER_2}<|im_end|>\n", True),
    ],
}


def tokenizer_of(name: str, template: str | None = None):
    tokenizer = build_tokenizer(corpus(seed=0, n=200), vocab_size=300, family=name)
    if template is not None:
        tokenizer.chat_template = template
    return tokenizer


def expected(tokenizer, segments, keep=None) -> tuple[list[int], list[int]]:
    """``(ids, positions)``: the ids of the written-out rendering and the positions of its assistant tokens
    (those of assistant segment number ``keep`` only, when given)."""
    text = "".join(piece for piece, _ in segments)
    spans, start = [], 0
    for piece, assistant in segments:
        if assistant:
            spans.append((start, start + len(piece)))
        start += len(piece)
    if keep is not None:
        spans = [spans[keep]]
    encoding = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    positions = []
    for position, (a, b) in enumerate(encoding["offset_mapping"]):
        inside = [lo <= a and b <= hi for lo, hi in spans]
        # no token straddles a segment boundary, so "inside" is unambiguous
        assert any(inside) or all(b <= lo or a >= hi for lo, hi in spans)
        if any(inside):
            positions.append(position)
    return encoding["input_ids"], positions


def supervised(labels) -> list[int]:
    return [i for i, label in enumerate(labels) if label != IGNORE_INDEX]


# every family but qwen3, whose template rewrites earlier turns (tests below)
@pytest.mark.parametrize("name", ["tiny", "chatml", "llama3", "pad_eos"])
def test_masks_supervise_exactly_the_assistant_tokens(name):
    tokenizer = tokenizer_of(name)
    ids, positions = expected(tokenizer, SEGMENTS[name])
    input_ids, labels = tokenize_messages(tokenizer, MESSAGES, "d.jsonl:1")
    assert input_ids == ids
    assert supervised(labels) == positions
    assert [labels[i] for i in positions] == [ids[i] for i in positions]  # labels are the tokens themselves
    eos = tokenizer.eos_token
    answers = [ANSWER_1, ANSWER_2]
    tail = "\n" if name == "chatml" else ""  # ChatML's turn ends with "<|im_end|>\n"
    assert tokenizer.decode([input_ids[i] for i in positions]) == "".join(a + eos + tail for a in answers)


def test_history_rewriting_template_is_a_clear_error():
    """The qwen3 template drops the first answer's reasoning once a user turn follows it; the span of that
    answer, taken from the shorter conversation where the reasoning is kept, used to run into the next user
    turn (``<|im_start|>user\\nAnd the book?`` supervised)."""
    tokenizer = tokenizer_of("qwen3")
    assert not has_generation_markers(tokenizer)
    with pytest.raises(DataError) as info:
        tokenize_messages(tokenizer, MESSAGES, "d.jsonl:7")
    message = str(info.value)
    assert message.startswith(
        "d.jsonl:7: column 'messages', turn 2 (assistant): the chat template rewrites earlier turns"
    )
    assert "{% generation %}" in message and "assistant_turns: last" in message


def test_final_turn_of_history_rewriting_template():
    """``assistant_turns="last"``: the final answer alone, rendered as it is in the conversation."""
    tokenizer = tokenizer_of("qwen3")
    ids, positions = expected(tokenizer, SEGMENTS["qwen3"], keep=1)
    input_ids, labels = tokenize_messages(tokenizer, MESSAGES, "d.jsonl:1", assistant_turns="last")
    assert input_ids == ids
    assert supervised(labels) == positions
    assert tokenizer.decode([input_ids[i] for i in positions]) == ANSWER_2 + "<|im_end|>\n"


@pytest.mark.parametrize(("assistant_turns", "keep"), [("all", None), ("last", 1)])
def test_generation_markers_give_the_assistant_tokens(assistant_turns, keep):
    """With `{% generation %}` markers the qwen3 conversation is masked exactly, the first answer as it is
    rendered (without its reasoning), and the ids are the rendered text's (no special tokens added)."""
    plain = tokenizer_of("qwen3")
    tokenizer = tokenizer_of("qwen3", QWEN3_GENERATION_TEMPLATE)
    assert has_generation_markers(tokenizer)
    rendered = tokenizer.apply_chat_template(MESSAGES, tokenize=False)
    assert rendered == plain.apply_chat_template(MESSAGES, tokenize=False)  # the markers change no text
    ids, positions = expected(tokenizer, SEGMENTS["qwen3"], keep=keep)
    options = {} if assistant_turns == "all" else {"assistant_turns": assistant_turns}
    input_ids, labels = tokenize_messages(tokenizer, MESSAGES, "d.jsonl:1", **options)
    assert input_ids == ids == tokenizer(rendered, add_special_tokens=False)["input_ids"]
    assert supervised(labels) == positions
    want = ["It was great.<|im_end|>\n", f"{ANSWER_2}<|im_end|>\n"]
    assert tokenizer.decode([input_ids[i] for i in positions]) == "".join(want if keep is None else want[keep:])


def test_generation_markers_agree_with_the_span_rule():
    """On a template that does not rewrite history (ChatML), both ways give the same mask."""
    marked = QWEN3_GENERATION_TEMPLATE.replace("'</think>' in content", "false")
    span = tokenize_messages(tokenizer_of("chatml"), MESSAGES, "d.jsonl:1")
    markers = tokenize_messages(tokenizer_of("chatml", marked), MESSAGES, "d.jsonl:1")
    assert markers == span
    assert supervised(span[1]) == expected(tokenizer_of("chatml"), SEGMENTS["chatml"])[1]


def test_generation_prompt_unlike_the_turn_opening_is_a_clear_error():
    """A template whose generation prompt is not how it opens an assistant turn: the span start is unknown."""
    template = FAMILIES["chatml"]["template"].replace(
        "<|im_start|>assistant\n{% endif %}", "<|im_start|>assistant\n<think>\n\n</think>\n\n{% endif %}"
    )
    with pytest.raises(DataError, match=r"d\.jsonl:3: column 'messages', turn 2 \(assistant\): .*generation prompt"):
        tokenize_messages(tokenizer_of("chatml", template), MESSAGES, "d.jsonl:3")


def test_sft_data_names_file_row_and_turn(tmp_path, capsys):
    """Through SFTDataModule, the error reaches the user as one line naming file, row and turn."""
    rows = [{"messages": MESSAGES[1:3]}, {"messages": MESSAGES}]  # one answer: no history to rewrite
    path = write_jsonl(tmp_path / "d.jsonl", rows)

    def setup(**kwargs):
        dm = SFTDataModule(str(path), **kwargs)
        dm.tokenizer = tokenizer_of("qwen3")
        dm.setup("fit")
        return dm

    with pytest.raises(SystemExit) as info:
        run_command(setup)
    assert info.value.code == EXIT_ERROR
    err = capsys.readouterr().err
    assert f"error: {path}:2: column 'messages', turn 2 (assistant): the chat template rewrites earlier turns" in err

    dm = setup(assistant_turns="last")
    tokenizer = dm.tokenizer
    labels = dm.train_dataset[1]["labels"]
    assert tokenizer.decode([t for t in labels if t != IGNORE_INDEX]) == ANSWER_2 + "<|im_end|>\n"
    with pytest.raises(ValueError, match="assistant_turns must be one of all, last, got 'first'"):
        SFTDataModule(str(path), assistant_turns="first")


def test_conversation_opening_with_an_answer():
    """An assistant turn with nothing before it has no span by the span rule (there is no prefix to render),
    but has one by the generation markers."""
    messages = [{"role": "assistant", "content": "Hello."}, *MESSAGES[1:3]]
    with pytest.raises(DataError, match=r"d\.jsonl:4: column 'messages', turn 0 \(assistant\): .*starts with"):
        tokenize_messages(tokenizer_of("qwen3"), messages, "d.jsonl:4")
    tokenizer = tokenizer_of("qwen3", QWEN3_GENERATION_TEMPLATE)
    input_ids, labels = tokenize_messages(tokenizer, messages, "d.jsonl:4")
    kept = [t for t in labels if t != IGNORE_INDEX]
    assert tokenizer.decode(kept) == f"Hello.<|im_end|>\n{ANSWER_1}<|im_end|>\n"
