"""The simulated network's scenarios (see benchmarks/netsim/__main__.py for the command lines).

converge  N nodes at one rate: round time and bytes per node against the link floor; then a pull
          over a link of the same rate from every holder, and from one holder (the others stopped)
mixed     some nodes on slow links, the rest fast; the same run with every link fast for comparison
churn     N nodes contribute, K are SIGKILLed once the first node has its inputs, J new nodes join;
          the survivors must record one result, and the joiners pull it
scale     rounds of growing size; idle and peak memory per node, until one does not converge
"""

from __future__ import annotations

import os
import random
import signal
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from benchmarks.netsim.cluster import SimNetwork
from benchmarks.netsim.links import LinkSim, NetsimError
from benchmarks.netsim.rounds import MiB, RoundReport, measure_round, print_round


@dataclass(frozen=True)
class Setup:
    """Parameters every scenario prints and uses."""

    workdir: Path
    hidden: int = 384
    layers: int = 4
    zoo: str = ""  # "micro" or "small": the zoo's base and experts (cycled) instead of random models
    poll: float = 0.5
    settle: float = 1.0
    quorum: int = 0
    fallback: float = 120.0
    timeout: float = 900.0

    def describe(self) -> str:
        model = f"zoo {self.zoo}" if self.zoo else f"random Llama hidden {self.hidden} x {self.layers} layers"
        return (
            f"model: {model}, float32, bf16 deltas, ties; poll {self.poll} s, settle {self.settle} s, "
            f"quorum {self.quorum or 'majority'}, fallback {self.fallback:g} s; load {load()}"
        )


def load() -> str:
    one, five, _ = os.getloadavg()
    return f"{one:.1f}/{five:.1f} (1/5 min)"


def models(setup: Setup, count: int) -> tuple[Path, list[Path]]:
    """A base and `count` experts: random Llamas (base + seeded noise) or the zoo's experts cycled."""
    if setup.zoo:
        from merging.testbed.zoo import build_zoo

        zoo = build_zoo(setup.zoo)
        experts = [zoo.experts[d] for d in sorted(zoo.experts)]
        return zoo.base, [experts[i % len(experts)] for i in range(count)]
    from benchmarks.network_converge import make_models

    folder = setup.workdir / f"models-{setup.hidden}x{setup.layers}-{count}"
    if not folder.exists():
        folder.mkdir(parents=True)
        make_models(folder, count, setup.hidden, setup.layers)
    return folder / "base", [folder / f"expert{i}" for i in range(count)]


def _network(
    setup: Setup, links: LinkSim, names: Sequence[str], rates: Sequence[float], base: Path
) -> SimNetwork:
    for name, rate in zip(names, rates, strict=True):
        links.add_host(name, rate)
    net = SimNetwork(links, poll=setup.poll, fallback_seconds=setup.fallback)
    net.create(names[0], base, min_contributions=len(names), quorum=setup.quorum, settle=setup.settle)
    net.start_all(names)
    return net


def one_round(setup: Setup, tag: str, rates: Sequence[float]) -> RoundReport:
    """A fresh network of len(rates) nodes, one round; returns its report (everything torn down)."""
    names = [f"n{i}" for i in range(len(rates))]
    base, experts = models(setup, len(names))
    with LinkSim(setup.workdir / f"run-{tag}-{time.time_ns()}") as links:
        net = _network(setup, links, names, rates, base)
        return measure_round(net, names, experts, timeout=setup.timeout)


def converge(setup: Setup, nodes: int, rate: float, pull_rate: float) -> None:
    """Scenario 1 and the pull (see the module docstring)."""
    print(f"scenario converge: {nodes} nodes at {rate:g} Mbit/s each way; pull at {pull_rate:g} Mbit/s")
    print(setup.describe())
    names = [f"n{i}" for i in range(nodes)]
    base, experts = models(setup, nodes)
    with LinkSim(setup.workdir / f"run-converge-{time.time_ns()}") as links:
        net = _network(setup, links, names, [rate] * nodes, base)
        report = measure_round(net, names, experts, timeout=setup.timeout)
        print_round(report, f"round 0 ({nodes} nodes, load {load()})")
        links.add_host("puller", pull_rate)
        for holders in (nodes, 1):
            if holders == 1:
                for name in names[1:]:
                    os.killpg(net.procs[name].pid, signal.SIGTERM)
                for name in names[1:]:
                    net.procs[name].wait(timeout=60)
            out = setup.workdir / f"pulled-{holders}-{time.time_ns()}"
            pulled = net.pull("puller", out, [net.maddrs[names[0]]])
            print_pull(pulled, holders, pull_rate, report.fingerprints[names[0]])


def print_pull(pulled: dict, holders: int, rate: float, expected: str | None) -> None:
    floor = pulled["bytes"] * 8 / (rate * 1e6)
    transfer = pulled["seconds"]["transfer, written in place"]
    steps = ", ".join(f"{k} {v:.2f}" for k, v in pulled["seconds"].items())
    print(
        f"pull from {holders} holder(s): {pulled['bytes'] / MiB:.1f} MiB, link floor {floor:.2f} s; transfer "
        f"{transfer:.2f} s = {transfer / floor:.2f}x, whole pull {pulled['total']:.2f} s = "
        f"{pulled['total'] / floor:.2f}x; same result as the nodes: {pulled['fingerprint'] == expected} "
        f"(load {load()})"
    )
    print(f"  pull phases, s: {steps}")


