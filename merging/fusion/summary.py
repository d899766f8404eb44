"""Response summaries: what a heterogeneous expert publishes about itself on the network's probe set.

Per probe prompt the summary holds the expert's own response (greedy, its tokenizer; or the probe
set's reference response, teacher-forced, when there is one) and, for every response token (and
the end-of-sequence token that closes it), the expert's top-k next-token ids and log-probabilities
(most likely first, ties by lower id), plus the token strings of every id used and the tokenizer's
marker style and special tokens, which `merging.fusion.align` needs to map them to another
vocabulary. A file is one safetensors: four tensors and a JSON header; `load_summary` checks it
(`check_summary`, the rule the protocol's `decode_summary` applies too).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgpack
import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from merging.atomic import write_atomic
from merging.fusion import FusionError
from merging.fusion.align import Vocabulary

FORMAT = "umm-response-summary-v1"
PLAIN_PROMPTS, CHAT_PROMPTS, AUTO_PROMPTS = "plain", "chat", "auto"
PROMPT_STYLES = (AUTO_PROMPTS, PLAIN_PROMPTS, CHAT_PROMPTS)
PROBE_DOMAIN = "umm-probe-set-v1"  # the genesis' probe-set chunk: pack([PROBE_DOMAIN, texts])
PROBE_REFERENCES_DOMAIN = "umm-probe-set-references-v1"
DEFAULT_K = 10  # FuseLLM keeps the top 10 entries of each distribution


@dataclass(frozen=True)
class ProbeSet:
    """The network's probe prompts, optionally each with a reference response."""

    prompts: tuple[str, ...]
    references: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        if not self.prompts or not all(isinstance(p, str) and p for p in self.prompts):
            raise FusionError("expected a probe set of non-empty prompts, got an empty set or prompt")
        if self.references is not None and len(self.references) != len(self.prompts):
            raise FusionError(
                f"expected one reference per probe prompt ({len(self.prompts)}), got {len(self.references)}"
            )

    def fingerprint(self) -> str:
        """sha256 of the canonical msgpack of the prompts (the genesis' `probe_set_fingerprint` when
        there are no references; references are fingerprinted with them under another domain)."""
        if self.references is None:
            value: list[Any] = [PROBE_DOMAIN, list(self.prompts)]
        else:
            value = [
                PROBE_REFERENCES_DOMAIN,
                [list(p) for p in zip(self.prompts, self.references, strict=True)],
            ]
        return hashlib.sha256(msgpack.packb(value, use_bin_type=True)).hexdigest()


def read_probe_file(path: str | Path) -> ProbeSet:
    """A probe file: a JSON list of prompts or of {"prompt", "reference"} objects, or one prompt a line."""
    raw = Path(path).read_text(encoding="utf-8")
    if not raw.lstrip().startswith("["):
        return ProbeSet(tuple(line for line in raw.splitlines() if line.strip()))
    try:
        items = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise FusionError(
            f"expected the probe file {path} to hold a JSON list, got invalid JSON: {exc}"
        ) from None
    if all(isinstance(item, str) for item in items):
        return ProbeSet(tuple(items))
    if all(isinstance(item, dict) and isinstance(item.get("prompt"), str) for item in items):
        references = [item.get("reference") for item in items]
        if all(r is None for r in references):
            return ProbeSet(tuple(item["prompt"] for item in items))
        if all(isinstance(r, str) for r in references):
            return ProbeSet(tuple(item["prompt"] for item in items), tuple(references))
    raise FusionError(
        f"expected the probe file {path} to list strings or {{prompt, reference}} objects, got other items"
    )


@dataclass(frozen=True)
class ResponseSummary:
    """An expert's responses on a probe set and its top-k distributions along them.

    offsets:   int64 [prompts + 1]; prompt j owns positions offsets[j]:offsets[j + 1]
    target_ids: int32 [positions]; the response token predicted at each position (EOS last)
    token_ids: int32 [positions, k]; the k most likely tokens there, most likely first
    logprobs:  float32 [positions, k]; their log-probabilities
    """

    probe: ProbeSet
    responses: tuple[str, ...]
    offsets: torch.Tensor
    target_ids: torch.Tensor
    token_ids: torch.Tensor
    logprobs: torch.Tensor
    vocabulary: Vocabulary
    model_name: str = ""
    prompt_style: str = AUTO_PROMPTS

    @property
    def k(self) -> int:
        return int(self.token_ids.shape[1])

    def example(self, index: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(target_ids, token_ids, logprobs) of one prompt's response."""
        start, end = int(self.offsets[index]), int(self.offsets[index + 1])
        return self.target_ids[start:end], self.token_ids[start:end], self.logprobs[start:end]


def resolve_style(tokenizer: Any, style: str) -> str:
    """`plain` or `chat` for this tokenizer: `auto` is `chat` when the tokenizer has a chat template."""
    if style not in PROMPT_STYLES:
        raise FusionError(f"expected a prompt style among {', '.join(PROMPT_STYLES)}, got {style!r}")
    has_template = bool(getattr(tokenizer, "chat_template", None))
    if style == AUTO_PROMPTS:
        return CHAT_PROMPTS if has_template else PLAIN_PROMPTS
    if style == CHAT_PROMPTS and not has_template:
        raise FusionError("expected a tokenizer with a chat template for chat prompts, got one without")
    return style


def render_prompt(tokenizer: Any, prompt: str, style: str) -> str:
    """The prompt as the model reads it: as is (plain), or one user turn in the tokenizer's own chat
    template with the generation prompt added (chat; `auto` picks chat when there is a template)."""
    if resolve_style(tokenizer, style) == PLAIN_PROMPTS:
        return prompt
    return tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
    )


