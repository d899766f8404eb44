"""`umm demo`: a 3-node network on 127.0.0.1 merging test-bed experts, then an accuracy table.

Builds (or reuses the cached) test-bed zoo, starts node processes, has each contribute one domain
expert, waits until every node holds the attested merge, pulls it like any newcomer (`node.pull`,
what `umm pull` runs, from this process), and evaluates base, experts and merge on their domains.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from node.errors import NodeError
from node.local import LocalNetwork
from node.pull import pull


@dataclasses.dataclass
class DemoReport:
    """Accuracy per model and domain, the network's result, and wall times per phase."""

    domains: list[str]
    accuracy: dict[str, dict[str, float]]
    network_id: str
    merged_fingerprint: str
    attested_by: int
    merged_dir: Path
    seconds: dict[str, float]


def run_demo(
    workdir: str | Path,
    *,
    size: str = "micro",
    nodes: int = 3,
    method: str = "ties",
    parameters: dict[str, Any] | None = None,
    codec: str = "bf16",
    limit: int | None = 100,
    say: Callable[[str], None] = print,
    reporter: Callable[[str, int], Any] | None = None,
) -> DemoReport:
    """Run the demo in `workdir` (see the module docstring); `reporter` shows the real zoo's
    training progress when it has to be built."""
    from merging.testbed.sizes import build_any_zoo

    workdir = Path(workdir).absolute()
    seconds: dict[str, float] = {}
    started = time.perf_counter()
    zoo = build_any_zoo(size, log=say, reporter=reporter)
    seconds["zoo"] = time.perf_counter() - started
    domains = sorted(zoo.experts)[:nodes]
    if len(domains) < nodes:
        raise NodeError(f"expected at least {nodes} experts in the {size} zoo, got {len(domains)}")
    names = [f"node{i + 1}" for i in range(nodes)]
    with LocalNetwork(workdir / "network") as net:
        tick = time.perf_counter()
        net.create(
            names[0],
            zoo.base,
            network_name="demo",
            method=method,
            parameters=parameters,
            min_contributions=nodes,
        )
        say(f"network {net.network_id}: starting {nodes} nodes")
        net.start_all(names)
        seconds["start"] = time.perf_counter() - tick
        tick = time.perf_counter()
        for name, domain in zip(names, domains, strict=True):
            done = net.contribute(name, zoo.experts[domain], codec=codec, name=domain, domains=(domain,))
            say(f"{name} contributes the {domain} expert ({done.total_bytes} bytes of {codec} deltas)")
        latest = net.wait_converged(names)
        seconds["converge"] = time.perf_counter() - tick
        fingerprints = {v["fingerprint"] for v in latest.values()}
        if len(fingerprints) != 1:
            raise NodeError(f"expected every node to hold the same merge, got {len(fingerprints)} merges")
        say(f"all {nodes} nodes hold the attested merge {next(iter(fingerprints))[:16]}")
        tick = time.perf_counter()
        merged = workdir / "merged"
        pulled = asyncio.run(pull(net.network_id, merged, initial_peers=[net.bootstrap], timeout=120.0))
        seconds["pull"] = time.perf_counter() - tick
        if pulled.merged_fingerprint not in fingerprints:
            raise NodeError("expected the pulled merge to be the one the nodes hold, got another")
        say(
            f"pulled round {pulled.round}: {pulled.merged_fingerprint[:16]} attested by "
            f"{pulled.attested_by} keys ({pulled.bytes_fetched} bytes fetched)"
        )
    tick = time.perf_counter()
    models = {"base": zoo.base, **{d: zoo.experts[d] for d in domains}, "merged (network)": merged}
    accuracy = {label: _accuracy(path, domains, limit) for label, path in models.items()}
    seconds["evaluate"] = time.perf_counter() - tick
    return DemoReport(
        domains=domains,
        accuracy=accuracy,
        network_id=net.network_id,
        merged_fingerprint=pulled.merged_fingerprint,
        attested_by=pulled.attested_by,
        merged_dir=merged,
        seconds=seconds,
    )


def _accuracy(model_dir: Path, domains: list[str], limit: int | None) -> dict[str, float]:
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    from merging.testbed.harness import evaluate

    hf_logging.disable_progress_bar()  # one "Loading weights" bar per model would bury the table
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    result = evaluate(model, tokenizer, domains, split="test", limit=limit)
    return {**result.accuracy, "mean": result.mean}
