"""The search journal: one JSON record per line, appended and fsynced, so a kill loses nothing.

The first record holds the search settings; then one `eval` record per evaluated candidate (its
generation, position in the generation, coordinates and fitness) and one `generation` record
after each CMA-ES update (step size, mean, and a digest of the optimizer's state). The optimizer's
state is rebuilt on resume by replaying the journal's generations through CMA-ES from the same
seed, each replayed state checked against its recorded digest. A last line cut short by a kill is
dropped when the journal is opened again. Floats are written with `repr` and read back exactly.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from merging.atomic import fsync_dir
from merging.errors import UmmError

JOURNAL_NAME = "journal.jsonl"
FORMAT_VERSION = 1


class JournalError(UmmError):
    """A journal that does not belong to this search, or that cannot be read."""


def read_records(path: Path) -> list[dict[str, Any]]:
    """Every complete record of the journal at `path` (a torn last line is left out)."""
    if not path.exists():
        return []
    records = []
    lines = path.read_bytes().split(b"\n")
    for number, line in enumerate(lines[:-1], start=1):  # the part after the last newline is torn
        try:
            records.append(json.loads(line))
        except ValueError:
            raise JournalError(f"line {number} of the search journal {str(path)!r} is not JSON") from None
    return records


class Journal:
    """Append-only writer; `open` checks the settings of an existing journal against the search's."""

    def __init__(self, path: Path, records: list[dict[str, Any]]) -> None:
        self.path = path
        self.records = records
        complete = path.read_bytes().rfind(b"\n") + 1
        with open(path, "r+b") as fh:  # drop a torn last line before appending
            fh.truncate(complete)
            os.fsync(fh.fileno())
        self._fh = open(path, "ab")  # noqa: SIM115 (closed by close())

    @classmethod
    def open(cls, out_dir: Path, settings: dict[str, Any], *, resume: bool) -> Journal:
        """The journal in `out_dir`: new (refusing an existing one unless `resume`) or reopened."""
        out_dir.mkdir(parents=True, exist_ok=True)
        path = out_dir / JOURNAL_NAME
        records = read_records(path)
        if records and not resume:
            raise JournalError(f"{str(out_dir)!r} already holds a search journal; pass --resume to go on")
        if resume and not records:
            raise JournalError(f"there is no search journal to resume in {str(out_dir)!r}")
        header = {"type": "header", "version": FORMAT_VERSION, "settings": settings}
        if records:
            recorded = dict(records[0].get("settings", {}))
            recorded.pop("budget", None)
            current = {k: v for k, v in settings.items() if k != "budget"}
            if records[0].get("version") != FORMAT_VERSION or recorded != json.loads(json.dumps(current)):
                changed = sorted(k for k in current if recorded.get(k) != json.loads(json.dumps(current[k])))
                raise JournalError(
                    f"the journal in {str(out_dir)!r} was written by a search with other settings "
                    f"({', '.join(changed) or 'format version'})"
                )
            return cls(path, records)
        path.touch()
        fsync_dir(out_dir)
        journal = cls(path, [])
        journal.append(header)
        return journal

    def append(self, record: dict[str, Any]) -> None:
        """Write one record and fsync it before returning."""
        self._fh.write(json.dumps(record, separators=(",", ":")).encode() + b"\n")
        self._fh.flush()
        os.fsync(self._fh.fileno())
        self.records.append(record)

    def evaluations(self) -> Iterator[dict[str, Any]]:
        return (r for r in self.records if r.get("type") == "eval")

    def close(self) -> None:
        self._fh.close()
