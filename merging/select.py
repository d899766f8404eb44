"""Exact order statistics of non-negative float32 values seen in blocks, and rank-window masks.

Ranks are ascending positions in the stable order by (value, flat index): equal values are ranked
in the order they appear. A tensor held in one block uses a selection in memory (`torch.kthvalue`
when small, else numpy's introselect `np.partition`); a tensor seen in several blocks uses a
two-pass radix select on the float32 bit patterns (non-negative floats sort like their bits;
numpy's `bincount` over the high and low 16-bit halves), so all find the same exact value and the
merge does not depend on block size.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

HIGH_BINS = 1 << 15  # bits 16..30 of a non-negative float32
LOW_BINS = 1 << 16
SMALL = 1 << 16  # below this many values, kthvalue beats two histogram passes


@dataclass(frozen=True)
class OrderStatistic:
    """The value at an ascending rank and how many values are strictly smaller."""

    rank: int
    value: float
    less: int


@dataclass(frozen=True)
class RankWindow:
    """Keep the values whose ascending rank lies in `[lo, hi)` among `n`."""

    n: int
    lo: int
    hi: int
    low: OrderStatistic | None  # the value at rank lo (None when lo == 0)
    high: OrderStatistic | None  # the value at rank hi - 1 (None when hi == n)


class WindowMasker:
    """Feed the blocks of one series in flat order; returns the keep mask of each block."""

    def __init__(self, window: RankWindow) -> None:
        self.window = window
        self._equal_low = 0
        self._equal_high = 0

    def __call__(self, values: torch.Tensor) -> torch.Tensor:
        window = self.window
        if window.lo >= window.hi:
            return torch.zeros_like(values, dtype=torch.bool)
        low, high = window.low, window.high
        if low is None and high is None:
            return torch.ones_like(values, dtype=torch.bool)
        keep = values >= low.value if low is not None else values <= high.value
        if low is not None and high is not None:
            keep &= values <= high.value
        if low is not None:
            # equal values have ranks less, less + 1, ... in flat order; those below lo are dropped
            positions = (values == low.value).nonzero().flatten()
            drop = min(positions.numel(), max(0, window.lo - low.less - self._equal_low))
            keep[positions[:drop]] = False
            self._equal_low += positions.numel()
        if high is not None:
            positions = (values == high.value).nonzero().flatten()
            first_dropped = max(0, window.hi - high.less - self._equal_high)
            keep[positions[first_dropped:]] = False
            self._equal_high += positions.numel()
        return keep

    def mask_into(self, values: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """The keep mask of the next block as float32 1.0/0.0 written into `out` (the same as `__call__`)."""
        window = self.window
        if window.lo >= window.hi:
            return out.zero_()
        low, high = window.low, window.high
        if low is None and high is None:
            return out.fill_(1.0)
        if low is not None:
            torch.ge(values, low.value, out=out)
            if high is not None:
                out.mul_(values <= high.value)
        else:
            torch.le(values, high.value, out=out)
        flat = out.view(-1)
        if low is not None:
            remaining = window.lo - low.less - self._equal_low
            if remaining > 0:  # once every equal value below rank lo is dropped, none remain to find
                positions = _equal_positions(values, low.value)
                flat[positions[:remaining]] = 0.0
                self._equal_low += positions.size
        if high is not None:
            positions = _equal_positions(values, high.value)
            first_dropped = max(0, window.hi - high.less - self._equal_high)
            flat[positions[first_dropped:]] = 0.0
            self._equal_high += positions.size
        return out


def _equal_positions(values: torch.Tensor, value: float) -> np.ndarray:
    """Flat indices of the entries equal to `value`, ascending."""
    return np.flatnonzero(values.contiguous().numpy() == value)


def window_from_ranks(n: int, lo: int, hi: int, stats: dict[int, OrderStatistic]) -> RankWindow:
    lo, hi = max(0, lo), min(n, hi)
    return RankWindow(
        n=n,
        lo=lo,
        hi=hi,
        low=stats.get(lo) if 0 < lo < hi else None,
        high=stats.get(hi - 1) if lo < hi < n else None,
    )


def window_ranks(n: int, lo: int, hi: int) -> list[int]:
    """The ranks whose values `window_from_ranks` needs."""
    lo, hi = max(0, lo), min(n, hi)
    if lo >= hi:
        return []
    return ([lo] if lo > 0 else []) + ([hi - 1] if hi < n else [])


def order_statistics(
    blocks: Callable[[], Iterable[list[torch.Tensor]]],
    rank_fn: Callable[[int, int, int], Sequence[int]],
    single_block: bool,
    count_zeros: bool = False,
    expected_total: int | None = None,
) -> list[dict[int, OrderStatistic]]:
    """Order statistics of several series at once.

    `blocks()` yields, per block, one flat non-negative float32 tensor per series (all series
    advance together). `rank_fn(series, n, zeros)` names the ranks wanted for a series given its
    count of values and, with `count_zeros`, of exact zeros (else 0). Returns, per series,
    rank -> statistic. A single block is read once and kept for both radix passes.

    With `expected_total` (each series' count, known ahead; not with `count_zeros`), one pass
    counts, per series, the values below and the low halves within a few high bins around where
    the first block puts the wanted ranks; only if a rank falls outside them do the two radix
    passes run. The counts are exact either way, so the guess changes the time, never the result.
    """
    if single_block:
        series = next(iter(blocks()))
        return [
            _in_memory(values, rank_fn(i, values.numel(), _zeros(values) if count_zeros else 0))
            for i, values in enumerate(series)
        ]
    if expected_total is not None and not count_zeros:
        guided = _guided(blocks, rank_fn, expected_total)
        if guided is not None:
            return guided
    high_hist: list[np.ndarray] = []
    zeros: list[int] = []
    total: list[int] = []
    for series in blocks():
        if not high_hist:
            high_hist = [np.zeros(HIGH_BINS, dtype=np.int64) for _ in series]
            zeros = [0] * len(series)
            total = [0] * len(series)
        for i, values in enumerate(series):
            high_hist[i] += np.bincount(_halves(values)[1], minlength=HIGH_BINS)
            zeros[i] += _zeros(values) if count_zeros else 0
            total[i] += values.numel()
    wanted = [sorted(set(rank_fn(i, total[i], zeros[i]))) for i in range(len(high_hist))]
    cumulative = [np.cumsum(h) for h in high_hist]
    bins = []  # per series: rank -> (bin, count of values in lower bins)
    for i, ranks in enumerate(wanted):
        located = {}
        for rank in ranks:
            b = int(np.searchsorted(cumulative[i], rank, side="right"))
            located[rank] = (b, int(cumulative[i][b - 1]) if b > 0 else 0)
        bins.append(located)
    needed = [sorted({b for b, _ in located.values()}) for located in bins]
    low_hist = [{b: np.zeros(LOW_BINS, dtype=np.int64) for b in series_bins} for series_bins in needed]
    if any(needed):
        for series in blocks():
            for i, values in enumerate(series):
                if not needed[i]:
                    continue
                low, high = _halves(values)
                for b in needed[i]:
                    low_hist[i][b] += np.bincount(low[high == b], minlength=LOW_BINS)
    result = []
    for i, located in enumerate(bins):
        stats = {}
        for rank, (b, before) in located.items():
            low_cumulative = np.cumsum(low_hist[i][b])
            low = int(np.searchsorted(low_cumulative, rank - before, side="right"))
            less = before + (int(low_cumulative[low - 1]) if low > 0 else 0)
            stats[rank] = OrderStatistic(rank, _float_from_bits((b << 16) | low), less)
        result.append(stats)
    return result


def _guided(
    blocks: Callable[[], Iterable[list[torch.Tensor]]],
    rank_fn: Callable[[int, int, int], Sequence[int]],
    expected_total: int,
) -> list[dict[int, OrderStatistic]] | None:
    """One pass: count the low halves of bins guessed from the first block; None if a rank falls outside."""
    guesses: list[_GuessedBins | None] = []
    total: list[int] = []
    for series in blocks():
        first = not guesses
        for i, values in enumerate(series):
            low, high = _halves(values)
            high = np.ascontiguousarray(high)  # compared several times: faster than the strided view
            if first:
                counts = np.bincount(high, minlength=HIGH_BINS)
                guesses.append(_GuessedBins.around(counts, rank_fn(i, expected_total, 0), expected_total))
                total.append(0)
            total[i] += values.numel()
            if guesses[i] is not None:
                guesses[i].add(low, high)
    result = []
    for i, guessed in enumerate(guesses):
        stats = {}
        for rank in sorted(set(rank_fn(i, total[i], 0))):
            stat = guessed.locate(rank) if guessed is not None else None
            if stat is None:
                return None
            stats[rank] = stat
        result.append(stats)
    return result


class _GuessedBins:
    """Counts below and low-half histograms within a few runs of high bins, over all blocks."""

    SPAN = 3  # bins either side of each guessed bin

    def __init__(self, runs: list[tuple[int, int]]) -> None:
        self.runs = runs  # (first bin, number of bins), disjoint
        self.below = [0] * len(runs)  # values whose high half is below the run
        self.hists = [np.zeros(count * LOW_BINS, dtype=np.int64) for _, count in runs]

    @classmethod
    def around(cls, counts: np.ndarray, ranks: Sequence[int], total: int) -> _GuessedBins | None:
        """Bins near where the first block's histogram `counts` puts `ranks` of `total` values."""
        cumulative = np.cumsum(counts)
        size = int(cumulative[-1])
        if not ranks or size == 0:
            return None
        chosen: set[int] = set()
        for rank in ranks:
            scaled = min(size - 1, rank * size // max(1, total))
            b = int(np.searchsorted(cumulative, scaled, side="right"))
            chosen.update(range(max(0, b - cls.SPAN), min(HIGH_BINS, b + cls.SPAN + 1)))
        runs: list[tuple[int, int]] = []
        for b in sorted(chosen):
            if runs and runs[-1][0] + runs[-1][1] == b:
                runs[-1] = (runs[-1][0], runs[-1][1] + 1)
            else:
                runs.append((b, 1))
        return cls(runs)

    def add(self, low: np.ndarray, high: np.ndarray) -> None:
        for r, ((first, count), hist) in enumerate(zip(self.runs, self.hists, strict=True)):
            self.below[r] += int(np.count_nonzero(high < first))
            offset = high - np.uint16(first)  # wraps below `first`, so one comparison tests the run
            inside = np.flatnonzero(offset < count)
            keys = offset.take(inside).astype(np.int64) << 16
            keys |= low.take(inside)
            hist += np.bincount(keys, minlength=hist.size)

    def locate(self, rank: int) -> OrderStatistic | None:
        """The statistic at `rank`, or None when its value lies outside every run."""
        for (first, _), below, hist in zip(self.runs, self.below, self.hists, strict=True):
            cumulative = np.cumsum(hist)
            if below <= rank < below + int(cumulative[-1]):
                key = int(np.searchsorted(cumulative, rank - below, side="right"))
                less = below + (int(cumulative[key - 1]) if key > 0 else 0)
                return OrderStatistic(rank, _float_from_bits((first << 16) + key), less)
        return None


def _in_memory(values: torch.Tensor, ranks: Sequence[int]) -> dict[int, OrderStatistic]:
    ranks = sorted(set(ranks))
    if not ranks:
        return {}
    if values.numel() <= SMALL:
        chosen = [torch.kthvalue(values, rank + 1).values for rank in ranks]
        return {
            rank: OrderStatistic(rank, float(value), int((values < value).sum()))
            for rank, value in zip(ranks, chosen, strict=True)
        }
    array = values.contiguous().numpy()
    partitioned = np.partition(array, ranks)
    stats = {}
    for rank in ranks:
        value = partitioned[rank]
        stats[rank] = OrderStatistic(rank, float(value), int(np.count_nonzero(array < value)))
    return stats


def _halves(values: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """The low and high 16-bit halves of each float32 bit pattern, as uint16 views (no copy)."""
    pairs = values.contiguous().numpy().view(np.uint16).reshape(-1, 2)
    return (pairs[:, 0], pairs[:, 1]) if sys.byteorder == "little" else (pairs[:, 1], pairs[:, 0])


def _zeros(values: torch.Tensor) -> int:
    return int((values == 0).sum())


def _float_from_bits(bits: int) -> float:
    return float(torch.tensor([bits], dtype=torch.int32).view(torch.float32)[0])
