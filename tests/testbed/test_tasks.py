"""Task suite: deterministic generators, disjoint splits, correct answers, JSONL export."""

import json
import re

import pytest

from merging.testbed.tasks import (
    COMPOSITIONAL,
    DOMAINS,
    SPLIT_SIZES,
    SPLITS,
    TASKS,
    TaskError,
    column_addition,
    export_jsonl,
    generate,
    resolve_tasks,
    split_of,
)


def _literal(token: str) -> str:
    return {"T": "True", "F": "False"}.get(token, token)


def _bool_text(value: bool) -> str:
    return "T" if value else "F"


def _reference_answer(task: str, prompt: str) -> str:
    """Recompute the answer from the prompt text with plain Python."""
    if task == "arithmetic":
        a, b = map(int, re.fullmatch(r"Compute (\d+) \+ (\d+)\.", prompt).groups())
        return str(a + b)
    if task == "list_arith":
        values = sorted(json.loads(re.fullmatch(r"Sort (\[.*\]) and add its two halves\.", prompt).group(1)))
        half = len(values) // 2
        as_number = lambda digits: int("".join(map(str, digits)))  # noqa: E731
        return str(as_number(values[:half]) + as_number(values[half:]))
    if task == "lists":
        verb, items = re.fullmatch(r"(Reverse|Sort|Sort descending) (\[.*\])\.", prompt).groups()
        values = json.loads(items)
        out = {"Reverse": values[::-1], "Sort": sorted(values), "Sort descending": sorted(values)[::-1]}[verb]
        return "[" + ", ".join(map(str, out)) + "]"
    if task == "logic":
        exprs = re.fullmatch(r"Evaluate (.*)\.", prompt).group(1).split("; ")
        values = [eval(" ".join(_literal(tok) for tok in re.findall(r"\(|\)|\w+", e))) for e in exprs]
        return " ".join(_bool_text(v) for v in values)
    code, asked = re.fullmatch(r"Run (.*)\. What are (.*)\?", prompt).groups()
    env: dict[str, object] = {}
    for statement in code.split("; "):
        target, expr = statement.split("=", 1)
        env[target] = eval(" ".join(_literal(tok) for tok in re.findall(r"\w+|[+-]", expr)), {}, env)
    names = asked.split(", ")
    # the question names every variable, in the order the program first writes them
    assert names == list(env)
    shown = {k: _bool_text(v) if isinstance(v, bool) else str(v) for k, v in env.items()}
    return ", ".join(f"{k}={shown[k]}" for k in names)


def test_suite_has_four_domains_and_two_compositional_tasks():
    assert set(DOMAINS) <= set(TASKS) and len(DOMAINS) >= 4
    assert len(COMPOSITIONAL) >= 2
    for name in COMPOSITIONAL:
        assert len(set(TASKS[name].domains) & set(DOMAINS)) == 2


@pytest.mark.parametrize("task", list(TASKS))
def test_generation_is_deterministic_and_seeded(task):
    first = generate(task, "dev")
    assert first == generate(task, "dev")
    assert [ex.prompt for ex in first] != [ex.prompt for ex in generate(task, "dev", seed=1)]


@pytest.mark.parametrize("task", list(TASKS))
def test_splits_have_fixed_sizes_and_never_share_a_prompt(task):
    prompts = {split: [ex.prompt for ex in generate(task, split)] for split in SPLITS}
    for split in SPLITS:
        assert len(prompts[split]) == SPLIT_SIZES[split]
        assert len(set(prompts[split])) == SPLIT_SIZES[split]
        assert all(split_of(p) == split for p in prompts[split])
    assert not set(prompts["train"]) & set(prompts["test"])
    assert not set(prompts["train"]) & set(prompts["dev"])
    assert not set(prompts["dev"]) & set(prompts["test"])
    # A larger training draw stays inside the train split too.
    assert not {ex.prompt for ex in generate(task, "train", n=6000)} & set(prompts["test"])


@pytest.mark.parametrize("task", list(TASKS))
def test_answers_match_a_plain_reference_and_end_the_response(task):
    for ex in generate(task, "test"):
        assert ex.answer == _reference_answer(task, ex.prompt), ex.prompt
        lines = ex.response.split("\n")
        assert lines[-1] == f"Answer: {ex.answer}"
        assert len(lines) >= 2  # at least one scratchpad step


def test_arithmetic_scratchpad_is_column_addition():
    assert column_addition(347, 85) == ["7+5+0=12: 2 carry 1", "4+8+1=13: 32 carry 1", "3+0+1=4: 432 carry 0"]
    assert column_addition(10, 90) == ["0+0+0=0: 0 carry 0", "1+9+0=10: 00 carry 1"]


def test_list_items_are_distinct_digits():
    for ex in generate("lists", "test"):
        values = json.loads(ex.prompt[ex.prompt.index("[") :].rstrip("."))
        assert len(set(values)) == len(values) and 4 <= len(values) <= 6


