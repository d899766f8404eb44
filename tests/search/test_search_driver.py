"""CMA-ES driver: deterministic candidates, a journal that survives a kill, resume = uninterrupted run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from merging.search.driver import CmaSettings, run_cma
from merging.search.fitness import Fitness
from merging.search.journal import JOURNAL_NAME, Journal, JournalError

SETTINGS = {"problem": "sphere", "dimension": 5}
START = [0.5] * 5


def sphere(x: list[float]) -> Fitness:
    """Fitness peaks at x = 0.3 everywhere (computed here, not by the code under test)."""
    value = -sum((v - 0.3) ** 2 for v in x)
    return Fitness(value, {"sphere": value}, {"sphere": value})


def search(out: Path, budget: int, evaluate=sphere, resume: bool = False, seed: int = 0):
    journal = Journal.open(out, SETTINGS, resume=resume)
    try:
        return run_cma(START, evaluate, journal, budget, CmaSettings(seed=seed, popsize=6))
    finally:
        journal.close()


def trace(result) -> list[tuple[int, int, list[float], float]]:
    return [(e.generation, e.member, e.x, e.fitness) for e in result.evaluations]


def test_same_seed_same_candidates_and_the_search_improves(tmp_path):
    first = search(tmp_path / "a", 40)
    second = search(tmp_path / "b", 40)
    assert trace(first) == trace(second)
    assert len(first.evaluations) == 40
    assert first.evaluations[0].x == START  # the config's own values come first
    assert first.best.fitness > sphere(START).value + 0.05
    assert trace(search(tmp_path / "c", 40, seed=1)) != trace(first)


def test_candidates_do_not_depend_on_numpy_use_elsewhere(tmp_path):
    def noisy_sphere(x):
        np.random.seed(123)  # what a fitness function might do to numpy's global generator
        np.random.rand(10)
        return sphere(x)

    assert trace(search(tmp_path / "a", 20, noisy_sphere)) == trace(search(tmp_path / "b", 20))


def test_resume_after_a_kill_gives_the_uninterrupted_result(tmp_path):
    class Killed(Exception):
        pass

    calls = 0

    def dies_after_nine(x):
        nonlocal calls
        calls += 1
        if calls > 9:
            raise Killed
        return sphere(x)

    with pytest.raises(Killed):
        search(tmp_path / "run", 30, dies_after_nine)
    records = [json.loads(line) for line in (tmp_path / "run" / JOURNAL_NAME).read_text().splitlines()]
    assert sum(r["type"] == "eval" for r in records) == 9
    resumed = search(tmp_path / "run", 30, resume=True)
    assert trace(resumed) == trace(search(tmp_path / "whole", 30))


def test_a_torn_last_line_is_dropped_and_the_budget_can_grow(tmp_path):
    search(tmp_path / "run", 14)
    path = tmp_path / "run" / JOURNAL_NAME
    with open(path, "ab") as fh:
        fh.write(b'{"type":"eval","generation":3,"mem')  # a write cut short by a kill
    resumed = search(tmp_path / "run", 25, resume=True)
    assert trace(resumed) == trace(search(tmp_path / "whole", 25))
    assert all(json.loads(line) for line in path.read_text().splitlines())


def test_journal_refuses_other_settings_a_second_start_and_a_missing_journal(tmp_path):
    search(tmp_path / "run", 5)
    with pytest.raises(JournalError, match="already holds a search journal"):
        Journal.open(tmp_path / "run", SETTINGS, resume=False)
    with pytest.raises(JournalError, match=r"other settings \(dimension\)"):
        Journal.open(tmp_path / "run", {**SETTINGS, "dimension": 6}, resume=True)
    with pytest.raises(JournalError, match="no search journal to resume"):
        Journal.open(tmp_path / "empty", SETTINGS, resume=True)


def test_a_journal_from_another_seed_is_refused_on_replay(tmp_path):
    search(tmp_path / "run", 10, seed=0)
    journal = Journal.open(tmp_path / "run", SETTINGS, resume=True)
    with pytest.raises(JournalError, match="differs from the one this search draws"):
        run_cma(START, sphere, journal, 10, CmaSettings(seed=5, popsize=6))


CHILD = """
import sys, time
sys.path.insert(0, {root!r})
from pathlib import Path
from tests.search.test_search_driver import search, sphere

def slow(x):
    time.sleep(0.05)
    return sphere(x)

search(Path({out!r}), 40, slow, resume={resume})
"""


def test_sigkill_mid_search_then_resume(tmp_path):
    out = tmp_path / "run"
    root = str(Path(__file__).resolve().parents[2])
    child = subprocess.Popen([sys.executable, "-c", CHILD.format(root=root, out=str(out), resume=False)])
    journal = out / JOURNAL_NAME
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if journal.exists() and journal.read_bytes().count(b'"type":"eval"') >= 12:
            break
        time.sleep(0.02)
    os.kill(child.pid, signal.SIGKILL)
    child.wait()
    done = journal.read_bytes().count(b'"type":"eval"')
    assert 12 <= done < 40
    resumed = search(out, 40, resume=True)
    assert trace(resumed) == trace(search(tmp_path / "whole", 40))
