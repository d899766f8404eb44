"""`umm merge CONFIG.yaml OUT_DIR`: merge local model folders as a mergekit-style config describes."""

from __future__ import annotations

from pathlib import Path

import click


@click.command("merge")
@click.argument("config", type=click.Path(dir_okay=False, path_type=Path))
@click.argument("out_dir", type=click.Path(file_okay=False, path_type=Path))
@click.option(
    "--max-shard-size",
    default="5GB",
    show_default=True,
    help="Largest output shard, e.g. 500MB or 2GB.",
)
@click.option("--no-progress", is_flag=True, help="Do not draw the progress bar.")
@click.option(
    "--codec",
    "codecs",
    multiple=True,
    help="Merge each expert as a network does after its delta went through CODEC (as "
    "`umm contribute --codec` sends it): CODEC for every expert, or MODEL=CODEC (repeatable).",
)
def merge_command(
    config: Path, out_dir: Path, max_shard_size: str, no_progress: bool, codecs: tuple[str, ...]
) -> None:
    """Merge the models CONFIG lists into the Hugging Face folder OUT_DIR.

    CONFIG is mergekit-style YAML (merge_method, models, base_model, parameters, dtype, ...);
    OUT_DIR is replaced atomically.

    With --codec it reproduces a network's model offline: CONFIG with the network's method,
    parameters and dtype and the experts its round admitted, each with its contributor's codec.

    \b
    Example:
      umm merge ties.yaml ./merged
      umm merge ties.yaml ./reproduced --codec int8+zstd
    """
    import tempfile

    from merging.config import load_config
    from merging.engine import merge
    from node.cli.options import check_writable_target

    check_writable_target(out_dir, "OUT_DIR")
    merge_config = load_config(config)
    max_shard_bytes = parse_size(max_shard_size)
    with tempfile.TemporaryDirectory(prefix=f".{out_dir.name}.umm-codec-", dir=out_dir.parent) as work:
        if codecs:
            from node.reproduce import codec_experts, parse_codec_options

            names = [m.model for m in merge_config.models if m.model != merge_config.base_model]
            merge_config = codec_experts(merge_config, parse_codec_options(codecs, names), Path(work))
        result = merge(merge_config, out_dir, progress=not no_progress, max_shard_bytes=max_shard_bytes)
    click.echo(f"merged model written to {result}")


UNITS = {"B": 1, "KB": 1000, "MB": 1000**2, "GB": 1000**3, "KIB": 1024, "MIB": 1024**2, "GIB": 1024**3}


def parse_size(text: str) -> int:
    """`500MB` -> 500000000; a bare number is bytes."""
    from merging.errors import ConfigError

    cleaned = text.strip().upper().replace(" ", "")
    number = cleaned.rstrip("KMGIB")
    unit = cleaned[len(number) :] or "B"
    try:
        size = float(number) * UNITS[unit]
    except (ValueError, KeyError):
        raise ConfigError(
            f"expected a size such as 500MB or 2GB for --max-shard-size, got {text!r}"
        ) from None
    if size < 1:
        raise ConfigError(f"expected a positive --max-shard-size, got {text!r}")
    return int(size)


def register(group: click.Group) -> None:
    """Add `merge` to the `umm` command group."""
    group.add_command(merge_command)