def test_first_dev_examples_show_their_work():
    logic, tracing, lists, list_arith = (
        generate(task, "dev")[0] for task in ("logic", "tracing", "lists", "list_arith")
    )
    assert logic.prompt == "Evaluate (T and not T) or not T; (T or not T) or T; (not T and T) and F."
    assert logic.response == (
        "T and F = F, F or F = F\nT or F = T, T or T = T\nF and T = F, F and F = F\nAnswer: F T F"
    )
    assert tracing.prompt == "Run a=8; b=1; c=7; c=c-1; a=c+3; a=a-6; b=a+2. What are a, b, c?"
    assert tracing.response.split("\n") == [
        "a=8 -> a=8, b=_, c=_",
        "b=1 -> a=8, b=1, c=_",
        "c=7 -> a=8, b=1, c=7",
        "c=7-1=6 -> a=8, b=1, c=6",
        "a=6+3=9 -> a=9, b=1, c=6",
        "a=9-6=3 -> a=3, b=1, c=6",
        "b=3+2=5 -> a=3, b=5, c=6",
        "Answer: a=3, b=5, c=6",
    ]
    assert (lists.prompt, lists.response) == (
        "Sort descending [1, 7, 0, 6, 8, 9].",
        "descending: 9 8 7 6 1 0\nAnswer: [9, 8, 7, 6, 1, 0]",
    )
    assert list_arith.response == ("ascending: 0 2 6 7\n2+7+0=9: 9 carry 0\n0+6+0=6: 69 carry 0\nAnswer: 69")


def test_tracing_sets_a_b_c_then_chains_three_or_four_statements():
    for ex in generate("tracing", "test"):
        statements = re.fullmatch(r"Run (.*)\. What are a, b, c\?", ex.prompt).group(1).split("; ")
        assert [re.fullmatch(r"([abc])=[1-9]", st).group(1) for st in statements[:3]] == ["a", "b", "c"]
        assert len(statements) in (6, 7)
        previous = "c"
        for statement in statements[3:]:
            target, source = re.fullmatch(r"([abc])=([abc])[+-][1-9]", statement).groups()
            assert source == previous  # each statement reads the variable written before
            previous = target


@pytest.mark.parametrize("task", ["tracing", "bool_trace"])
def test_trace_lines_restate_every_variable_in_a_fixed_slot(task):
    """Line i runs statement i, then shows every variable in order of first write (``_`` if unset)."""
    for ex in generate(task, "test")[:50] + generate(task, "train", n=50, easy=True):
        code, asked = re.fullmatch(r"Run (.*)\. What are (.*)\?", ex.prompt).groups()
        names = asked.split(", ")
        lines = ex.response.split("\n")[:-1]
        env: dict[str, object] = {}
        for statement, line in zip(code.split("; "), lines, strict=True):
            target, expr = statement.split("=", 1)
            env[target] = eval(" ".join(_literal(tok) for tok in re.findall(r"\w+|[+-]", expr)), {}, env)
            shown = {k: _bool_text(v) if isinstance(v, bool) else str(v) for k, v in env.items()}
            step, state = line.split(" -> ")
            assert step.startswith(f"{target}=") and step.endswith(f"={shown[target]}")
            assert state == ", ".join(f"{k}={shown.get(k, '_')}" for k in names), ex.prompt


@pytest.mark.parametrize("task", list(TASKS))
def test_answers_are_hard_to_guess(task):
    """No single answer covers more than a small share of a test split (a guesser scores low)."""
    answers = [ex.answer for ex in generate(task, "test")]
    assert max(answers.count(a) for a in set(answers)) / len(answers) < 0.2


@pytest.mark.parametrize("task", list(TASKS))
def test_easy_variant_is_shorter_training_data(task):
    easy = generate(task, "train", n=300, easy=True)
    full = generate(task, "test")
    assert easy == generate(task, "train", n=300, easy=True)
    assert all(split_of(ex.prompt) == "train" for ex in easy)
    assert all(ex.answer == _reference_answer(task, ex.prompt) for ex in easy)
    mean = lambda examples: sum(len(ex.response) for ex in examples) / len(examples)  # noqa: E731
    assert mean(easy) < mean(full)
    with pytest.raises(TaskError, match="easy examples to come from the train split"):
        generate(task, "test", n=3, easy=True)


def test_export_jsonl_writes_every_split(tmp_path):
    paths = export_jsonl(tmp_path, ["logic"])
    assert sorted(p.name for p in paths) == ["logic.dev.jsonl", "logic.test.jsonl", "logic.train.jsonl"]
    rows = [json.loads(line) for line in (tmp_path / "logic.test.jsonl").read_text().splitlines()]
    assert rows == [ex.to_dict() for ex in generate("logic", "test")]


def test_bad_names_raise_typed_errors():
    with pytest.raises(TaskError, match="expected a task among"):
        generate("poetry")
    with pytest.raises(TaskError, match="expected a split among"):
        generate("logic", "validation")
    with pytest.raises(TaskError, match="expected a task among"):
        resolve_tasks("logic,poetry")
    assert resolve_tasks("logic, lists") == ["logic", "lists"]
    assert resolve_tasks(None) == list(TASKS)


def test_generate_memo_hands_out_independent_lists() -> None:
    first = generate("arithmetic", "dev", n=5)
    first.clear()
    again = generate("arithmetic", "dev", n=5)
    assert len(again) == 5
    assert again == generate("arithmetic", "dev", n=5)
