"""One output tensor's inputs, read in row blocks as float32, and thread-count-independent sums.

Every tensor is seen as a matrix `[rows, width]` (dim 0 by the rest; a vector or scalar is one
row). Operators loop over row blocks of at most `BLOCK_ELEMENTS` values per input, so memory grows
with one block of the largest tensor times the number of inputs, never with the model. Whole-tensor
statistics are summed per row in float64 by numpy (pairwise, single-threaded) and the row sums are
added with `math.fsum` (exactly rounded), so they do not depend on the block size or torch's threads.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager

import numpy as np
import torch

from merging.errors import NonFiniteError

BLOCK_ELEMENTS = 6 << 20  # values per input per block (24 MiB in float32); fits a 0.5B MLP matrix

Reader = Callable[[int, int], torch.Tensor]  # rows [start, end) of the [rows, width] view, stored dtype
Releaser = Callable[[int, int], None]  # rows [start, end) are not needed for now (a mapped file's pages)


def matrix_shape(shape: Sequence[int]) -> tuple[int, int]:
    """The `[rows, width]` view of a tensor shape."""
    if len(shape) <= 1:
        return 1, int(math.prod(shape))
    return int(shape[0]), int(math.prod(shape[1:]))


class TensorStack:
    """The inputs of one output tensor (`inputs[i]` read by `readers[i]`), in row blocks of float32.

    With `raw`, blocks keep the stored dtype (for kernels that decode the inputs themselves).
    `output_dtype` is the merged tensor's dtype (operators may yield rows in it, see `merging.engine`).
    `memo`, if given, lets an operator keep what depends only on the inputs (not the parameters)
    from one merge of the same inputs to the next (`merge_state_dicts(..., memo=...)`).
    `grams`, if given, holds per input the Gram of the tensor's layer inputs (or None);
    `row_weights`, per input, its weight of each row (`merging.row_weights`), or None.
    """

    def __init__(
        self,
        tensor: str,
        shape: Sequence[int],
        inputs: Sequence[str],
        readers: Sequence[Reader],
        base: str | None = None,
        executor: ThreadPoolExecutor | None = None,
        check_inputs: bool = True,
        raw: bool = False,
        output_dtype: torch.dtype = torch.float32,
        releasers: Sequence[Releaser] = (),
        memo: dict | None = None,
        grams: Sequence[torch.Tensor | None] = (),
        row_weights: Sequence[torch.Tensor | None] = (),
    ) -> None:
        self.tensor = tensor
        self.memo = memo  # an operator's per-tensor results that depend only on the inputs
        self.grams = list(grams)  # per input, its layer's input Gram (`merging.grams`), or None
        self.row_weights = list(row_weights) if any(w is not None for w in row_weights) else []
        self.shape = tuple(shape)
        self.inputs = list(inputs)
        self.readers = list(readers)
        self.releasers = list(releasers)  # per input, if its reader maps a file: drop the rows' pages
        self.base_index = self.inputs.index(base) if base is not None else None
        self.rows, self.width = matrix_shape(self.shape)
        self.numel = self.rows * self.width
        step = max(1, BLOCK_ELEMENTS // max(1, self.width))
        self.ranges = [(start, min(self.rows, start + step)) for start in range(0, self.rows, step)]
        self._executor = executor
        self._check_inputs = check_inputs
        self.raw = raw
        self.output_dtype = output_dtype
        self._checked: set[int] = set()
        self._cached: list[torch.Tensor] | None = None
        self._first: list[torch.Tensor] | None = None

    @property
    def others(self) -> list[int]:
        """Indices of the inputs that are not the base model, in config order."""
        return [i for i in range(len(self.inputs)) if i != self.base_index]

    def load(self, start: int, end: int) -> list[torch.Tensor]:
        """Rows `[start, end)` of every input as float32 (or stored, if `raw`) `[end - start, width]`.

        Never modify them: a one-block tensor's block is cached and reused.
        """
        if self._cached is not None:
            return self._cached
        block = []
        for model, reader in zip(self.inputs, self.readers, strict=True):
            raw = reader(start, end)
            if self._check_inputs and start not in self._checked:
                _check_finite(raw, self.tensor, model)
            rows = raw.reshape(end - start, self.width)
            block.append(rows if self.raw else rows.to(torch.float32))
        self._checked.add(start)
        if len(self.ranges) == 1:
            self._cached = block
        return block

    def prefetch(self) -> None:
        """Read the first block now (on a reader thread) so the first pass need not wait for it."""
        if self.ranges:
            self._first = self.load(*self.ranges[0])

    def blocks(self) -> Iterator[tuple[int, int, list[torch.Tensor]]]:
        """Every row block in order, the next one read ahead on the executor while this one is used."""
        pending: Future | None = None
        for number, (start, end) in enumerate(self.ranges):
            if number == 0 and self._first is not None:
                block, self._first = self._first, None
            else:
                block = pending.result() if pending is not None else self.load(start, end)
            pending = None
            if self._executor is not None and number + 1 < len(self.ranges):
                pending = self._executor.submit(self.load, *self.ranges[number + 1])
            yield start, end, block
            if len(self.ranges) > 1:
                self._release_rows(start, end)

    def check_inputs(self) -> None:
        """Raise `NonFiniteError` naming the first input with a NaN or infinite value in this tensor."""
        for model, reader in zip(self.inputs, self.readers, strict=True):
            for start, end in self.ranges:
                _check_finite(reader(start, end), self.tensor, model)

    def non_finite_output(self) -> NonFiniteError:
        """The error for a merged block with a NaN or infinity: raised here if an input has one."""
        self.check_inputs()
        return NonFiniteError(
            f"merged tensor {self.tensor!r} contains NaN or infinite values (check the parameters)"
        )

    def release(self) -> None:
        """Drop cached blocks and the pages of the last block read."""
        self._cached = None
        self._first = None
        if self.ranges:
            self._release_rows(*self.ranges[0 if len(self.ranges) == 1 else -1])

    def _release_rows(self, start: int, end: int) -> None:
        """Let the inputs' mapped pages of rows `[start, end)` go: the resident memory stays one block
        (or two, with the one read ahead). Reading them again maps them again from the page cache."""
        for release in self.releasers:
            release(start, end)


def _check_finite(raw: torch.Tensor, tensor: str, model: str) -> None:
    if raw.is_floating_point() and not bool(torch.isfinite(raw).all()):
        raise NonFiniteError(f"tensor {tensor!r} of model {model!r} contains NaN or infinite values")


def row_sums(x: torch.Tensor) -> np.ndarray:
    """Per-row float64 sums of a 2-D block, independent of torch's thread count."""
    return np.add.reduce(x.to(torch.float64).numpy(), axis=1)


