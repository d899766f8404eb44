"""Response summaries on the wire: `ResponseSummary` <-> DistributionSummary tensors and chunks.

`encode_summary` turns an expert's response summary (`merging.fusion.summary.summarize`: its
greedy responses on the probe set and the top-k along them) into the five raw tensor entries a
`DistributionSummary` lists: ``offsets``, ``target_ids``, ``token_ids``, ``logprobs`` and
``header``, the canonical msgpack map

    {"model_name": str, "prompt_style": str, "responses": [str per prompt],
     "specials": [[role, id], ...] sorted, "strings": [[id, token string], ...] sorted by id,
     "style": str}

The prompts do not travel: every peer holds the probe set from the genesis, and `decode_summary`
takes them, refuses a summary made on another probe set, and checks the rest with
`merging.fusion.summary.check_summary` (the rule a summary file is checked with too).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from merging.fusion import FusionError
from merging.fusion.align import Vocabulary
from merging.fusion.summary import ProbeSet, ResponseSummary, check_summary
from protocol.chunks import ChunkSource, decode_entry, encode_tensors
from protocol.codecs import CodecSpec
from protocol.encoding import pack, sha256_hex, unpack
from protocol.errors import ProtocolError, SchemaError
from protocol.messages import DEFAULT_CHUNK_SIZE, MAX_SUMMARY_HEADER_BYTES, DistributionSummary, TensorEntry

HEADER_KEYS = ("model_name", "prompt_style", "responses", "specials", "strings", "style")
MAX_TOKEN_ID = 2**31 - 1


def probe_set_fingerprint(texts: Sequence[str]) -> str:
    """sha256 of the ordered probe texts (equal to `merging.fusion.summary.ProbeSet(texts).fingerprint()`)."""
    return sha256_hex(pack(["umm-probe-set-v1", list(texts)]))


def _header_bytes(summary: ResponseSummary) -> bytes:
    """The canonical msgpack header of a summary (what its ``header`` tensor holds)."""
    vocabulary = summary.vocabulary
    return pack(
        {
            "model_name": summary.model_name,
            "prompt_style": summary.prompt_style,
            "responses": list(summary.responses),
            "specials": sorted([role, int(i)] for role, i in vocabulary.specials.items()),
            "strings": [[int(i), s] for i, s in sorted(vocabulary.strings.items())],
            "style": vocabulary.style,
        }
    )


def encode_summary(
    summary: ResponseSummary, *, zstd: bool = True, chunk_size: int = DEFAULT_CHUNK_SIZE
) -> tuple[tuple[TensorEntry, ...], dict[str, bytes]]:
    """The summary's tensor entries (sorted by name) and chunks (by digest)."""
    header = _header_bytes(summary)
    if len(header) > MAX_SUMMARY_HEADER_BYTES:
        raise SchemaError(
            f"expected a summary header of at most {MAX_SUMMARY_HEADER_BYTES} bytes, got {len(header)}"
        )
    tensors = {
        "header": torch.frombuffer(bytearray(header), dtype=torch.uint8),
        "logprobs": summary.logprobs.to(torch.float32),
        "offsets": summary.offsets.to(torch.int64),
        "target_ids": summary.target_ids.to(torch.int32),
        "token_ids": summary.token_ids.to(torch.int32),
    }
    return encode_tensors(tensors, CodecSpec(name="raw", zstd=zstd, k=0, block_size=0), chunk_size)


def decode_summary(
    message: DistributionSummary, source: ChunkSource, probe_texts: Sequence[str]
) -> ResponseSummary:
    """The response summary of a verified message, on the network's probe texts.

    Raises SchemaError for a summary of another probe set or one whose parts disagree (and the
    chunk errors of protocol.chunks for missing or altered chunks).
    """
    expected = probe_set_fingerprint(probe_texts)
    if message.probe_set_fingerprint != expected:
        raise SchemaError(
            f"expected a summary for probe set {expected[:16]}, got a summary for another probe set "
            f"({message.probe_set_fingerprint[:16]})"
        )
    if message.num_examples != len(probe_texts):
        raise SchemaError(
            f"expected a summary of {len(probe_texts)} probe prompts, got num_examples {message.num_examples}"
        )
    data = {e.name: decode_entry(e, source, message.chunk_size) for e in message.tensors}
    header = _read_header(data["header"])
    try:
        summary = ResponseSummary(
            probe=ProbeSet(tuple(probe_texts)),
            responses=tuple(header["responses"]),
            offsets=data["offsets"],
            target_ids=data["target_ids"],
            token_ids=data["token_ids"],
            logprobs=data["logprobs"],
            vocabulary=Vocabulary(
                style=header["style"], strings=dict(header["strings"]), specials=dict(header["specials"])
            ),
            model_name=header["model_name"],
            prompt_style=header["prompt_style"],
        )
        check_summary(summary)
    except FusionError as exc:
        raise SchemaError(f"{exc} in the distribution summary") from None
    return summary


def _read_header(raw: torch.Tensor) -> dict[str, Any]:
    """The header map, its types and orders checked; SchemaError otherwise."""
    try:
        header = unpack(raw.numpy().tobytes(), max_size=MAX_SUMMARY_HEADER_BYTES)
    except ProtocolError as exc:
        raise SchemaError(f"expected the summary header to be canonical msgpack, got: {exc}") from None
    if not isinstance(header, dict) or tuple(header) != HEADER_KEYS:
        got = sorted(header) if isinstance(header, dict) else type(header).__name__
        raise SchemaError(f"expected a summary header map with keys {list(HEADER_KEYS)}, got {got}")
    for key in ("model_name", "prompt_style", "style"):
        if type(header[key]) is not str:
            raise SchemaError(f"expected the summary header's {key} to be a str, got another value")
    responses = header["responses"]
    if not isinstance(responses, list) or not all(type(r) is str for r in responses):
        raise SchemaError("expected the summary header's responses to be a list of str, got another value")
    header["strings"] = _pairs(header["strings"], "strings", int, str, 0)
    header["specials"] = _pairs(header["specials"], "specials", str, int, 1)
    return header


def _pairs(value: Any, key: str, first: type, second: type, id_at: int) -> list[tuple[Any, Any]]:
    """Rows [first, second] strictly sorted (by their first item), ids in [0, 2**31)."""
    shape = f"[{first.__name__}, {second.__name__}]"
    if not isinstance(value, list):
        raise SchemaError(f"expected the summary header's {key} to be a list, got {type(value).__name__}")
    rows: list[tuple[Any, Any]] = []
    for row in value:
        if (
            not isinstance(row, list)
            or len(row) != 2
            or type(row[0]) is not first
            or type(row[1]) is not second
            or not 0 <= row[id_at] <= MAX_TOKEN_ID
        ):
            raise SchemaError(
                f"expected the summary header's {key} rows {shape} with ids in [0, 2**31), got another row"
            )
        if rows and row[0] <= rows[-1][0]:
            raise SchemaError(
                f"expected the summary header's {key} sorted without duplicates, got another order"
            )
        rows.append((row[0], row[1]))
    return rows
