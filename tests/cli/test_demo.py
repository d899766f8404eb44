"""`umm demo` end to end on the micro zoo: 3 node processes attest one merge, the pull loads."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from protocol.fingerprint import weights_fingerprint

pytestmark = [pytest.mark.network, pytest.mark.slow]


def _processes_mentioning(text: str) -> list[int]:
    """Live processes whose command line contains `text`."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except (FileNotFoundError, ProcessLookupError, PermissionError):
                continue
            if text in cmdline:
                found.append(int(entry.name))
    return found


def test_demo_runs_a_network_and_prints_the_table(tmp_path):
    workdir = tmp_path / "demo"
    env = {**os.environ, "COLUMNS": "200"}  # rich wraps tables at 80 columns without a terminal
    command = ["demo", "--size", "micro", "--workdir", str(workdir), "--limit", "2"]
    done = subprocess.run(
        [sys.executable, "-m", "node.cli", *command],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    out = done.stdout

    assert "all 3 nodes hold the attested merge" in out
    contributions = re.findall(r"node(\d) contributes the (\w+) expert", out)
    assert sorted(n for n, _ in contributions) == ["1", "2", "3"]
    domains = [d for _, d in contributions]

    rows = {line.split("│")[1].strip() for line in out.splitlines() if line.count("│") >= 3}
    assert {"base", *domains, "merged (network)"} <= rows

    merged = workdir / "merged"
    printed = re.search(r"merged ([0-9a-f]{16}), attested by (\d+) keys", out)
    assert printed is not None and int(printed.group(2)) >= 2
    assert weights_fingerprint(merged).startswith(printed.group(1))  # the pulled bytes are the attested ones

    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(merged)
    tokenizer = AutoTokenizer.from_pretrained(merged)
    ids = tokenizer("1 + 2 =", return_tensors="pt").input_ids
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.shape[:2] == ids.shape and bool(torch.isfinite(logits).all())

    assert _processes_mentioning(str(workdir)) == []  # every node process (and its children) ended
