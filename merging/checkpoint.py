"""`merge()` on files: validate every input, stream the merge into a temp folder, rename it into place.

Reading, merging and writing overlap: the next tensor's first block is read on a reader thread
while this one is merged, and finished blocks are written by a writer thread. Input files are
hashed for the provenance record on a third thread (digests of unchanged files are remembered
across merges, see `merging.filehash`). A crash leaves the old output or the new one:
the result is written to a temp folder next to the target, fsynced, then renamed.
"""

from __future__ import annotations

import os
import queue
import shutil
import tempfile
import threading
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from pathlib import Path

import torch

from merging import __version__
from merging.atomic import fsync_dir
from merging.config import MergeConfig
from merging.engine import make_stack, merge_stack, output_dtype, plan_row_weights
from merging.errors import MergeError
from merging.filehash import file_digests
from merging.folders import (
    DEFAULT_SHARD_BYTES,
    ModelFolder,
    OutputTensor,
    ShardWriter,
    check_architectures,
    write_json,
)
from merging.grams import GramFile, open_gram_files
from merging.layout import TensorPlan, output_layer_count, plan_tensors
from merging.parameters import resolve_parameters

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "tokenizer.model",
    "added_tokens.json",
    "chat_template.jinja",
)
PROVENANCE_FILE = "umm_merge.json"


def merge_to_folder(
    config: MergeConfig, out_dir: Path, *, progress: bool = True, max_shard_bytes: int = DEFAULT_SHARD_BYTES
) -> Path:
    """Merge the config's model folders into `out_dir` (see module docstring); returns `out_dir`."""
    if out_dir.exists() and not out_dir.is_dir():
        raise MergeError(f"output path {str(out_dir)!r} exists and is not a folder")
    with ExitStack() as resources:
        folders = {
            name: resources.enter_context(ModelFolder(name, Path(name).expanduser()))
            for name in config.input_models()
        }
        check_architectures(list(folders.values()))
        gram_files = open_gram_files(config, resources)
        plans = plan_tensors(config, {name: folder.tensors for name, folder in folders.items()})
        parameters = resolve_parameters(config, [p.name for p in plans])
        row_weights = plan_row_weights(config, plans)
        outputs = [OutputTensor(p.name, p.shape, output_dtype(config, p)) for p in plans]
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        temp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.umm-tmp-", dir=out_dir.parent))
        try:
            pool = resources.enter_context(ThreadPoolExecutor(max_workers=2, thread_name_prefix="umm-io"))
            hashes = pool.submit(_hash_inputs, config, folders, gram_files)
            _write_tensors(
                config,
                plans,
                outputs,
                folders,
                (gram_files, row_weights),
                parameters,
                temp,
                max_shard_bytes,
                progress,
            )
            _copy_side_files(config, folders, temp)
            provenance = {
                "umm_version": __version__,
                "config": config.to_dict(),
                "inputs": hashes.result(),
            }
            write_json(temp / PROVENANCE_FILE, provenance)
            fsync_dir(temp)
            _replace(temp, out_dir)
        except BaseException:
            shutil.rmtree(temp, ignore_errors=True)
            raise
    return out_dir


def _hash_inputs(
    config: MergeConfig, folders: dict[str, ModelFolder], gram_files: dict[str, GramFile]
) -> dict[str, dict]:
    files = [(name, path) for name, folder in folders.items() for path in folder.input_files()]
    files += [(name, grams.path) for name, grams in gram_files.items()]  # they shape the output too
    if config.row_weights is not None:
        files.append((config.row_weights, Path(config.row_weights).expanduser()))
    hashes: dict[str, dict[str, str]] = {name: {} for name, _ in files}
    for (name, path), digest in zip(files, file_digests([path for _, path in files]), strict=True):
        hashes[name][path.name] = digest
    return hashes


