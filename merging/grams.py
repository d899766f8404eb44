"""Input Gram matrices of a model's linear layers on its own data: what data-aware merges read.

A model folder may hold `input_grams.umm` (safetensors format; another extension, so tools that
read every `*.safetensors` file of a folder as weights leave it alone): for each linear layer's
weight, the mean outer product of the layer's inputs over the tokens of the data the model was
tuned for (`X^T X / tokens`, float32, `[in, in]`). Layers fed the same input (a block's query,
key and value projections) share one stored matrix: the file's metadata maps every weight name to
the key it reads. The Grams say which input directions a model's data uses, not the data itself
(RegMean's point).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from contextlib import ExitStack
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING

import torch
from safetensors import safe_open
from safetensors.torch import save

from merging.atomic import write_atomic
from merging.errors import UmmError
from merging.methods import METHODS

if TYPE_CHECKING:
    from merging.config import MergeConfig

GRAMS_FILE = "input_grams.umm"
GRAMS_FORMAT = 1
_METADATA_KEY = "umm_grams"


class GramError(UmmError):
    """A Gram file is missing, malformed, or does not fit the model it is read for."""


def write_grams(
    folder: str | Path,
    grams: Mapping[str, torch.Tensor],
    shared: Mapping[str, str],
    *,
    tokens: int,
    source: str,
) -> Path:
    """Write `folder/input_grams.umm` atomically. `grams` maps a key to its mean Gram; `shared` maps
    every weight name to the key of the Gram its layer reads (keys must be in `grams`)."""
    unknown = sorted(set(shared.values()) - set(grams))
    if unknown:
        raise GramError(f"expected every shared Gram key to be stored, got {unknown[0]!r} without a matrix")
    for key, gram in grams.items():
        if gram.dim() != 2 or gram.shape[0] != gram.shape[1]:
            raise GramError(f"expected square Gram matrices, got {tuple(gram.shape)} for {key!r}")
    weights = dict(sorted(shared.items()))
    info = {"format": GRAMS_FORMAT, "tokens": tokens, "source": source, "weights": weights}
    metadata = {_METADATA_KEY: json.dumps(info)}
    data = save({key: gram.to(torch.float32).contiguous() for key, gram in grams.items()}, metadata=metadata)
    return write_atomic(Path(folder) / GRAMS_FILE, data)


class GramFile:
    """A model folder's `input_grams.umm`, read lazily: `get(weight)` loads one matrix."""

    def __init__(self, folder: str | Path) -> None:
        self.path = Path(folder) / GRAMS_FILE
        if not self.path.is_file():
            raise GramError(
                f"expected input Grams at {self.path} for a data-aware merge, got no file "
                f"(write them with `umm grams {folder} --tasks ...`)"
            )
        try:
            self._file = safe_open(self.path, framework="pt")
            info = json.loads((self._file.metadata() or {})[_METADATA_KEY])
            self.weights: dict[str, str] = dict(info["weights"])
            self.tokens = int(info["tokens"])
            self.source = str(info["source"])
            if int(info["format"]) != GRAMS_FORMAT:
                raise GramError(f"expected Gram format {GRAMS_FORMAT} in {self.path}, got {info['format']}")
            self._keys = set(self._file.keys())
        except GramError:
            raise
        except Exception as exc:  # safetensors and json raise several types for a damaged file
            raise GramError(f"expected a umm Gram file at {self.path}, got an unreadable one: {exc}") from exc
        missing = sorted(set(self.weights.values()) - self._keys)
        if missing:
            raise GramError(f"expected {self.path} to store the Gram {missing[0]!r} its metadata names")

    def all(self) -> dict[str, torch.Tensor]:
        """Every weight name -> its Gram (weights that share an input share one tensor)."""
        stored = {key: self._file.get_tensor(key) for key in sorted(set(self.weights.values()))}
        return {weight: stored[key] for weight, key in self.weights.items()}

    def get(self, weight: str) -> torch.Tensor | None:
        """The mean input Gram of the layer whose weight is named `weight`, or None if it has none."""
        key = self.weights.get(weight)
        return None if key is None else self._file.get_tensor(key)

    def __enter__(self) -> GramFile:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        self._file = None


def open_gram_files(config: MergeConfig, resources: ExitStack) -> dict[str, GramFile]:
    """Each input model's Gram file but the base's, if the config's method reads Grams (else none);
    closed with `resources`."""
    if not METHODS[config.merge_method].needs_grams:
        return {}
    return {
        name: resources.enter_context(GramFile(Path(name).expanduser()))
        for name in config.input_models()
        if name != config.base_model
    }
