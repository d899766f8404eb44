"""Model folders a node writes from its store: the base, or the base plus a contribution's deltas.

Search (node.search_inputs) and fusion (node.fuser, node.fusion_check) load models with
transformers, which reads folders: the tensors as one safetensors file beside the base's side files
(config, tokenizer) from the genesis. The bytes come from the same chunks on every node.
"""

from __future__ import annotations

import shutil
import tempfile
import threading
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

import torch

from merging.atomic import fsync_dir
from node.round_context import RoundContext
from protocol.chunks import decode_tensors

COMPLETE = "complete"  # marker: the folder is written in full
T = TypeVar("T")
_WRITING = threading.Lock()  # the fuser and the fusion check may ask for the base at once
# One model job (load, distill, score) at a time per process: transformers builds a model on the
# meta device while it loads, which corrupts another thread's tensors and gradients meanwhile.
MODEL_WORK = threading.Lock()


def exclusive_model_job(job: Callable[..., T], *args: Any) -> T:
    """`job(*args)` while no other model job of this process runs (for `asyncio.to_thread`)."""
    with MODEL_WORK:
        return job(*args)


def base_state(ctx: RoundContext) -> dict[str, torch.Tensor]:
    """The base's tensors, decoded from the store."""
    return decode_tensors(ctx.base_entries(), ctx.store.get, ctx.genesis.chunk_size)


def write_model_folder(ctx: RoundContext, folder: Path, state: Mapping[str, torch.Tensor]) -> Path:
    """Write `state` and the base's side files into the new folder `folder`."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True)
    save_file(dict(state), folder / "model.safetensors", metadata={"format": "pt"})
    for side, digest in ctx.genesis.base_files.items():
        (folder / side).write_bytes(ctx.store.get(digest))
    return folder


def ensure_base_folder(ctx: RoundContext, folder: Path) -> Path:
    """The base as a model folder at `folder`: written once (beside it, then renamed in)."""
    with _WRITING:
        if not (folder / COMPLETE).exists():
            _write_base_folder(ctx, folder)
    return folder


def _write_base_folder(ctx: RoundContext, folder: Path) -> None:
    folder.parent.mkdir(parents=True, exist_ok=True)
    temp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        write_model_folder(ctx, temp / "model", base_state(ctx))
        (temp / "model" / COMPLETE).touch()
        shutil.rmtree(folder, ignore_errors=True)
        (temp / "model").rename(folder)
        fsync_dir(folder.parent)
    finally:
        shutil.rmtree(temp, ignore_errors=True)