def encode_prompt(tokenizer: Any, prompt: str, style: str) -> list[int]:
    """The prompt's token ids: special tokens from the tokenizer (plain) or from the template (chat)."""
    plain = resolve_style(tokenizer, style) == PLAIN_PROMPTS
    return list(tokenizer(render_prompt(tokenizer, prompt, style), add_special_tokens=plain)["input_ids"])


def _greedy_responses(
    model: Any, tokenizer: Any, prompts: Sequence[str], style: str, max_new_tokens: int, batch_size: int
) -> list[str]:
    from merging.testbed.harness import greedy_generate

    texts = [render_prompt(tokenizer, p, style) for p in prompts]
    order = sorted(range(len(texts)), key=lambda i: (len(texts[i]), i))
    out = [""] * len(texts)
    for lo in range(0, len(order), batch_size):
        chunk = order[lo : lo + batch_size]
        replies = greedy_generate(
            model,
            tokenizer,
            [texts[i] for i in chunk],
            max_new_tokens,
            add_special_tokens=resolve_style(tokenizer, style) == PLAIN_PROMPTS,
        )
        for i, text in zip(chunk, replies, strict=True):
            out[i] = text
    return out


@torch.no_grad()
def summarize(
    model: Any,
    tokenizer: Any,
    probe: ProbeSet,
    *,
    k: int = DEFAULT_K,
    max_new_tokens: int = 128,
    batch_size: int = 64,
    model_name: str = "",
    prompt_style: str = AUTO_PROMPTS,
    advance: Callable[[int], None] | None = None,
) -> ResponseSummary:
    """The summary of `model` on `probe`: responses (greedy, or the references), then top-k along them.

    A response closes with the end-of-sequence token unless it used its whole `max_new_tokens`.
    `prompt_style` ``chat`` wraps each prompt in the expert's chat template (the pivot later wraps
    it in its own), ``plain`` leaves it as is, ``auto`` (default) lets each model's tokenizer
    decide: chat when it has a chat template.
    `advance(n)` is called as prompts are done (for a progress bar).
    """
    if k < 1:
        raise FusionError(f"expected k >= 1, got {k}")
    eos = tokenizer.eos_token_id
    if eos is None:
        raise FusionError("expected the expert's tokenizer to have an end-of-sequence token, got none")
    model.eval()
    responses = (
        list(probe.references)
        if probe.references is not None
        else _greedy_responses(model, tokenizer, probe.prompts, prompt_style, max_new_tokens, batch_size)
    )
    offsets, targets, ids, logps = [0], [], [], []
    prompts = [encode_prompt(tokenizer, p, prompt_style) for p in probe.prompts]
    for prompt_ids, response in zip(prompts, responses, strict=True):
        response_ids = list(tokenizer(response, add_special_tokens=False)["input_ids"])
        if probe.references is not None or len(response_ids) < max_new_tokens:
            response_ids.append(eos)
        if not response_ids:
            response_ids = [eos]
        sequence = torch.tensor([prompt_ids + response_ids])
        logits = model(input_ids=sequence, attention_mask=torch.ones_like(sequence)).logits[0].float()
        if k > logits.shape[-1]:
            raise FusionError(f"expected k <= vocabulary size {logits.shape[-1]}, got {k}")
        start = len(prompt_ids) - 1
        log_probs = torch.log_softmax(logits[start : start + len(response_ids)], dim=-1)
        order = torch.sort(log_probs, dim=-1, descending=True, stable=True)
        targets.append(torch.tensor(response_ids, dtype=torch.int32))
        ids.append(order.indices[:, :k].to(torch.int32))
        logps.append(order.values[:, :k].contiguous())
        offsets.append(offsets[-1] + len(response_ids))
        if advance is not None:
            advance(1)
    target_ids, token_ids = torch.cat(targets), torch.cat(ids)
    used = torch.unique(torch.cat([target_ids, token_ids.flatten()])).tolist()
    return ResponseSummary(
        probe=probe,
        responses=tuple(responses),
        offsets=torch.tensor(offsets, dtype=torch.int64),
        target_ids=target_ids,
        token_ids=token_ids,
        logprobs=torch.cat(logps),
        vocabulary=Vocabulary.from_tokenizer(tokenizer, used),
        model_name=model_name,
        prompt_style=prompt_style,
    )


