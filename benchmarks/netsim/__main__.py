"""The network on shaped links, simulated on one machine (Linux, root): see docs/netsim.md.

Usage (from the repository root):
    python -m benchmarks.netsim converge [--nodes 8] [--rate 100] [--pull-rate 100]
    python -m benchmarks.netsim mixed [--nodes 8] [--slow 2] [--slow-rate 20] [--fast-rate 200]
    python -m benchmarks.netsim churn [--nodes 8] [--killed 2] [--joined 2] [--runs 5] [--first 0]
    python -m benchmarks.netsim scale [--counts 4,8,12] [--rate 100]
    python -m benchmarks.netsim imports
    python -m benchmarks.netsim cleanup        (what a killed run left: processes, namespaces)
Common options: --hidden 384 --layers 4 (random Llama) or --zoo micro|small, --poll 0.5,
--settle 1.0, --quorum 0, --fallback 120, --timeout 900, --workdir DIR (not under /tmp).
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

from benchmarks.netsim import scenarios
from benchmarks.netsim.links import NetsimError, cleanup_leftovers, namespaces_unavailable
from node.cli.options import quiet_third_parties


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.netsim", description=__doc__.splitlines()[0])
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--hidden", type=int, default=384)
    common.add_argument("--layers", type=int, default=4)
    common.add_argument("--zoo", choices=["micro", "small"], default="")
    common.add_argument("--poll", type=float, default=0.5)
    common.add_argument("--settle", type=float, default=1.0)
    common.add_argument("--quorum", type=int, default=0)
    common.add_argument("--fallback", type=float, default=120.0)
    common.add_argument("--timeout", type=float, default=900.0)
    common.add_argument("--workdir", type=Path, default=None)
    sub = parser.add_subparsers(dest="scenario", required=True)
    one = sub.add_parser("converge", parents=[common])
    one.add_argument("--nodes", type=int, default=8)
    one.add_argument("--rate", type=float, default=100.0)
    one.add_argument("--pull-rate", type=float, default=100.0)
    two = sub.add_parser("mixed", parents=[common])
    two.add_argument("--nodes", type=int, default=8)
    two.add_argument("--slow", type=int, default=2)
    two.add_argument("--slow-rate", type=float, default=20.0)
    two.add_argument("--fast-rate", type=float, default=200.0)
    three = sub.add_parser("churn", parents=[common])
    three.add_argument("--nodes", type=int, default=8)
    three.add_argument("--killed", type=int, default=2)
    three.add_argument("--joined", type=int, default=2)
    three.add_argument("--runs", type=int, default=5)
    three.add_argument("--first", type=int, default=0, help="index of the first run (seeds its victims)")
    four = sub.add_parser("scale", parents=[common])
    four.add_argument("--counts", default="4,8,12")
    four.add_argument("--rate", type=float, default=100.0)
    sub.add_parser("imports")
    sub.add_parser("cleanup")
    return parser


def main(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    quiet_third_parties(verbose=False)  # transformers' "Writing model shards" bar per model written
    reason = namespaces_unavailable()
    if reason is not None:
        print(f"Error: the simulator cannot run here: {reason}.", file=sys.stderr)
        return 2
    if args.scenario == "imports":
        from benchmarks.netsim.imports import report_imports

        report_imports()
        return 0
    if args.scenario == "cleanup":
        removed = cleanup_leftovers()
        print(f"removed {len(removed)} namespaces: {' '.join(removed) or '-'}")
        return 0
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="umm-netsim-", dir="/var/tmp"))
    setup = scenarios.Setup(
        workdir=workdir.resolve(),
        hidden=args.hidden,
        layers=args.layers,
        zoo=args.zoo,
        poll=args.poll,
        settle=args.settle,
        quorum=args.quorum,
        fallback=args.fallback,
        timeout=args.timeout,
    )
    try:
        if args.scenario == "converge":
            scenarios.converge(setup, args.nodes, args.rate, args.pull_rate)
        elif args.scenario == "mixed":
            scenarios.mixed(setup, args.nodes, args.slow, args.slow_rate, args.fast_rate)
        elif args.scenario == "churn":
            scenarios.churn(setup, args.nodes, args.killed, args.joined, args.runs, args.first)
        else:
            counts = [int(c) for c in args.counts.split(",")]
            scenarios.scale(setup, counts, args.rate)
    except NetsimError as exc:
        print(f"Error: {exc} (logs in {workdir})", file=sys.stderr)
        return 1
    if args.workdir is None:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
