"""What `umm pull`'s verification costs: bytes and seconds of a verifying pull against a plain one.

A 3-node network on 127.0.0.1 decides round 0 of three bf16 contributions (`umm node start`
processes n1-n3, ties, one contribution each); the micro zoo by default (the node tests' 2-layer
Llama, hidden 32), or with ``--hidden H --layers L`` a random float32 Llama of that size. Then, in
this process, `node.pull.pull()` alternates plain (``verify=False``) and verifying pulls, `--repeat`
of each after one untimed warm-up pull; each prints bytes fetched (of which the verification's
sampled inputs), tensors recomputed and its phases' seconds. The medians are printed last.

    python benchmarks/pull_verify.py [--repeat 3] [--hidden 512 --layers 4]
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "node"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

NODES = ("n1", "n2", "n3")
MiB = 1 << 20


def make_network_models(root: Path, hidden: int, layers: int) -> tuple[Path, list[Path]]:
    """The base and three experts: the micro zoo (hidden 0) or `network_converge.make_models`."""
    if hidden:
        from network_converge import make_models

        return make_models(root, len(NODES), hidden, layers)
    from node_models import make_base, make_expert

    make_base(root / "base")
    for index, name in enumerate(NODES):
        make_expert(root / "base", root / f"expert-{name}", seed=300 + index)
    return root / "base", [root / f"expert-{name}" for name in NODES]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--hidden", type=int, default=0, help="0: the micro zoo")
    parser.add_argument("--layers", type=int, default=2)
    args = parser.parse_args()

    from node.local import LocalNetwork
    from node.pull import pull

    with tempfile.TemporaryDirectory(prefix="umm-bench-verify-") as tmp:
        root = Path(tmp)
        base, experts = make_network_models(root, args.hidden, args.layers)
        model_mib = (base / "model.safetensors").stat().st_size / MiB
        with LocalNetwork(root / "net") as net:
            net.create("n1", base, network_name="verifybench", method="ties", min_contributions=3)
            net.start_all(NODES)
            for name, expert in zip(NODES, experts, strict=True):
                net.contribute(name, expert, codec="bf16")
            net.wait_converged(NODES, timeout=1800.0)
            print(f"model {model_mib:.2f} MiB float32, 3 contributions (bf16), {len(NODES)} nodes")

            def one(verify: bool, index: int):
                out = root / f"pulled-{verify}-{index}"
                outcome = asyncio.run(pull(net.network_id, out, initial_peers=[net.bootstrap], verify=verify))
                shutil.rmtree(out)
                return outcome

            one(True, -1)  # warm-up: caches, the nodes' first answers
            runs: dict[bool, list] = {False: [], True: []}
            for index in range(args.repeat):
                for verify in (False, True):
                    outcome = one(verify, index)
                    runs[verify].append(outcome)
                    phases = ", ".join(f"{k} {v:.2f}" for k, v in outcome.seconds.items())
                    print(
                        f"{'verify' if verify else 'plain '} {sum(outcome.seconds.values()):6.2f} s "
                        f"{outcome.bytes_fetched / MiB:8.2f} MiB (verify inputs "
                        f"{outcome.verify_bytes / MiB:.2f} MiB, {sum(outcome.verified)} tensors) [{phases}]"
                    )
            for verify, outcomes in runs.items():
                seconds = statistics.median(sum(o.seconds.values()) for o in outcomes)
                fetched = statistics.median(o.bytes_fetched for o in outcomes) / MiB
                checking = statistics.median(o.seconds.get("verify a random sample", 0.0) for o in outcomes)
                print(
                    f"median {'verify' if verify else 'plain'}: {seconds:.2f} s, {fetched:.2f} MiB fetched, "
                    f"verification step {checking:.2f} s"
                )


if __name__ == "__main__":
    main()