def mixed(setup: Setup, nodes: int, slow: int, slow_rate: float, fast_rate: float) -> None:
    """Scenario 2: `slow` nodes at `slow_rate`, the rest at `fast_rate`; then all at `fast_rate`."""
    print(
        f"scenario mixed: {nodes} nodes, {slow} at {slow_rate:g} Mbit/s, {nodes - slow} at {fast_rate:g}; "
        f"then all {nodes} at {fast_rate:g}"
    )
    print(setup.describe())
    rates = [slow_rate] * slow + [fast_rate] * (nodes - slow)
    with_slow = one_round(setup, "mixed", rates)
    print_round(with_slow, f"with {slow} slow peers (load {load()})")
    all_fast = one_round(setup, "fast", [fast_rate] * nodes)
    print_round(all_fast, f"every link fast (load {load()})")
    fast = [f"n{i}" for i in range(slow, nodes)]
    mixed_fast = max(with_slow.converge[n] for n in fast)
    baseline = max(all_fast.converge[n] for n in fast)
    slow_sent = statistics.median(with_slow.sent[f"n{i}"] for i in range(slow)) / MiB
    print(
        f"fast nodes' round: {mixed_fast:.1f} s with slow peers vs {baseline:.1f} s without = "
        f"{mixed_fast / baseline:.2f}x; each slow node sent {slow_sent:.1f} MiB "
        f"({slow_sent * MiB * 8 / (slow_rate * 1e6):.1f} s of its uplink)"
    )


def churn(setup: Setup, nodes: int, killed: int, joined: int, runs: int, first: int = 0) -> None:
    """Scenario 3, `runs` times with different victims (seeded by the run index, from `first`)."""
    print(
        f"scenario churn: {nodes} nodes contribute, {killed} SIGKILLed once the first node has its inputs, "
        f"{joined} join then; {runs} runs"
    )
    print(setup.describe())
    outcomes = []
    for run in range(first, first + runs):
        names = [f"n{i}" for i in range(nodes)]
        victims = sorted(random.Random(run).sample(names, killed))
        survivors = [n for n in names if n not in victims]
        joiners = [f"j{i}" for i in range(joined)]
        base, experts = models(setup, nodes)
        with LinkSim(setup.workdir / f"run-churn{run}-{time.time_ns()}") as links:
            net = _network(setup, links, names, [100.0] * nodes, base)
            for name in joiners:
                links.add_host(name, 100.0)

            def kill_then_join(
                clock_start: float,
                net=net,
                names=names,
                victims=victims,
                survivors=survivors,
                run=run,
                joiners=joiners,
            ) -> None:
                deadline = time.monotonic() + setup.timeout
                while not any(_has_inputs(net.log(n)) for n in names) and time.monotonic() < deadline:
                    time.sleep(0.1)
                for victim in victims:
                    net.kill(victim)
                print(f"  run {run}: killed {victims} at {time.time() - clock_start:.1f} s")
                for name in joiners:
                    net.start(name, via=survivors[0])
                net.wait_ready(joiners, timeout=300)

            try:
                report = measure_round(
                    net, names, experts, timeout=setup.timeout, during=kill_then_join, wait_for=survivors
                )
            except NetsimError as exc:
                print(f"  run {run}: NOT decided: {exc}")
                outcomes.append(False)
                continue
            entry = [net.maddrs[survivors[0]]]
            pulls = [net.pull(j, setup.workdir / f"churn-pull-{run}-{j}", entry) for j in joiners]
            expected = report.fingerprints[survivors[0]]
            pulled_ok = all(p["fingerprint"] == expected for p in pulls)
            print(
                f"  run {run}: decided in {report.round_seconds:.1f} s, survivors agree: {report.agreed}, "
                f"joiners pulled it: {pulled_ok} (load {load()})"
            )
            outcomes.append(report.agreed and pulled_ok)
    print(f"churn: decided and agreed in {sum(outcomes)} of {runs} runs")


def _has_inputs(log: Path) -> bool:
    return log.exists() and "inputs of" in log.read_text(errors="replace")


def scale(setup: Setup, counts: Sequence[int], rate: float) -> None:
    """Scenario 4: one round per count (growing); memory per node; stops at the first failure."""
    print(f"scenario scale: rounds of {', '.join(map(str, counts))} nodes at {rate:g} Mbit/s")
    print(setup.describe())
    for count in counts:
        try:
            report = one_round(setup, f"scale{count}", [rate] * count)
        except NetsimError as exc:
            print(f"{count} nodes: NOT converged: {exc}")
            return
        idle = statistics.median(m.pss for m in report.idle.values())
        idle_rss = statistics.median(m.rss for m in report.idle.values())
        peak = [m.peak_rss for m in report.peak.values()]
        print(
            f"{count} nodes: round {report.round_seconds:.1f} s, agreed {report.agreed}; per node idle pss "
            f"{idle:.0f} MiB (rss {idle_rss:.0f}), "
            f"peak rss {statistics.median(peak):.0f} MiB (max {max(peak):.0f}); load {load()}"
        )
