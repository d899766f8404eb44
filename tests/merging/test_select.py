"""Exact order statistics and rank windows against a sort."""

import torch

from merging.select import WindowMasker, order_statistics, window_from_ranks, window_ranks


def _values(n: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(3)
    values = (torch.randn(n, generator=generator) * 8).round().abs() / 16  # many exact ties and zeros
    values[:5] = 0.0
    return values


def _reference_keep(values: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
    order = torch.sort(values, stable=True).indices  # by value, then position
    keep = torch.zeros(values.numel(), dtype=torch.bool)
    keep[order[lo:hi]] = True
    return keep


def test_radix_and_kthvalue_find_the_sorted_values():
    values = _values(70_001)  # above the kthvalue cut-off, so single blocks use the radix path too
    ordered = torch.sort(values).values
    ranks = [0, 1, 4, 5, 1234, 35_000, 70_000]
    for blocks, single in (([values], True), ([values[:30_000], values[30_000:]], False)):
        stats = order_statistics(lambda blocks=blocks: ([b] for b in blocks), lambda i, n, z: ranks, single)[
            0
        ]
        for rank in ranks:
            assert stats[rank].value == ordered[rank].item()
            assert stats[rank].less == int((values < ordered[rank]).sum())
    small = values[:1000]
    stats = order_statistics(lambda: iter([[small]]), lambda i, n, z: [0, 500, 999], True)[0]
    assert stats[500].value == torch.sort(small).values[500].item()


def test_window_masks_match_a_stable_sort_across_blocks():
    values = _values(3_000)
    n = values.numel()
    for lo, hi in ((n - 1200, n), (300, n - 30), (0, 2000), (1500, 1500)):
        chunks = [values[:1000], values[1000:2100], values[2100:]]
        stats = order_statistics(
            lambda chunks=chunks: ([c] for c in chunks),
            lambda i, c, z, lo=lo, hi=hi: window_ranks(c, lo, hi),
            False,
        )
        masker = WindowMasker(window_from_ranks(n, lo, hi, stats[0]))
        keep = torch.cat([masker(c) for c in chunks])
        assert torch.equal(keep, _reference_keep(values, lo, hi)), (lo, hi)
        assert int(keep.sum()) == max(0, hi - lo)


def test_first_pass_guess_gives_the_sorted_values_when_it_hits_or_misses():
    values = _values(70_001)
    values[:20_000] *= 64  # the first block misplaces the ranks: the guess misses, a second pass counts
    ordered = torch.sort(values).values
    ranks = [3, 20_000, 35_000, 69_999]
    for first in (values[:20_000], values[:1_000]):
        chunks = [first, values[first.numel() :]]
        for total in (values.numel(), values.numel() // 3):  # a wrong expected total only costs time
            stats = order_statistics(
                lambda chunks=chunks: ([c] for c in chunks),
                lambda i, n, z: ranks,
                False,
                expected_total=total,
            )[0]
            for rank in ranks:
                assert stats[rank].value == ordered[rank].item()
                assert stats[rank].less == int((values < ordered[rank]).sum())


def test_float_masks_equal_the_bool_masks():
    values = _values(3_000)
    n = values.numel()
    for lo, hi in ((n - 1200, n), (300, n - 30), (0, 2000), (1500, 1500), (0, n)):
        chunks = [values[:1000], values[1000:2100], values[2100:]]
        stats = order_statistics(
            lambda chunks=chunks: ([c] for c in chunks),
            lambda i, c, z, lo=lo, hi=hi: window_ranks(c, lo, hi),
            False,
        )
        window = window_from_ranks(n, lo, hi, stats[0])
        as_bool, as_float = WindowMasker(window), WindowMasker(window)
        for chunk in chunks:
            expected = as_bool(chunk).to(torch.float32)
            assert torch.equal(as_float.mask_into(chunk, torch.full_like(chunk, 7.0)), expected), (lo, hi)
