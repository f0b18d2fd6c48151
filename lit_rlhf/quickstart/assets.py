"""Tiny offline models: a BPE tokenizer trained from code and a small Llama built from a config, and a BERT-style
encoder with a WordPiece tokenizer (no EOS: ``[CLS] … [SEP]``) to try encoder reward models offline.

They are saved as ordinary Hugging Face folders and loaded back through :mod:`lit_rlhf.hf.loading`, the
same path a hub model takes, so the quickstart and the tests exercise the real loading code offline.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import torch

# A minimal ChatML-style template, so chat-format data works with the tiny tokenizer. `{% generation %}`
# markers are not needed: lit_rlhf finds assistant spans by rendering message prefixes.
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{{ eos_token }}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
SPECIAL_TOKENS = ["<|pad|>", "<|bos|>", "<|eos|>", "<|unk|>"]


#: Chat conventions of real model families, reproduced on a tiny vocabulary so that the code paths a user's
#: checkpoint takes are tested offline. Each entry: special tokens, which of them are BOS/EOS/pad (``None`` =
#: the family ships without one), whether ``tokenizer(text)`` prepends the BOS, and the chat template.
FAMILIES: dict[str, dict] = {
    # the project's own tiny tokenizer: distinct pad, BOS, EOS; a minimal ChatML-like template
    "tiny": {
        "special": SPECIAL_TOKENS,
        "bos": "<|bos|>",
        "eos": "<|eos|>",
        "pad": "<|pad|>",
        "unk": "<|unk|>",
        "prepend_bos": False,
        "template": CHAT_TEMPLATE,
    },
    # Llama 3 (Instruct): BOS prepended by the tokenizer and written by the template, EOS = <|eot_id|>, **no pad**
    # token, and an embedding matrix with exactly one row per token (no spare row for an added pad)
    "llama3": {
        "special": ["<|begin_of_text|>", "<|eot_id|>", "<|start_header_id|>", "<|end_header_id|>"],
        "bos": "<|begin_of_text|>",
        "eos": "<|eot_id|>",
        "pad": None,
        "unk": None,
        "prepend_bos": True,
        "template": (
            "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
            "{{ m['content'] | trim }}<|eot_id|>{% endfor %}"
            "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
        ),
    },
    # Qwen2.5 / ChatML: no BOS, EOS = <|im_end|> **followed by a newline** after every turn, pad = <|endoftext|>
    "chatml": {
        "special": ["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        "bos": None,
        "eos": "<|im_end|>",
        "pad": "<|endoftext|>",
        "unk": None,
        "prepend_bos": False,
        "template": (
            "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
            "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
        ),
    },
    # Qwen3 / DeepSeek-R1 style: ChatML whose template **rewrites history**: the reasoning (`<think>...</think>`)
    # of assistant turns before the last user turn is dropped, so a rendering of a prefix of the conversation
    # is not a prefix of the rendering of the whole
    "qwen3": {
        "special": ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"],
        "bos": None,
        "eos": "<|im_end|>",
        "pad": "<|endoftext|>",
        "unk": None,
        "prepend_bos": False,
        "template": (
            "{% set ns = namespace(last_user=-1) %}{% for m in messages %}{% if m['role'] == 'user' %}"
            "{% set ns.last_user = loop.index0 %}{% endif %}{% endfor %}"
            "{% for m in messages %}{% set content = m['content'] %}"
            "{% if m['role'] == 'assistant' and loop.index0 < ns.last_user and '</think>' in content %}"
            "{% set content = content.split('</think>')[-1].lstrip('\n') %}{% endif %}"
            "<|im_start|>{{ m['role'] }}\n{{ content }}<|im_end|>\n{% endfor %}"
            "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
        ),
    },
    # Mistral-style base with pad = EOS (what `tokenizer.pad_token = tokenizer.eos_token` leaves behind), BOS
    # prepended, an [INST] template, and no spare embedding row
    "pad_eos": {
        "special": ["<s>", "</s>", "<unk>"],
        "bos": "<s>",
        "eos": "</s>",
        "pad": "</s>",
        "unk": "<unk>",
        "prepend_bos": True,
        "template": (
            "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'assistant' %}{{ m['content'] }}{{ eos_token }}"
            "{% else %}[INST] {{ m['content'] }} [/INST]{% endif %}{% endfor %}"
        ),
    },
}


def build_tokenizer(texts: Iterable[str], vocab_size: int = 512, family: str = "tiny"):
    """Train a byte-level BPE tokenizer on ``texts`` and wrap it as a ``PreTrainedTokenizerFast``.

    Byte-level BPE can encode any string, so held-out text never hits an unknown token. ``family`` (a key of
    :data:`FAMILIES`) sets the special tokens, BOS/EOS/pad and chat template of a real model family; the default
    ``"tiny"`` has distinct pad, BOS and EOS (docs/conventions.md#pad-token-distinct-from-eos).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    spec = FAMILIES[family]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=spec["special"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(list(texts), trainer=trainer)
    if spec["prepend_bos"]:
        bos = spec["bos"]
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A $B", special_tokens=[(bos, tok.token_to_id(bos))]
        )
    named = {f"{k}_token": spec[k] for k in ("pad", "bos", "eos", "unk") if spec[k] is not None}
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, **named)
    tokenizer.chat_template = spec["template"]
    return tokenizer


