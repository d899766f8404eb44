"""One round of a simulated network, measured: converge times, bytes per node against the link floor,
and where each node's time went (from its log: settle wait, input fetch, merge, finish).
"""

from __future__ import annotations

import re
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from benchmarks.netsim.cluster import Memory, SimNetwork

MiB = 1 << 20
_STAMP = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) node\.service INFO round (\d+)(.*)$")
_INPUTS = re.compile(r": shards .* inputs of \d+ contributions in ([\d.]+) s")


@dataclass
class Phases:
    """Seconds from the round's clock start to each step of one node (None: the step never logged)."""

    inputs_fetched: float | None = None  # its shards' inputs are in
    fetch_seconds: float = 0.0  # how long that fetch took (link-bound)
    merged: float | None = None  # its last shard merged (CPU-bound since inputs_fetched)
    recorded: float | None = None  # the round's result recorded


def node_phases(log: Path, clock_start: float, round_number: int = 0) -> Phases:
    """Parse a node's log (its ``node.service`` INFO lines) for `round_number`'s steps."""
    phases = Phases()
    for line in log.read_text(errors="replace").splitlines():
        match = _STAMP.match(line)
        if match is None or int(match.group(2)) != round_number:
            continue
        at = datetime.strptime(match.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp() - clock_start
        rest = match.group(3)
        inputs = _INPUTS.match(rest)
        if inputs and phases.inputs_fetched is None:
            phases.inputs_fetched, phases.fetch_seconds = at, float(inputs.group(1))
        elif rest.startswith(": merged shard"):
            phases.merged = at
        elif rest.startswith(": result ") and phases.recorded is None:
            phases.recorded = at
    return phases


@dataclass
class RoundReport:
    """What one round cost each node (names in start order)."""

    names: list[str]
    rates: dict[str, float]  # Mbit/s
    converge: dict[str, float]  # seconds from the last contribution stored to its recorded result
    received: dict[str, int]  # chunk bytes received during the round
    sent: dict[str, int]
    phases: dict[str, Phases]
    fingerprints: dict[str, str | None]
    idle: dict[str, Memory] = field(default_factory=dict)
    peak: dict[str, Memory] = field(default_factory=dict)

    def floor(self, name: str) -> float:
        """The link floor: seconds its link needs to receive its round's bytes."""
        return self.received[name] * 8 / (self.rates[name] * 1e6)

    def uplink(self, name: str) -> float:
        """Seconds its link needs to send what it served in the round (the other way of the link)."""
        return self.sent[name] * 8 / (self.rates[name] * 1e6)

    @property
    def round_seconds(self) -> float:
        return max(self.converge.values())

    @property
    def agreed(self) -> bool:
        values = set(self.fingerprints.values())
        return len(values) == 1 and None not in values


def measure_round(
    net: SimNetwork,
    names: Sequence[str],
    experts: Sequence[Path],
    *,
    timeout: float,
    during: Callable[[float], None] | None = None,
    wait_for: Sequence[str] | None = None,
) -> RoundReport:
    """Contribute `experts` from `names` (in pairs, at once) and time round 0 until `wait_for` record it.

    The clock starts when the last `umm contribute` has stored its deltas (`SimNetwork.contribute`).
    `during(clock_start)` runs right after (e.g. to kill nodes mid-round); `wait_for` defaults to
    `names`.
    """
    waiting = list(wait_for if wait_for is not None else names)
    for _ in range(100):  # byte counters start after the base fetch: wait for the first (<= 10 s)
        if all(net.state(n, "stats") is not None for n in names):
            break
        time.sleep(0.1)
    idle = {n: net.memory(n) for n in names}
    before_received = {n: net.received(n) for n in names}
    before_sent = {n: net.sent(n) for n in names}
    clock_start = net.contribute(list(zip(names, experts, strict=True)))
    if during is not None:
        during(clock_start)
    converge = net.wait_converged(waiting, timeout=timeout, since=clock_start)
    time.sleep(3 * net.poll)  # the nodes write their byte counters once a poll
    return RoundReport(
        names=waiting,
        rates={n: net.links.hosts[n].rate_mbit for n in waiting},
        converge=converge,
        received={n: net.received(n) - before_received.get(n, 0) for n in waiting},
        sent={n: net.sent(n) - before_sent.get(n, 0) for n in waiting},
        phases={n: node_phases(net.log(n), clock_start) for n in waiting},
        fingerprints=net.fingerprints(waiting),
        idle={n: idle[n] for n in waiting if n in idle},
        peak={n: net.memory(n) for n in waiting},
    )


def _median(values: Sequence[float | None]) -> str:
    known = [v for v in values if v is not None]
    return f"{statistics.median(known):6.1f}" if known else f"{'-':>6}"


def print_round(report: RoundReport, title: str) -> None:
    """Per node: rate, converge s, MiB in/out, link floor, ratio, phases; then the round's summary."""
    print(title)
    print(
        f"{'node':>7} {'Mbit/s':>6} {'conv s':>6} {'recv MiB':>8} {'sent MiB':>8} {'floor s':>7} {'up s':>5} "
        f"{'x floor':>7} {'inputs@':>7} {'fetch s':>7} {'merged@':>7} {'rec@':>6}"
    )
    for n in report.names:
        p = report.phases[n]
        floor = report.floor(n)
        print(
            f"{n:>7} {report.rates[n]:>6g} {report.converge[n]:>6.1f} {report.received[n] / MiB:>8.1f} "
            f"{report.sent[n] / MiB:>8.1f} {floor:>7.2f} {report.uplink(n):>5.1f} "
            f"{report.converge[n] / floor:>6.2f}x "
            f"{_fmt(p.inputs_fetched):>7} {p.fetch_seconds:>7.1f} {_fmt(p.merged):>7} {_fmt(p.recorded):>6}"
        )
    worst = max(report.floor(n) for n in report.names)
    fetch = [report.phases[n].fetch_seconds for n in report.names]
    merge = [
        (p.merged - p.inputs_fetched) if p.merged is not None and p.inputs_fetched is not None else None
        for p in report.phases.values()
    ]
    finish = [
        (p.recorded - p.merged) if p.recorded is not None and p.merged is not None else None
        for p in report.phases.values()
    ]
    busiest = max(report.names, key=report.uplink)
    print(
        f"round {report.round_seconds:.1f} s = {report.round_seconds / worst:.2f}x the largest link floor "
        f"(received bytes / rate: {worst:.2f} s); agreed: {report.agreed}; busiest uplink {busiest}: "
        f"{report.sent[busiest] / MiB:.1f} MiB = {report.uplink(busiest):.1f} s"
    )
    print(
        f"median per node: input fetch {_median(fetch)} s (link), merge {_median(merge)} s (CPU), "
        f"finish {_median(finish)} s (remaining shards, spot checks, quorum)"
    )
    if report.idle:
        print(
            "memory per node, MiB (median): idle rss "
            f"{statistics.median(m.rss for m in report.idle.values()):.0f} / pss "
            f"{statistics.median(m.pss for m in report.idle.values()):.0f}; peak rss "
            f"{statistics.median(m.peak_rss for m in report.peak.values()):.0f}"
        )


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"
