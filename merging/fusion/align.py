"""Token alignment across tokenizers: sequence alignment (DTW) and vocabulary mapping.

Token strings are first turned into the text they stand for: byte-level BPE markers (GPT-2's
byte-to-unicode table, so ``Ġ`` is a space and ``Ċ`` a newline) are decoded, SentencePiece's ``▁``
becomes a space and its byte-fallback tokens (``<0x0A>``) their character. Special tokens never
take part in text matching: they map by role (end-of-sequence to end-of-sequence, ...) or by
identical string, else they are dropped; unknown tokens match any text at no cost.

* `align_tokens`: two tokenizations of the same text aligned through their characters (the
  Levenshtein edit script between the joined texts, the identity when they are equal): tokens
  pair when they share a character. (A token-level DTW with edit-distance costs, FuseLLM's, pairs
  the continuation characters of a long token with the next short token, whose distance is
  smaller, and so moves distributions onto the wrong positions.)
* `map_vocabulary`: a source id maps to the target token with the same text, else to the target
  token at the least edit distance (`rapidfuzz`; ties to the longest common prefix, then the lower
  id); a source token whose nearest target text shares nothing with it (distance >= its length)
  is dropped.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import numpy as np
from rapidfuzz.distance import Levenshtein, Prefix
from rapidfuzz.process import cdist

BYTE_LEVEL, SENTENCEPIECE, PLAIN = "byte_level", "sentencepiece", "plain"
STYLES = (BYTE_LEVEL, SENTENCEPIECE, PLAIN)
EXACT, EDIT, DROPPED = 0, 1, 2
ROLES = ("eos", "bos", "pad", "unk")  # an id with several roles takes the first
_BYTE_FALLBACK = re.compile(r"<0x([0-9A-Fa-f]{2})>")
_QUERY_CHUNK = 64  # source strings per rapidfuzz distance matrix


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table used by byte-level BPE vocabularies."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    table, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            table[byte] = chr(byte)
        else:
            table[byte] = chr(256 + extra)
            extra += 1
    return table


_UNICODE_TO_BYTE = {char: byte for byte, char in _bytes_to_unicode().items()}


def normalize_token(token: str, style: str) -> str:
    """The text a (non-special) token string stands for under a tokenizer's marker style."""
    if style == BYTE_LEVEL:
        raw = b"".join(
            bytes([_UNICODE_TO_BYTE[c]]) if c in _UNICODE_TO_BYTE else c.encode("utf-8") for c in token
        )
        return raw.decode("utf-8", errors="replace")
    if style == SENTENCEPIECE:
        match = _BYTE_FALLBACK.fullmatch(token)
        if match:
            value = int(match.group(1), 16)
            return chr(value) if value < 0x80 else "\ufffd"
        return token.replace("\u2581", " ")
    return token


def token_style(tokenizer: Any) -> str:
    """`BYTE_LEVEL`, `SENTENCEPIECE` or `PLAIN`: from a fast tokenizer's pipeline, else its vocabulary."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        spec = json.loads(backend.to_str())
        parts = json.dumps(
            [spec.get(key) for key in ("normalizer", "pre_tokenizer", "decoder")], ensure_ascii=False
        )
        if "ByteLevel" in parts:
            return BYTE_LEVEL
        if "Metaspace" in parts or "\u2581" in parts:
            return SENTENCEPIECE
        return PLAIN
    vocab = tokenizer.get_vocab()
    byte_marks = sum(t.startswith(("\u0120", "\u010a")) for t in vocab)
    piece_marks = sum(t.startswith("\u2581") for t in vocab)
    if max(byte_marks, piece_marks) * 20 < len(vocab):
        return PLAIN
    return BYTE_LEVEL if byte_marks >= piece_marks else SENTENCEPIECE


@dataclass(frozen=True)
class Vocabulary:
    """Token strings (as stored, with markers), the marker style, and the special tokens by role
    (``eos``, ``bos``, ``pad``, ``unk``; other special tokens under their own string)."""

    style: str
    strings: dict[int, str]
    specials: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.style not in STYLES:
            from merging.fusion import FusionError

            raise FusionError(f"expected a token style among {', '.join(STYLES)}, got {self.style!r}")

    @classmethod
    def from_tokenizer(cls, tokenizer: Any, ids: Iterable[int] | None = None) -> Vocabulary:
        """The tokenizer's vocabulary: the given ids (default all) and every special token."""
        specials: dict[str, int] = {}
        for role in ROLES:
            token_id = getattr(tokenizer, f"{role}_token_id", None)
            if token_id is not None:
                specials[role] = int(token_id)
        for token, token_id in zip(tokenizer.all_special_tokens, tokenizer.all_special_ids, strict=True):
            if token_id not in specials.values():
                specials[token] = int(token_id)
        wanted = sorted(set(range(len(tokenizer)) if ids is None else ids) | set(specials.values()))
        strings = dict(zip(wanted, tokenizer.convert_ids_to_tokens(wanted), strict=True))
        return cls(
            token_style(tokenizer), {i: s if s is not None else "" for i, s in strings.items()}, specials
        )

    @cached_property
    def roles(self) -> dict[int, str]:
        """Special id -> role (the first of `ROLES` it holds, else its own string)."""
        out: dict[int, str] = {}
        for role, token_id in self.specials.items():
            out.setdefault(token_id, role)
        return out

    def text(self, token_id: int) -> str:
        """The text of a non-special token."""
        return normalize_token(self.strings[token_id], self.style)

    @cached_property
    def by_text(self) -> dict[str, int]:
        """Text -> lowest id among the non-special tokens (empty texts left out)."""
        out: dict[str, int] = {}
        for token_id in sorted(self.strings):
            if token_id not in self.roles:
                out.setdefault(self.text(token_id), token_id)
        out.pop("", None)
        return out


