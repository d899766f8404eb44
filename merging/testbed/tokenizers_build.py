"""Tokenizers for the tiny zoo, built with the `tokenizers` library and wrapped for transformers.

* `char_tokenizer()`: one token per printable ASCII character plus newline (the homogeneous family).
* `bpe_tokenizer(texts, vocab_size)`: a byte-level BPE trained on ``texts`` (the heterogeneous family).

Both carry ``<pad>``, ``<s>``, ``</s>``, ``<unk>`` and save as standard HF tokenizer folders that
`AutoTokenizer.from_pretrained` loads.
"""

from __future__ import annotations

from collections.abc import Iterable

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

SPECIAL_TOKENS: tuple[str, ...] = ("<pad>", "<s>", "</s>", "<unk>")
CHAR_ALPHABET: str = "\n" + "".join(chr(c) for c in range(32, 127))


def _wrap(tok: Tokenizer) -> PreTrainedTokenizerFast:
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
    wrapped.padding_side = "left"
    return wrapped


def char_tokenizer() -> PreTrainedTokenizerFast:
    """A character-level tokenizer over printable ASCII and newline (100 tokens)."""
    vocab = {token: i for i, token in enumerate([*SPECIAL_TOKENS, *CHAR_ALPHABET])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    return _wrap(tok)


def bpe_tokenizer(texts: Iterable[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer with ``vocab_size`` entries trained on ``texts`` (deterministic)."""
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return _wrap(tok)
