"""Distribution summaries on the wire: `TopKDistribution` <-> DistributionSummary tensors and chunks.

`encode_summary` turns the output of `merging.distribution.top_k_distribution` (plus the token
strings of every id it uses) into the five raw tensor entries a `DistributionSummary` lists;
`decode_summary` reads them back from verified chunks and checks that they are consistent:
offsets start at 0, never decrease and end at the number of positions; every id has a token
string; log-probs are <= 0 and sorted most likely first in each row.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from merging.distribution import TopKDistribution
from protocol.chunks import ChunkSource, decode_entry, encode_tensors
from protocol.codecs import CodecSpec
from protocol.encoding import pack, sha256_hex, unpack
from protocol.errors import SchemaError
from protocol.messages import DEFAULT_CHUNK_SIZE, DistributionSummary, TensorEntry

MAX_TOKEN_STRINGS_BYTES = 64 * 1024 * 1024


def probe_set_fingerprint(texts: Sequence[str]) -> str:
    """sha256 of the ordered probe texts."""
    return sha256_hex(pack(["umm-probe-set-v1", list(texts)]))


def encode_summary(
    distribution: TopKDistribution,
    strings: Mapping[int, str],
    *,
    zstd: bool = True,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> tuple[tuple[TensorEntry, ...], dict[str, bytes]]:
    """The summary's tensor entries (sorted by name) and chunks."""
    table = pack([[int(i), strings[i]] for i in sorted(strings)])
    tensors = {
        "offsets": distribution.offsets.to(torch.int64),
        "input_ids": distribution.input_ids.to(torch.int32),
        "token_ids": distribution.token_ids.to(torch.int32),
        "logprobs": distribution.logprobs.to(torch.float32),
        "token_strings": torch.frombuffer(bytearray(table), dtype=torch.uint8),
    }
    return encode_tensors(tensors, CodecSpec(name="raw", zstd=zstd, k=0, block_size=0), chunk_size)


def decode_summary(
    summary: DistributionSummary, source: ChunkSource
) -> tuple[TopKDistribution, dict[int, str]]:
    """The distribution and token strings of a verified summary; SchemaError if they disagree."""
    data = {e.name: decode_entry(e, source, summary.chunk_size) for e in summary.tensors}
    offsets, input_ids = data["offsets"], data["input_ids"].to(torch.int64)
    token_ids, logprobs = data["token_ids"].to(torch.int64), data["logprobs"]
    positions = token_ids.shape[0]
    if int(offsets[0]) != 0 or int(offsets[-1]) != positions or bool((offsets[1:] < offsets[:-1]).any()):
        raise SchemaError(f"expected offsets rising from 0 to {positions}, got others")
    if bool((logprobs > 0).any()) or bool((logprobs[:, 1:] > logprobs[:, :-1]).any()):
        raise SchemaError("expected log-probs <= 0 sorted most likely first, got others")
    strings = _token_table(data["token_strings"])
    used = torch.unique(torch.cat([input_ids, token_ids.flatten()])).tolist()
    missing = [i for i in used if i not in strings]
    if missing:
        raise SchemaError(f"expected a token string for every id used, got none for id {missing[0]}")
    distribution = TopKDistribution(
        offsets=offsets, input_ids=data["input_ids"], token_ids=data["token_ids"], logprobs=logprobs
    )
    return distribution, strings


def _token_table(raw: torch.Tensor) -> dict[int, str]:
    table = unpack(raw.numpy().tobytes(), max_size=MAX_TOKEN_STRINGS_BYTES)
    if not isinstance(table, list):
        raise SchemaError(f"expected token_strings to be a list, got {type(table).__name__}")
    out: dict[int, str] = {}
    last = -1
    for row in table:
        if (
            not isinstance(row, list)
            or len(row) != 2
            or type(row[0]) is not int
            or type(row[1]) is not str
            or not 0 <= row[0] < 2**31
        ):
            raise SchemaError(
                "expected token_strings rows [id, string] with 0 <= id < 2**31, got another row"
            )
        if row[0] <= last:
            raise SchemaError("expected token_strings sorted by id without duplicates, got another order")
        out[row[0]] = row[1]
        last = row[0]
    return out
