"""Row weights: a task-arithmetic weight per output row of a tensor, per input model.

mergekit's parameters give one weight per tensor; a search that fits every output row's weight
(`umm evolve --granularity row`) needs a finer one. A config names such weights with the
top-level key `row_weights` (umm's addition): a safetensors file whose tensor
`models.<i>.<tensor name>` holds, for the config's `i`-th model, one float32 weight per row of
that tensor (`[rows]`, rows as in `merging.blocks.matrix_shape`). For a tensor it names, the
model's row weights replace its scalar `weight`; every other tensor and model keeps its scalar.
Only the methods in `merging.methods.ROW_WEIGHT_METHODS` read them (task arithmetic: a sum of
weighted task vectors, so a weight per row is well defined).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

from merging.atomic import write_atomic
from merging.errors import ConfigError

RowWeights = Mapping[str, Mapping[str, torch.Tensor]]  # model name -> tensor name -> [rows] float32


def row_weight_key(index: int, tensor: str) -> str:
    """The file's name for model `index`'s row weights of `tensor`."""
    return f"models.{index}.{tensor}"


def save_row_weights(path: str | Path, models: Sequence[str], weights: RowWeights) -> Path:
    """Write `weights` for the config whose models are `models` (in order), atomically."""
    from safetensors.torch import save

    flat = {}
    for index, model in enumerate(models):
        for tensor, rows in weights.get(model, {}).items():
            flat[row_weight_key(index, tensor)] = rows.detach().to(torch.float32).reshape(-1).contiguous()
    return write_atomic(path, save(flat))


def load_row_weights(path: str | Path, models: Sequence[str]) -> dict[str, dict[str, torch.Tensor]]:
    """The row weights in `path` by model name; raise `ConfigError` for a file that cannot be read or
    names a model the config does not have."""
    from safetensors.torch import load_file

    try:
        flat = load_file(str(Path(path).expanduser()))
    except FileNotFoundError:
        raise ConfigError(f"row_weights file {str(path)!r} does not exist") from None
    except Exception as exc:  # safetensors raises several types for a damaged file
        raise ConfigError(f"row_weights file {str(path)!r} cannot be read: {exc}") from None
    out: dict[str, dict[str, torch.Tensor]] = {}
    for key, rows in flat.items():
        prefix, _, rest = key.partition(".")
        index, _, tensor = rest.partition(".")
        if prefix != "models" or not index.isdigit() or not tensor or int(index) >= len(models):
            raise ConfigError(
                f"row_weights entry {key!r} does not name one of the config's {len(models)} models"
                " as models.<index>.<tensor>"
            )
        if rows.dtype != torch.float32 or rows.dim() != 1 or not bool(torch.isfinite(rows).all()):
            raise ConfigError(f"row_weights entry {key!r} must be a finite float32 vector")
        out.setdefault(models[int(index)], {})[tensor] = rows
    return out


def check_row_weights(weights: RowWeights, shapes: Mapping[str, tuple[int, int]]) -> None:
    """Raise `ConfigError` unless every row-weight vector names a merged tensor and has its row count
    (`shapes`: tensor name -> [rows, width])."""
    for model, tensors in weights.items():
        for tensor, rows in tensors.items():
            if tensor not in shapes:
                raise ConfigError(f"row_weights of {model!r} name tensor {tensor!r}, which the merge has not")
            if rows.numel() != shapes[tensor][0]:
                raise ConfigError(
                    f"row_weights of {model!r} for {tensor!r} hold {rows.numel()} values, "
                    f"the tensor has {shapes[tensor][0]} rows"
                )