def _write_tensors(
    config: MergeConfig,
    plans: list[TensorPlan],
    outputs: list[OutputTensor],
    folders: dict[str, ModelFolder],
    side_inputs: tuple[dict[str, GramFile], dict[str, list]],
    parameters,
    temp: Path,
    max_shard_bytes: int,
    progress: bool,
) -> None:
    gram_files, row_weights = side_inputs  # per model its Grams; per tensor its inputs' row weights
    writer = ShardWriter(temp, outputs, max_shard_bytes)
    total_bytes = sum(t.nbytes for t in outputs)
    with (
        _progress(progress, len(plans), total_bytes) as advance,
        _background_writer(writer) as put,
        ThreadPoolExecutor(max_workers=1, thread_name_prefix="umm-read") as reader,
    ):

        def stack_for(plan: TensorPlan):
            sources = list(zip(plan.inputs, plan.sources, strict=True))
            readers = [folders[m].reader(s) for m, s in sources]
            releasers = [folders[m].releaser(s) for m, s in sources]
            grams = [gram_files[m].get(s) if m in gram_files else None for m, s in sources]
            rows = row_weights.get(plan.name, ())
            return make_stack(config, plan, readers, reader, releasers, grams=grams, row_weights=rows)

        current = stack_for(plans[0]) if plans else None
        pending: Future | None = reader.submit(current.prefetch) if current else None
        for number, plan in enumerate(plans):
            pending.result()  # the first block of this tensor, read while the previous one merged
            upcoming = stack_for(plans[number + 1]) if number + 1 < len(plans) else None
            if upcoming is not None:
                pending = reader.submit(upcoming.prefetch)
            for rows in merge_stack(config, plan, current, parameters):
                put(plan.name, rows)
                advance(0, rows.numel() * rows.element_size())
            advance(1, 0)
            current = upcoming
    writer.finish()


@contextmanager
def _background_writer(writer: ShardWriter) -> Iterator:
    """A writer thread fed through a small queue; its error is raised in the caller."""
    blocks: queue.Queue = queue.Queue(maxsize=4)
    failure: list[BaseException] = []
    cancelled = threading.Event()

    def run() -> None:
        while True:
            item = blocks.get()
            if item is None:
                return
            if failure or cancelled.is_set():
                continue
            try:
                writer.write(*item)
            except BaseException as exc:
                failure.append(exc)

    thread = threading.Thread(target=run, name="umm-write", daemon=True)
    thread.start()

    def put(name: str, rows: torch.Tensor) -> None:
        if failure:
            raise failure[0]
        blocks.put((name, rows))

    finished = False
    try:
        yield put
        finished = True
    finally:
        if not finished:
            cancelled.set()
        blocks.put(None)
        thread.join()
        if not finished or failure:
            writer.abort()
    if failure:
        raise failure[0]


@contextmanager
def _progress(enabled: bool, tensors: int, total_bytes: int) -> Iterator:
    """A rich progress display over tensors and bytes; yields `advance(tensors, bytes)`."""
    if not enabled:
        yield lambda done, size: None
        return
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    display = Progress(
        TextColumn("merging"),
        BarColumn(),
        TextColumn("{task.fields[done]}/{task.fields[tensors]} tensors"),
        DownloadColumn(),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
        console=Console(stderr=True),
    )
    with display:
        task = display.add_task("merging", total=total_bytes, done=0, tensors=tensors)
        finished = [0]

        def advance(done: int, size: int) -> None:
            finished[0] += done
            display.update(task, advance=size, done=finished[0])

        yield advance


def _copy_side_files(config: MergeConfig, folders: dict[str, ModelFolder], temp: Path) -> None:
    reference = folders[config.reference_model()]
    model_config = dict(reference.config)
    if config.output_dtype is not None:
        for key in ("torch_dtype", "dtype"):
            if key in model_config or key == "dtype":
                model_config[key] = config.output_dtype
    layers = output_layer_count(config)
    if layers is not None:
        model_config["num_hidden_layers"] = layers
    write_json(temp / "config.json", model_config)
    generation = reference.path / "generation_config.json"
    if generation.is_file():
        _copy(generation, temp / generation.name)
    source = config.tokenizer_source
    tokenizer_folder = reference if source in (None, "base") else folders[source]
    for name in TOKENIZER_FILES:
        path = tokenizer_folder.path / name
        if path.is_file():
            _copy(path, temp / name)


def _copy(source: Path, target: Path) -> None:
    shutil.copyfile(source, target)
    with open(target, "rb") as handle:
        os.fsync(handle.fileno())


def _replace(temp: Path, target: Path) -> None:
    """Move `temp` to `target`; an existing target is moved aside first and removed after."""
    old = None
    if target.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{target.name}.umm-old-", dir=target.parent))
        os.rename(target, old / target.name)
    os.rename(temp, target)
    fsync_dir(target.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
