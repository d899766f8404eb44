"""Bytes a response summary takes on the wire (protocol.summary), with and without zstd.

Usage: python benchmarks/summary_wire_size.py SUMMARY_FILE...   (files written by `umm summarize`)
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from merging.fusion.summary import load_summary
from protocol.summary import encode_summary


def main(paths: list[str]) -> None:
    torch.set_num_threads(1)
    for path in paths:
        summary = load_summary(path)
        prompts, positions = len(summary.responses), int(summary.token_ids.shape[0])
        for zstd in (False, True):
            entries, _ = encode_summary(summary, zstd=zstd)
            total = sum(e.nbytes for e in entries)
            header = next(e.nbytes for e in entries if e.name == "header")
            print(
                f"{Path(path).name}: {prompts} prompts, {positions} positions, k {summary.k}, "
                f"zstd {zstd}: {total} bytes ({total / prompts:.0f} per prompt), header {header}, "
                f"tensors {(total - header) / positions:.1f} bytes per position"
            )


if __name__ == "__main__":
    main(sys.argv[1:])