def build_tiny_llama(
    dirpath: str | Path,
    tokenizer,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    intermediate_size: int = 256,
    max_position_embeddings: int = 256,
    seed: int = 0,
    tie_word_embeddings: bool = False,
    vocab_size: int | None = None,
) -> Path:
    """Save a randomly initialised Llama-style causal LM and ``tokenizer`` as a Hugging Face folder.

    The embedding matrix has exactly ``len(tokenizer)`` rows, no spare row (as Llama 3's 128,256), unless
    ``vocab_size`` asks for more (rows past the tokenizer, as Qwen2's 151,936 for 151,665 tokens: a benchmark's
    output projection at a real model's size). ``hidden_size`` must be a multiple of 64 for bitsandbytes' 4-bit CPU
    kernels (block size 64).
    """
    if vocab_size is not None and vocab_size < len(tokenizer):
        raise ValueError(f"vocab_size={vocab_size} is smaller than the tokenizer's {len(tokenizer)} tokens")
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab_size or len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_heads,
        max_position_embeddings=max_position_embeddings,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=tie_word_embeddings,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    dirpath = Path(dirpath)
    model.save_pretrained(dirpath, safe_serialization=True)
    tokenizer.save_pretrained(dirpath)
    return dirpath


BERT_SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def build_wordpiece_tokenizer(texts: Iterable[str], vocab_size: int = 512):
    """Train a lower-casing WordPiece tokenizer on ``texts``, wrapped as a ``BertTokenizer``: ``[CLS] a [SEP]`` for
    one text, ``[CLS] a [SEP] b [SEP]`` (segment ids 0/1) for a pair, and no EOS, like the BERT family."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import BertTokenizer

    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    trainer = trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=BERT_SPECIAL_TOKENS, show_progress=False)
    tok.train_from_iterator(list(texts), trainer=trainer)
    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls), ("[SEP]", sep)],
    )
    return BertTokenizer(
        tokenizer_object=tok,
        unk_token="[UNK]",
        sep_token="[SEP]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        mask_token="[MASK]",
    )


def build_tiny_bert(
    dirpath: str | Path,
    tokenizer,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    intermediate_size: int = 128,
    max_position_embeddings: int = 128,
    seed: int = 0,
) -> Path:
    """Save a randomly initialised BERT encoder (``BertModel``: a reward-model run adds the scalar head) and
    ``tokenizer`` as a Hugging Face folder."""
    from transformers import BertConfig, BertModel

    config = BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        intermediate_size=intermediate_size,
        max_position_embeddings=max_position_embeddings,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    model = BertModel(config)
    dirpath = Path(dirpath)
    model.save_pretrained(dirpath, safe_serialization=True)
    tokenizer.save_pretrained(dirpath)
    return dirpath


def main(args: list[str] | None = None) -> None:
    """``python -m lit_rlhf.quickstart.assets {llama,bert} OUTPUT``: a tiny random model with a tokenizer trained
    on the quickstart corpus (``llama``: byte-level BPE with EOS; ``bert``: WordPiece without EOS)."""
    import argparse

    from lit_rlhf.quickstart.task import corpus

    parser = argparse.ArgumentParser(prog="python -m lit_rlhf.quickstart.assets", description=main.__doc__)
    parser.add_argument("kind", choices=["llama", "bert"])
    parser.add_argument("output")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--vocab_size", type=int, default=512)
    parsed = parser.parse_args(args)
    texts = corpus(seed=parsed.seed)
    if parsed.kind == "bert":
        tokenizer = build_wordpiece_tokenizer(texts, parsed.vocab_size)
        path = build_tiny_bert(parsed.output, tokenizer, seed=parsed.seed)
    else:
        tokenizer = build_tokenizer(texts, parsed.vocab_size)
        path = build_tiny_llama(parsed.output, tokenizer, seed=parsed.seed)
    print(f"tiny {parsed.kind} with a {len(tokenizer)}-token tokenizer: {path}")


if __name__ == "__main__":
    main()