class ExactSum:
    """Collects row sums over blocks; `value()` is their exactly rounded total."""

    def __init__(self) -> None:
        self._parts: list[np.ndarray] = []

    def add(self, x: torch.Tensor) -> None:
        self._parts.append(row_sums(x))

    def value(self) -> float:
        return math.fsum(np.concatenate(self._parts).tolist()) if self._parts else 0.0


def fixed_order_sum(terms: Sequence[torch.Tensor]) -> torch.Tensor:
    """Elementwise sum of tensors, added one after another in the given order."""
    total = terms[0]
    for term in terms[1:]:
        total = total + term
    return total


class Scratch:
    """Reusable float32 work buffers of one thread, one per slot, grown to the largest block seen.

    Writing into these (`out=`, in-place ops) instead of fresh tensors spares a page fault per
    4 KiB of every temporary; memory stays bounded by a few blocks of `BLOCK_ELEMENTS` values.
    """

    _local = threading.local()

    def __init__(self) -> None:
        self._buffers: dict[object, torch.Tensor] = {}

    @classmethod
    @contextmanager
    def lease(cls) -> Iterator[Scratch]:
        """The calling thread's buffers, or private ones while another holder on this thread is live."""
        local = cls._local
        if getattr(local, "busy", False):
            yield cls()
            return
        if getattr(local, "scratch", None) is None:
            local.scratch = cls()
        local.busy = True
        try:
            yield local.scratch
        finally:
            local.busy = False

    def get(self, slot: object, rows: int, width: int) -> torch.Tensor:
        """A `[rows, width]` float32 buffer for `slot`, contents undefined."""
        count = rows * width
        buffer = self._buffers.get(slot)
        if buffer is None or buffer.numel() < count:
            buffer = self._buffers[slot] = torch.empty(max(count, 1), dtype=torch.float32)
        return buffer[:count].view(rows, width)
