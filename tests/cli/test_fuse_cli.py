"""`umm summarize` and `umm fuse` end to end on tiny models built in the test."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

from node.cli import cli
from tests.merging.test_fusion_summary import PROBE, save_tiny, tiny_pivot, tiny_source


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("fuse-cli")
    source = save_tiny(*tiny_source(), root / "source")
    pivot = save_tiny(*tiny_pivot(), root / "pivot")
    probe = root / "probe.json"
    probe.write_text(json.dumps(list(PROBE.prompts)))
    return root, source, pivot, probe


def _run(*args: str):
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


def test_summarize_then_fuse_writes_a_loadable_pivot_copy_with_its_provenance(folders):
    from merging.fusion.summary import load_summary
    from merging.testbed.models import load_pretrained

    root, source, pivot, probe = folders
    summary = root / "source.summary"
    done = _run(
        "summarize",
        source,
        "--probe",
        probe,
        "--out",
        summary,
        "--k",
        3,
        "--max-new-tokens",
        6,
        "--no-progress",
    )
    assert done.exit_code == 0, done.output
    assert load_summary(summary).k == 3
    out = root / "fused"
    done = _run(
        "fuse",
        "--pivot",
        pivot,
        "--summaries",
        summary,
        "--out",
        out,
        "--steps",
        3,
        "--batch-size",
        2,
        "--probe",
        probe,
        "--freeze",
        "embed_tokens,norm",
        "--no-progress",
    )
    assert done.exit_code == 0, done.output
    assert "top-k mass exact" in done.output
    provenance = json.loads((out / "fusion.json").read_text())
    assert provenance["probe_fingerprint"] == PROBE.fingerprint()
    assert list(provenance["summaries"]) == [str(summary)]
    fused, tokenizer = load_pretrained(out)
    original, _ = load_pretrained(pivot)
    assert len(tokenizer) == len(tiny_pivot()[1])
    before, after = original.state_dict(), fused.state_dict()
    assert before.keys() == after.keys()
    assert any(not torch.equal(before[name], after[name]) for name in before)
    assert all(
        torch.equal(before[name], after[name]) for name in before if "embed_tokens" in name or "norm" in name
    )


def test_fuse_refuses_a_summary_of_another_probe_set(folders):
    root, source, pivot, probe = folders
    summary = root / "again.summary"
    assert (
        _run(
            "summarize", source, "--probe", probe, "--out", summary, "--max-new-tokens", 3, "--no-progress"
        ).exit_code
        == 0
    )
    other = root / "other.json"
    other.write_text(json.dumps(list(PROBE.prompts[:1])))
    done = _run(
        "fuse",
        "--pivot",
        pivot,
        "--summaries",
        summary,
        "--out",
        root / "x",
        "--probe",
        other,
        "--no-progress",
    )
    assert done.exit_code == 2
    assert done.output.startswith("Error: expected a summary of probe set")
    assert not (root / "x").exists()


def test_fuse_without_summaries_is_an_error(folders):
    root, _, pivot, _ = folders
    done = _run("fuse", "--pivot", pivot, "--out", root / "y")
    assert done.exit_code == 2 and "Error: expected at least one summary file" in done.output


def test_fuse_records_the_held_out_check(folders):
    root, source, pivot, probe = folders
    summary = root / "held.summary"
    assert (
        _run(
            "summarize", source, "--probe", probe, "--out", summary, "--max-new-tokens", 4, "--no-progress"
        ).exit_code
        == 0
    )
    out = root / "held"
    done = _run("fuse", "--pivot", pivot, "--summaries", summary, "--out", out, "--steps", 2, "--no-progress")
    assert done.exit_code == 0, done.output
    held = json.loads((out / "fusion.json").read_text())["held_out"]
    assert held["prompts"] == 1  # of the three probe prompts, "Compute 60 + 96.\n" hashes below 10 %
    assert held["accepted"] == (held["fused_cross_entropy"] <= 0.95 * held["pivot_cross_entropy"])
    assert "held-out cross-entropy" in done.output
    everything = _run(
        "fuse", "--pivot", pivot, summary, "--out", root / "z", "--held-out", 1.0, "--no-progress"
    )
    assert everything.exit_code == 2 and "left to distill on" in everything.output


def test_fuse_with_replay_records_the_replay_prompts_and_trains_on_them(folders):
    import hashlib

    import msgpack
    from safetensors.torch import load_file

    root, source, pivot, probe = folders
    summary = root / "replay.summary"
    args = ("--max-new-tokens", 4, "--no-progress")
    assert _run("summarize", source, "--probe", probe, "--out", summary, *args).exit_code == 0
    prompts = ["x = 4\nx += 3\nPrint x.\n", "Is true and not false?\n"]
    replay = root / "replay.json"
    replay.write_text(json.dumps(prompts))
    common = ("--pivot", pivot, "--summaries", summary, "--steps", 3, "--held-out", 0.0, "--no-progress")
    assert _run("fuse", *common, "--out", root / "plain").exit_code == 0
    done = _run("fuse", *common, "--replay", replay, "--out", root / "replayed")
    assert done.exit_code == 0, done.output
    recorded = json.loads((root / "replayed" / "fusion.json").read_text())["replay"]
    digest = hashlib.sha256(msgpack.packb(["umm-probe-set-v1", prompts], use_bin_type=True)).hexdigest()
    assert recorded == {"prompts": 2, "fingerprint": digest}
    assert json.loads((root / "plain" / "fusion.json").read_text())["replay"] is None
    plain = load_file(root / "plain" / "model.safetensors")
    replayed = load_file(root / "replayed" / "model.safetensors")
    assert any(not torch.equal(plain[name], replayed[name]) for name in plain)


def test_fuse_leaves_embeddings_and_norms_as_the_pivot_has_them_unless_told(folders):
    from safetensors.torch import load_file

    root, source, pivot, probe = folders
    summary = root / "frozen.summary"
    args = ("--max-new-tokens", 4, "--no-progress")
    assert _run("summarize", source, "--probe", probe, "--out", summary, *args).exit_code == 0
    common = ("--pivot", pivot, "--summaries", summary, "--steps", 3, "--held-out", 0.0, "--no-progress")
    assert _run("fuse", *common, "--out", root / "frozen").exit_code == 0
    assert _run("fuse", *common, "--freeze", "", "--out", root / "all").exit_code == 0
    original = load_file(pivot / "model.safetensors")
    frozen, trained = (
        load_file(root / "frozen" / "model.safetensors"),
        load_file(root / "all" / "model.safetensors"),
    )
    shared = [name for name in original if "embed_tokens" in name or "norm" in name]
    assert shared and all(torch.equal(original[name], frozen[name]) for name in shared)
    assert any(not torch.equal(original[name], frozen[name]) for name in original if name not in shared)
    assert any(not torch.equal(original[name], trained[name]) for name in shared)


def test_grams_of_a_pivot_copy_cover_the_summaries_prompts_and_responses(folders, tmp_path):
    import shutil

    from merging.fusion.pipeline import MINCE, fusion_targets, load_summaries
    from merging.fusion.transfer import PivotTokens
    from merging.grams import GramFile
    from merging.testbed.models import load_pretrained

    root, source, pivot, probe = folders
    summary = root / "grams.summary"
    done = _run(
        "summarize", source, "--probe", probe, "--out", summary, "--max-new-tokens", 4, "--no-progress"
    )
    assert done.exit_code == 0, done.output
    copy = shutil.copytree(pivot, tmp_path / "copy")
    assert _run("grams", copy, "--no-progress").exit_code == 2  # neither --tasks nor --summaries
    both = _run("grams", copy, "--tasks", "lists", "--summaries", summary, "--no-progress")
    assert both.exit_code == 2 and "either --tasks or --summaries" in both.output
    done = _run("grams", copy, "--summaries", summary, "--no-progress")
    assert done.exit_code == 0, done.output
    _, tokenizer = load_pretrained(copy)
    targets, _ = fusion_targets([(str(summary), load_summaries([summary])[0])], PivotTokens(tokenizer), MINCE)
    with GramFile(copy) as grams:
        assert grams.tokens == sum(len(t.prompt_ids) + len(t.response_ids) for t in targets)
        assert grams.source == "summaries:grams.summary"
