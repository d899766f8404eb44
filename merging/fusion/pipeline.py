"""Summaries in, a distilled pivot copy out: what `umm summarize` and `umm fuse` run.

`summarize_model` writes an expert's response summary on a probe set; `fuse_into_pivot` loads
summaries (all on one probe set), aligns each to the pivot's tokenizer, fuses them (MinCE or
AvgCE), distills the result into a copy of the pivot, and writes it as a Hugging Face folder
(atomically: built beside the target, then renamed) with ``fusion.json`` recording what it was
distilled from (the summaries' sha256, the probe fingerprint), the alignment quality per source,
the settings and the losses.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from merging.atomic import fsync_dir, write_text_atomic
from merging.fusion import FusionError
from merging.fusion.distill import DistillSpec, distill
from merging.fusion.fuse import MINCE, fuse
from merging.fusion.progress import counted_progress
from merging.fusion.refusal import (
    DEFAULT_HELD_OUT,
    DEFAULT_MARGIN,
    FusionCheck,
    held_out_cross_entropy,
    split_held_out,
)
from merging.fusion.replay import replay_examples
from merging.fusion.summary import ProbeSet, ResponseSummary, load_summary, save_summary, summarize
from merging.fusion.transfer import AlignedExample, AlignmentQuality, PivotTokens, align_summary
from merging.testbed.models import load_pretrained
from merging.testbed.training import pinned_threads

PROVENANCE = "fusion.json"


def summarize_model(
    model_dir: str | Path,
    probe: ProbeSet,
    out: str | Path,
    *,
    k: int = 10,
    max_new_tokens: int = 128,
    threads: int = 1,
    prompt_style: str = "auto",
    progress: bool = True,
) -> Path:
    """Write the response summary of the model in `model_dir` on `probe` to `out`."""
    model, tokenizer = load_pretrained(model_dir)
    with pinned_threads(threads), counted_progress("summarizing", len(probe.prompts), progress) as advance:
        summary = summarize(
            model,
            tokenizer,
            probe,
            k=k,
            max_new_tokens=max_new_tokens,
            model_name=Path(model_dir).name,
            prompt_style=prompt_style,
            advance=advance,
        )
    return save_summary(summary, out)


@dataclass(frozen=True)
class FusionReport:
    """What `fuse_into_pivot` did."""

    out_dir: Path
    probe_fingerprint: str
    summaries: dict[str, str]  # label (a path) -> sha256 of the file, or the summary's id
    quality: dict[str, dict[str, float]]  # path -> alignment shares
    losses: list[float]
    check: FusionCheck | None  # held-out cross-entropy, pivot vs fused (None without held-out prompts)


def load_summaries(paths: Sequence[str | Path], probe: ProbeSet | None = None):
    """The summaries at `paths`, all on one probe set (`probe` if given, else the first one's)."""
    if not paths:
        raise FusionError("expected at least one summary file, got none")
    summaries = []
    for path in paths:
        summary = load_summary(path, probe)
        probe = probe or summary.probe
        summaries.append(summary)
    return summaries


def fuse_into_pivot(
    pivot_dir: str | Path,
    summary_paths: Sequence[str | Path],
    out_dir: str | Path,
    *,
    probe: ProbeSet | None = None,
    method: str = MINCE,
    spec: DistillSpec | None = None,
    held_out: float = DEFAULT_HELD_OUT,
    margin: float = DEFAULT_MARGIN,
    replay: ProbeSet | None = None,
    progress: bool = True,
) -> FusionReport:
    """Distill the summary files' fused distributions into a copy of the pivot, written to `out_dir`
    (`fuse_summaries`; `fusion.json` names each summary by its file's sha256)."""
    summaries = load_summaries(summary_paths, probe)
    digests = {str(p): hashlib.sha256(Path(p).read_bytes()).hexdigest() for p in summary_paths}
    return fuse_summaries(
        pivot_dir,
        list(zip(digests, summaries, strict=True)),
        out_dir,
        digests=digests,
        method=method,
        spec=spec,
        held_out=held_out,
        margin=margin,
        replay=replay,
        progress=progress,
    )


def fusion_targets(
    sources: Sequence[tuple[str, ResponseSummary]], pivot: PivotTokens, method: str, progress: bool = False
) -> tuple[list[AlignedExample], dict[str, dict[str, float]]]:
    """Every probe prompt's fused distillation target in the pivot's tokens (each labelled summary
    aligned, then fused by `method`) and the alignment quality per label."""
    aligned, quality = [], {}
    for label, summary in sources:
        with counted_progress(f"aligning {Path(label).name}", len(summary.responses), progress) as advance:
            examples, report = align_summary(summary, pivot, source=label, advance=advance)
        aligned.append(examples)
        quality[label] = _shares(report)
    return fuse(aligned, method), quality


def held_out_targets(
    sources: Sequence[tuple[str, ResponseSummary]],
    tokenizer: Any,
    method: str = MINCE,
    held_out: float = DEFAULT_HELD_OUT,
) -> list[AlignedExample]:
    """The fused targets of the held-out probe prompts: what a peer checks a fused copy on."""
    examples, _ = fusion_targets(sources, PivotTokens(tokenizer), method)
    return split_held_out(sources[0][1].probe.prompts, examples, held_out)[1]


def fuse_summaries(
    pivot_dir: str | Path,
    sources: Sequence[tuple[str, ResponseSummary]],
    out_dir: str | Path,
    *,
    digests: dict[str, str],
    method: str = MINCE,
    spec: DistillSpec | None = None,
    held_out: float = DEFAULT_HELD_OUT,
    margin: float = DEFAULT_MARGIN,
    replay: ProbeSet | None = None,
    progress: bool = True,
) -> FusionReport:
    """Distill the labelled summaries (all on one probe set) into a copy of the pivot at `out_dir`.

    Each summary is aligned to the pivot's tokenizer and they are fused (MinCE or AvgCE); the
    `held_out` share of the probe prompts (`merging.fusion.refusal.is_held_out`) is not trained
    on, and the pivot's and the fused model's cross-entropy on them are recorded with the verdict a
    peer would reach at `margin`. With `replay` prompts, the pivot's own responses and
    distributions on them are distilled too (`merging.fusion.replay`), mixed in by count.
    `digests` (label -> sha256 or id) is recorded as the copy's provenance in ``fusion.json``.
    """
    if not sources:
        raise FusionError("expected at least one summary, got none")
    spec = spec or DistillSpec()
    summaries = [summary for _, summary in sources]
    probe = summaries[0].probe
    if any(s.probe.fingerprint() != probe.fingerprint() for s in summaries):
        raise FusionError("expected every summary on one probe set, got several")
    model, tokenizer = load_pretrained(pivot_dir)
    pivot = PivotTokens(tokenizer)
    fused, quality = fusion_targets(sources, pivot, method, progress)
    train, held = split_held_out(probe.prompts, fused, held_out)
    if not train:
        raise FusionError(
            f"expected probe prompts left to distill on after holding out {held_out:.0%}, got none"
        )
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    before = held_out_cross_entropy(model, held, pad_id) if held else None
    replayed = []
    if replay is not None:
        style, k = summaries[0].prompt_style, summaries[0].k
        with (
            pinned_threads(spec.threads),
            counted_progress("replaying the pivot", len(replay.prompts), progress) as advance,
        ):
            replayed = replay_examples(model, pivot, replay, k=k, prompt_style=style, advance=advance)
    with counted_progress("distilling", spec.steps, progress) as advance:
        losses = distill(
            model, train + replayed, spec, pad_id, on_step=lambda _s, loss: advance(1, loss=f"{loss:.3f}")
        )
    check = FusionCheck(before, held_out_cross_entropy(model, held, pad_id), margin) if held else None
    provenance = {
        "pivot": str(pivot_dir),
        "probe_fingerprint": probe.fingerprint(),
        "summaries": dict(digests),
        "method": method,
        "distill": asdict(spec),
        "alignment": quality,
        "replay": {"prompts": len(replay.prompts), "fingerprint": replay.fingerprint()} if replay else None,
        "loss_first": losses[0],
        "loss_last": losses[-1],
        "held_out": {
            "share": held_out,
            "prompts": len(held),
            "pivot_cross_entropy": check.pivot if check else None,
            "fused_cross_entropy": check.fused if check else None,
            "margin": margin,
            "accepted": check.accepted if check else None,
        },
    }
    out = save_model_folder(model, tokenizer, out_dir, provenance)
    return FusionReport(out, provenance["probe_fingerprint"], dict(digests), quality, losses, check)


def _shares(quality: AlignmentQuality) -> dict[str, float]:
    return {key: round(value, 6) for key, value in quality.shares().items()}


def save_model_folder(model, tokenizer, out_dir: str | Path, provenance: dict | None = None) -> Path:
    """Save `model` and `tokenizer` as an HF folder at `out_dir`, every file fsynced, then renamed in."""
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    temp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        model.save_pretrained(temp)
        tokenizer.save_pretrained(temp)
        if provenance is not None:
            write_text_atomic(temp / PROVENANCE, json.dumps(provenance, indent=2, sort_keys=True) + "\n")
        for path in temp.iterdir():
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())
        if out.exists():
            shutil.rmtree(out)
        os.replace(temp, out)
        fsync_dir(out.parent)
    except BaseException:
        shutil.rmtree(temp, ignore_errors=True)
        raise
    return out