@dataclass(frozen=True)
class VocabularyMap:
    """Source id -> (target id or -1, EXACT | EDIT | DROPPED)."""

    targets: dict[int, tuple[int, int]]

    def __getitem__(self, source_id: int) -> tuple[int, int]:
        return self.targets[source_id]


def map_vocabulary(source: Vocabulary, target: Vocabulary, ids: Iterable[int]) -> VocabularyMap:
    """Map each source id in `ids` to a target id: specials by role, then exact text, then edit distance."""
    out: dict[int, tuple[int, int]] = {}
    pending: list[tuple[int, str]] = []
    for token_id in sorted(set(ids)):
        role = source.roles.get(token_id)
        if role is not None:
            mapped = target.specials.get(role) if role != "unk" else None
            out[token_id] = (mapped, EXACT) if mapped is not None else (-1, DROPPED)
            continue
        text = source.text(token_id)
        if text in target.by_text:
            out[token_id] = (target.by_text[text], EXACT)
        elif not text:
            out[token_id] = (-1, DROPPED)
        else:
            pending.append((token_id, text))
    choices = list(target.by_text)
    choice_ids = np.asarray([target.by_text[c] for c in choices], dtype=np.int64)
    for lo in range(0, len(pending), _QUERY_CHUNK):
        chunk = pending[lo : lo + _QUERY_CHUNK]
        distances = cdist(
            [t for _, t in chunk], choices, scorer=Levenshtein.distance, dtype=np.int32, workers=1
        )
        for (token_id, text), row in zip(chunk, distances, strict=True):
            out[token_id] = _nearest(text, row, choices, choice_ids)
    return VocabularyMap(out)


def _nearest(text: str, row: np.ndarray, choices: list[str], choice_ids: np.ndarray) -> tuple[int, int]:
    best = int(row.min()) if row.size else len(text)
    if best >= len(text):
        return -1, DROPPED
    candidates = np.flatnonzero(row == best)
    chosen = min(candidates.tolist(), key=lambda c: (-Prefix.similarity(text, choices[c]), choice_ids[c]))
    return int(choice_ids[chosen]), EDIT


WILDCARD = "\x00"  # the text an unknown token stands for while aligning: replaced at the cost of one edit


def align_tokens(
    source: Sequence[str],
    target: Sequence[str],
    *,
    source_wildcards: Sequence[bool] = (),
    target_wildcards: Sequence[bool] = (),
) -> list[tuple[int, int]]:
    """The pairs (source index, target index) of tokens that share characters, in order.

    Both sequences tokenize one text: their texts are joined and aligned character by character
    with the Levenshtein edit script (dynamic programming, `rapidfuzz`), which is the identity when
    the two texts are equal; a wildcard (an unknown token) stands for one character that any
    character replaces. A token with no aligned character (an inserted one) takes part in no pair.
    """
    s_texts = [
        WILDCARD if i < len(source_wildcards) and source_wildcards[i] else t for i, t in enumerate(source)
    ]
    t_texts = [
        WILDCARD if j < len(target_wildcards) and target_wildcards[j] else t for j, t in enumerate(target)
    ]
    s_owner = [i for i, text in enumerate(s_texts) for _ in text]
    t_owner = [j for j, text in enumerate(t_texts) for _ in text]
    s_joined, t_joined = "".join(s_texts), "".join(t_texts)
    pairs: list[tuple[int, int]] = []
    if s_joined == t_joined:
        matched = zip(range(len(s_joined)), range(len(t_joined)), strict=True)
    else:
        matched = (
            (src + offset, dst + offset)
            for tag, src, src_end, dst, _ in Levenshtein.opcodes(s_joined, t_joined)
            if tag in ("equal", "replace")
            for offset in range(src_end - src)
        )
    for s_char, t_char in matched:
        pair = (s_owner[s_char], t_owner[t_char])
        if not pairs or pairs[-1] != pair:
            pairs.append(pair)
    return pairs


def token_starts(path: Sequence[tuple[int, int]]) -> dict[int, int]:
    """Target index -> the source index whose token starts there.

    A target token takes the first source token aligned to it, provided the target token is also
    the first one aligned to that source token; a target token that continues a longer source
    token (the second half of a split) takes none.
    """
    first_target: dict[int, int] = {}
    first_source: dict[int, int] = {}
    for i, j in path:
        first_target.setdefault(i, j)
        first_source.setdefault(j, i)
    return {j: i for j, i in first_source.items() if first_target[i] == j}
