"""`umm summarize` and `umm fuse`: heterogeneous fusion through response summaries, locally."""

from __future__ import annotations

from pathlib import Path

import click

from merging.fusion import SHARED_PARAMETERS

_FILE = click.Path(dir_okay=False, exists=True, path_type=Path)


@click.command("summarize")
@click.argument("model_dir", type=click.Path(file_okay=False, exists=True, path_type=Path))
@click.option(
    "--probe", "probe_file", type=_FILE, required=True, help="Probe prompts: a JSON list, or one a line."
)
@click.option(
    "--out", "out", type=click.Path(dir_okay=False, path_type=Path), required=True, help="Summary file."
)
@click.option("--k", default=10, show_default=True, help="Next-token entries kept per response token.")
@click.option("--max-new-tokens", default=128, show_default=True, help="Longest greedy response.")
@click.option("--threads", default=1, show_default=True, help="torch threads.")
@click.option(
    "--prompts",
    "prompt_style",
    type=click.Choice(["auto", "plain", "chat"]),
    default="auto",
    show_default=True,
    help="chat: each model wraps a prompt in its own chat template; auto: those that have one.",
)
@click.option("--no-progress", is_flag=True, help="Do not draw the progress bar.")
def summarize_command(
    model_dir: Path,
    probe_file: Path,
    out: Path,
    k: int,
    max_new_tokens: int,
    threads: int,
    prompt_style: str,
    no_progress: bool,
) -> None:
    """Write MODEL_DIR's response summary on a probe set: its greedy responses and top-k distributions.

    \b
    Example:
      umm summarize zoo/heterogeneous/gpt2-lists --probe probe.json --out gpt2.summary
    """
    from merging.fusion.pipeline import summarize_model
    from merging.fusion.summary import read_probe_file

    probe = read_probe_file(probe_file)
    path = summarize_model(
        model_dir,
        probe,
        out,
        k=k,
        max_new_tokens=max_new_tokens,
        threads=threads,
        prompt_style=prompt_style,
        progress=not no_progress,
    )
    click.echo(f"summary of {len(probe.prompts)} prompts written to {path} ({path.stat().st_size} bytes)")


@click.command("fuse")
@click.argument("more_summaries", nargs=-1, type=_FILE)
@click.option(
    "--pivot",
    type=click.Path(file_okay=False, exists=True, path_type=Path),
    required=True,
    help="The pivot model folder each summary is distilled into (a copy of the network's base).",
)
@click.option("--summaries", "summaries", multiple=True, type=_FILE, help="Summary files (one or more).")
@click.option(
    "--out",
    "out",
    type=click.Path(file_okay=False, path_type=Path),
    required=True,
    help="Folder for the fused pivot copy and fusion.json.",
)
@click.option("--probe", "probe_file", type=_FILE, help="Refuse summaries made on another probe set.")
@click.option(
    "--method",
    type=click.Choice(["mince", "avgce"]),
    default="mince",
    show_default=True,
    help="How several sources' distributions fuse: lowest cross-entropy, or their average.",
)
@click.option(
    "--lambda", "lam", default=0.9, show_default=True, help="Weight of the CLM term (1: text only)."
)
@click.option("--steps", default=600, show_default=True, help="Distillation steps.")
@click.option("--lr", default=2e-3, show_default=True, help="AdamW learning rate.")
@click.option("--batch-size", default=32, show_default=True, help="Probe responses per step.")
@click.option("--seed", default=0, show_default=True, help="Seed of the batch order and initial state.")
@click.option("--threads", default=1, show_default=True, help="torch threads (the result depends on it).")
@click.option(
    "--freeze",
    default=",".join(SHARED_PARAMETERS),
    show_default=True,
    help="Comma-separated name parts of parameters left untrained ('' trains all).",
)
@click.option(
    "--held-out", default=0.1, show_default=True, help="Share of probe prompts kept out of training."
)
@click.option(
    "--margin", default=0.05, show_default=True, help="Held-out cross-entropy drop a peer requires."
)
@click.option(
    "--replay",
    "replay_file",
    type=_FILE,
    help="Prompts of the other domains (probe-file format) on which the copy keeps the pivot's own "
    "responses and distributions, so that it merges without erasing the other experts.",
)
@click.option("--no-progress", is_flag=True, help="Do not draw the progress bars.")
def fuse_command(
    more_summaries: tuple[Path, ...],
    pivot: Path,
    summaries: tuple[Path, ...],
    out: Path,
    probe_file: Path | None,
    method: str,
    lam: float,
    steps: int,
    lr: float,
    batch_size: int,
    seed: int,
    threads: int,
    freeze: str,
    held_out: float,
    margin: float,
    replay_file: Path | None,
    no_progress: bool,
) -> None:
    """Distill the summaries' fused distributions into a copy of the PIVOT model, written to OUT.

    \b
    Example:
      umm fuse --pivot zoo/base --summaries gpt2.summary other.summary --out fused
      umm fuse --pivot zoo/base --summaries gpt2.summary --replay others.json --out fused
    """
    from merging.fusion import FusionError
    from merging.fusion.distill import DistillSpec
    from merging.fusion.pipeline import fuse_into_pivot
    from merging.fusion.summary import read_probe_file

    paths = [*summaries, *more_summaries]
    if not paths:
        raise FusionError("expected at least one summary file (--summaries S...), got none")
    frozen = tuple(part.strip() for part in freeze.split(",") if part.strip())
    spec = DistillSpec(
        steps=steps, lr=lr, batch_size=batch_size, lam=lam, seed=seed, threads=threads, frozen=frozen
    )
    probe = read_probe_file(probe_file) if probe_file is not None else None
    report = fuse_into_pivot(
        pivot,
        paths,
        out,
        probe=probe,
        method=method,
        spec=spec,
        held_out=held_out,
        margin=margin,
        replay=read_probe_file(replay_file) if replay_file is not None else None,
        progress=not no_progress,
    )
    for path, shares in report.quality.items():
        click.echo(
            f"{path}: top-k mass exact {shares['exact']:.1%}, edit {shares['edit']:.1%}, "
            f"dropped {shares['dropped']:.1%}; positions with a distribution {shares['positions']:.1%}"
        )
    if report.check is not None:
        verdict = "accepted" if report.check.accepted else "would be refused"
        click.echo(
            f"held-out cross-entropy to the fused distributions: pivot {report.check.pivot:.4f}, "
            f"fused {report.check.fused:.4f} ({verdict} at margin {report.check.margin:.0%})"
        )
    click.echo(
        f"fused pivot written to {report.out_dir} (loss {report.losses[0]:.3f} -> {report.losses[-1]:.3f})"
    )


def register(group: click.Group) -> None:
    """Add `summarize` and `fuse` to the `umm` command group."""
    group.add_command(summarize_command)
    group.add_command(fuse_command)