def summary_bytes(summary: ResponseSummary) -> bytes:
    """The summary as one safetensors file (tensors plus a JSON header)."""
    vocabulary = summary.vocabulary
    header = {
        "format": FORMAT,
        "probe_fingerprint": summary.probe.fingerprint(),
        "prompts": list(summary.probe.prompts),
        "references": list(summary.probe.references) if summary.probe.references is not None else None,
        "responses": list(summary.responses),
        "style": vocabulary.style,
        "strings": [[i, s] for i, s in sorted(vocabulary.strings.items())],
        "specials": {role: i for role, i in sorted(vocabulary.specials.items())},
        "model_name": summary.model_name,
        "prompt_style": summary.prompt_style,
    }
    tensors = {
        "offsets": summary.offsets,
        "target_ids": summary.target_ids,
        "token_ids": summary.token_ids,
        "logprobs": summary.logprobs,
    }
    return save_safetensors(tensors, metadata={"umm": json.dumps(header, ensure_ascii=False)})


def save_summary(summary: ResponseSummary, path: str | Path) -> Path:
    """Write the summary to `path` atomically."""
    return write_atomic(path, summary_bytes(summary))


def load_summary(path: str | Path, probe: ProbeSet | None = None) -> ResponseSummary:
    """Read and check a summary file; with `probe`, refuse a summary made on another probe set."""
    try:
        data = Path(path).read_bytes()
        tensors = load_safetensors(data)
        header_size = int.from_bytes(data[:8], "little")
        header = json.loads(json.loads(data[8 : 8 + header_size])["__metadata__"]["umm"])
    except FileNotFoundError:
        raise FusionError(f"expected a summary file at {path}, found none") from None
    except Exception as exc:  # safetensors and json raise several types for a damaged file
        raise FusionError(
            f"expected {path} to be a response summary file, got unreadable data ({exc})"
        ) from None
    if header.get("format") != FORMAT:
        raise FusionError(f"expected a summary of format {FORMAT}, got {header.get('format')!r} in {path}")
    refs = header["references"]
    own = ProbeSet(tuple(header["prompts"]), tuple(refs) if refs is not None else None)
    if own.fingerprint() != header["probe_fingerprint"]:
        raise FusionError(f"expected the prompts of {path} to match its probe fingerprint, got others")
    if probe is not None and probe.fingerprint() != own.fingerprint():
        raise FusionError(
            f"expected a summary of probe set {probe.fingerprint()[:16]}, got one of "
            f"{own.fingerprint()[:16]} in {path}"
        )
    summary = ResponseSummary(
        probe=own,
        responses=tuple(header["responses"]),
        offsets=tensors["offsets"],
        target_ids=tensors["target_ids"],
        token_ids=tensors["token_ids"],
        logprobs=tensors["logprobs"],
        vocabulary=Vocabulary(
            style=header["style"],
            strings={int(i): s for i, s in header["strings"]},
            specials={role: int(i) for role, i in header["specials"].items()},
        ),
        model_name=header.get("model_name", ""),
        prompt_style=header.get("prompt_style", AUTO_PROMPTS),
    )
    try:
        check_summary(summary)
    except FusionError as exc:
        raise FusionError(f"{exc} (in {path})") from None
    return summary


def check_summary(summary: ResponseSummary) -> None:
    """Raise FusionError unless the summary is consistent: a known prompt style, one response and
    offset per probe prompt, offsets rising strictly from 0 to the number of positions, target ids
    [positions] and log-probs [positions, k], log-probs <= 0 sorted most likely first, and a token
    string for every id used."""
    if summary.prompt_style not in PROMPT_STYLES:
        raise FusionError(
            f"expected a prompt style among {', '.join(PROMPT_STYLES)}, got {summary.prompt_style[:40]!r}"
        )
    offsets, positions = summary.offsets, summary.token_ids.shape[0]
    if len(summary.responses) != len(summary.probe.prompts) or offsets.numel() != len(summary.responses) + 1:
        raise FusionError(
            f"expected one response and offset per probe prompt ({len(summary.probe.prompts)}), "
            f"got {len(summary.responses)} responses and {offsets.numel()} offsets"
        )
    if int(offsets[0]) != 0 or int(offsets[-1]) != positions or bool((offsets[1:] <= offsets[:-1]).any()):
        raise FusionError(f"expected offsets rising from 0 to {positions}, got others")
    if summary.target_ids.shape != (positions,) or summary.logprobs.shape != summary.token_ids.shape:
        raise FusionError("expected target ids [positions] and log-probs [positions, k], got other shapes")
    logprobs = summary.logprobs
    if not bool((logprobs <= 0).all()) or bool((logprobs[:, 1:] > logprobs[:, :-1]).any()):
        raise FusionError("expected log-probs <= 0 sorted most likely first, got others")
    used = torch.unique(torch.cat([summary.target_ids, summary.token_ids.flatten()])).tolist()
    missing = [i for i in used if i not in summary.vocabulary.strings]
    if missing:
        raise FusionError(f"expected a token string for every id used, got none for id {missing[0]}")
