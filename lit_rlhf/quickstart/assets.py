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


def build_tokenizer(texts: Iterable[str], vocab_size: int = 512):
    """Train a byte-level BPE tokenizer on ``texts`` and wrap it as a ``PreTrainedTokenizerFast``.

    Byte-level BPE can encode any string, so held-out text never hits an unknown token. Pad, BOS and EOS are
    distinct special tokens (docs/conventions.md#pad-token-distinct-from-eos).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(list(texts), trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<|pad|>",
        bos_token="<|bos|>",
        eos_token="<|eos|>",
        unk_token="<|unk|>",
    )
    tokenizer.chat_template = CHAT_TEMPLATE
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
) -> Path:
    """Save a randomly initialised Llama-style causal LM and ``tokenizer`` as a Hugging Face folder.

    ``hidden_size`` must be a multiple of 64 for bitsandbytes' 4-bit CPU kernels (block size 64).
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_heads,
        max_position_embeddings=max_position_embeddings,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=False,
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
