"""The reasoning task suite: seeded generators of instruction -> response pairs.

Four domains (``arithmetic``, ``lists``, ``logic``, ``tracing``) and two compositional tasks that
need two domains at once (``list_arith``: lists + arithmetic; ``bool_trace``: tracing + logic).
Every response is a short step-by-step scratchpad followed by a final line ``Answer: ...``;
scoring reads only that final answer.

Test, dev and the main train split hold the full-difficulty variant; ``generate(..., easy=True)``
draws an easier training variant of each task (shorter inputs), which the zoo's base model is
pretrained on so that it knows the format and the primitive steps but not the full tasks.

Splits: a prompt's split is a function of the prompt alone (a sha256 bucket), so train, dev and
test can never share a prompt. Each split is filled by rejection sampling from a generator seeded
from ``(task, split, seed)``; identical arguments give identical examples on every machine.
"""

from __future__ import annotations

import functools
import hashlib
import json
import random
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from merging.atomic import write_text_atomic
from merging.errors import UmmError

SPLITS: tuple[str, ...] = ("train", "dev", "test")
SPLIT_SIZES: dict[str, int] = {"train": 4000, "dev": 200, "test": 300}
# Share of the prompt space (per mille of a sha256 bucket) owned by each split.
_SPLIT_BUCKETS: dict[str, range] = {"test": range(0, 100), "dev": range(100, 150), "train": range(150, 1000)}
_MAX_TRIES_PER_EXAMPLE = 200


class TaskError(UmmError):
    """A task, split or size that the suite does not offer."""


@dataclass(frozen=True)
class Example:
    """One prompt with its worked response; ``answer`` is the canonical final answer."""

    task: str
    split: str
    prompt: str
    response: str
    answer: str

    def to_dict(self) -> dict[str, str]:
        return {
            "task": self.task,
            "split": self.split,
            "prompt": self.prompt,
            "response": self.response,
            "answer": self.answer,
        }


@dataclass(frozen=True)
class Task:
    """A generator of (prompt, scratchpad, answer) plus what a chat model must be told."""

    name: str
    domains: tuple[str, ...]
    make: Callable[[random.Random, bool], tuple[str, list[str], str]]  # (rng, easy)
    answer_hint: str

    @property
    def compositional(self) -> bool:
        return len(self.domains) > 1


# --------------------------------------------------------------------------- arithmetic


def column_addition(a: int, b: int) -> list[str]:
    """Schoolbook addition, one line per column: ``7+5+0=12: 2 carry 1``."""
    da, db = str(a)[::-1], str(b)[::-1]
    steps, carry, written = [], 0, ""
    for i in range(max(len(da), len(db))):
        x = int(da[i]) if i < len(da) else 0
        y = int(db[i]) if i < len(db) else 0
        total = x + y + carry
        written = str(total % 10) + written
        steps.append(f"{x}+{y}+{carry}={total}: {written} carry {total // 10}")
        carry = total // 10
    return steps


def _make_arithmetic(rng: random.Random, easy: bool) -> tuple[str, list[str], str]:
    a = rng.randint(0, 99) if easy else rng.randint(10, 99)
    b = rng.randint(0, 9) if easy else rng.randint(10, 99)
    return f"Compute {a} + {b}.", column_addition(a, b), str(a + b)


# --------------------------------------------------------------------------- lists


def _fmt_list(values: Sequence[int]) -> str:
    return "[" + ", ".join(str(v) for v in values) + "]"


_LIST_OPS: dict[str, tuple[str, Callable[[list[int]], list[int]]]] = {
    "Reverse": ("from the end", lambda v: v[::-1]),
    "Sort": ("ascending", sorted),
    "Sort descending": ("descending", lambda v: sorted(v, reverse=True)),
}


def _make_lists(rng: random.Random, easy: bool) -> tuple[str, list[str], str]:
    """Reverse or sort 4-6 distinct digits (2-3 when easy): every answer is a whole list."""
    values = rng.sample(range(10), rng.randint(2, 3) if easy else rng.randint(4, 6))
    verb = rng.choice(tuple(_LIST_OPS))
    label, op = _LIST_OPS[verb]
    out = op(values)
    return f"{verb} {_fmt_list(values)}.", [f"{label}: " + " ".join(map(str, out))], _fmt_list(out)


# --------------------------------------------------------------------------- logic

_BOOL = {True: "T", False: "F"}


def _bool_literal(rng: random.Random) -> tuple[str, bool]:
    """A literal, negated one time in four (``not T``): (text, value)."""
    value = rng.random() < 0.5
    if rng.random() < 0.25:
        return f"not {_BOOL[value]}", not value
    return _BOOL[value], value


def _bool_chain(rng: random.Random, operators: int) -> tuple[str, str, bool]:
    """A left-nested chain such as ``(T and not F) or F``: (text, reduction steps, value).

    Each step applies one operator to the value so far and the next literal, negation resolved:
    ``T and T = T, T or F = T``.
    """
    steps: list[str] = []
    text, value = _bool_literal(rng)
    for i in range(operators):
        op = rng.choice(("and", "or"))
        right_text, right = _bool_literal(rng)
        result = (value and right) if op == "and" else (value or right)
        steps.append(f"{_BOOL[value]} {op} {_BOOL[right]} = {_BOOL[result]}")
        text = f"({text}) {op} {right_text}" if i else f"{text} {op} {right_text}"
        value = result
    return text, ", ".join(steps), value


def _make_logic(rng: random.Random, easy: bool) -> tuple[str, list[str], str]:
    """Three chains of 2 operators (easy: one chain of 1-2), one reduction line per chain;
    the answer lists every chain's value, so a guess is right about one time in eight."""
    chains = [_bool_chain(rng, rng.randint(1, 2) if easy else 2) for _ in range(1 if easy else 3)]
    return (
        "Evaluate " + "; ".join(text for text, _, _ in chains) + ".",
        [steps for _, steps, _ in chains],
        " ".join(_BOOL[value] for _, _, value in chains),
    )


# --------------------------------------------------------------------------- tracing

_VARS = ("a", "b", "c")  # `tracing` sets them in this order, so each keeps one slot
# `bool_trace` draws three of these, first written in alphabetical order: with only two values per
# variable, fixed names would make a few answers common enough to guess.
_BOOL_VARS = ("a", "b", "c", "x", "y", "z")
_UNSET = "_"


def _state(env: Mapping[str, object], order: Sequence[str]) -> str:
    """Every variable in ``order`` with its value, ``_`` while unwritten: ``a=7, b=4, c=_``."""
    return ", ".join(f"{name}={env.get(name, _UNSET)}" for name in order)


def _trace(
    code: Sequence[str], steps: Sequence[str], envs: Sequence[Mapping[str, object]]
) -> tuple[str, list[str], str]:
    """Prompt, trace and answer of a straight-line program.

    The variables keep one slot each, in the order the program first writes them (the order the
    question names them): every trace line works out one statement, then restates every slot,
    ``c=4+3=7 -> a=7, b=4, c=7``, so a line is the line above with one value changed and the
    answer is the last line's state. A model fills a slot by copying the value above it unless the
    line's statement writes that variable; it never has to search for a value or reorder slots.
    """
    order = list(dict.fromkeys(statement.split("=", 1)[0] for statement in code))
    lines = [f"{step} -> {_state(env, order)}" for step, env in zip(steps, envs, strict=True)]
    return f"Run {'; '.join(code)}. What are {', '.join(order)}?", lines, _state(envs[-1], order)


def _make_tracing(rng: random.Random, easy: bool) -> tuple[str, list[str], str]:
    """``a``, ``b`` and ``c`` set to digits, then 3-4 statements (easy: 1-2), each writing any of
    the three and reading the variable written before; asks for every final value."""
    env: dict[str, int] = {}
    code, steps, envs = [], [], []
    for name in _VARS:
        env[name] = rng.randint(1, 9)
        code.append(f"{name}={env[name]}")
        steps.append(f"{name}={env[name]}")
        envs.append(dict(env))
    target = _VARS[-1]
    for _ in range(rng.randint(1, 2) if easy else rng.randint(3, 4)):
        source = target  # each statement reads the variable the previous one wrote
        target = rng.choice(_VARS)
        # Every value stays a single digit: pick among the steps that keep it in 0..9.
        op, k = rng.choice(
            [("+", k) for k in range(1, 10) if env[source] + k <= 9]
            + [("-", k) for k in range(1, 10) if env[source] - k >= 0]
        )
        before = env[source]
        env[target] = before + k if op == "+" else before - k
        code.append(f"{target}={source}{op}{k}")
        steps.append(f"{target}={before}{op}{k}={env[target]}")
        envs.append(dict(env))
    return _trace(code, steps, envs)


# --------------------------------------------------------------------------- compositional


def _make_list_arith(rng: random.Random, easy: bool) -> tuple[str, list[str], str]:
    """Sort 4 digits (easy: 2), then add the two halves read as numbers: a sort, then a sum."""
    values = [rng.randint(0, 9) for _ in range(2 if easy else 4)]
    ordered = sorted(values)
    half = len(ordered) // 2
    left = int("".join(map(str, ordered[:half])))
    right = int("".join(map(str, ordered[half:])))
    steps = ["ascending: " + " ".join(map(str, ordered)), *column_addition(left, right)]
    return f"Sort {_fmt_list(values)} and add its two halves.", steps, str(left + right)


def _make_bool_trace(rng: random.Random, easy: bool) -> tuple[str, list[str], str]:
    """Two boolean assignments, then 3-4 statements (easy: 1) of and / or / not; asks for the
    final value of every variable."""
    names = sorted(rng.sample(_BOOL_VARS, 3))
    env: dict[str, bool] = {}
    code, steps, envs = [], [], []
    for name in names[:2]:
        env[name] = rng.random() < 0.5
        code.append(f"{name}={_BOOL[env[name]]}")
        steps.append(f"{name}={_BOOL[env[name]]}")
        envs.append({n: _BOOL[v] for n, v in env.items()})
    for i in range(1 if easy else rng.randint(3, 4)):
        target = (names[2], names[0])[i] if i < 2 else rng.choice(names)
        known = sorted(env)
        if rng.random() < 0.25:
            src = rng.choice(known)
            value = not env[src]
            code.append(f"{target}=not {src}")
            steps.append(f"{target}=not {_BOOL[env[src]]}={_BOOL[value]}")
        else:
            left, right = rng.choice(known), rng.choice(known)
            op = rng.choice(("and", "or"))
            value = (env[left] and env[right]) if op == "and" else (env[left] or env[right])
            code.append(f"{target}={left} {op} {right}")
            steps.append(f"{target}={_BOOL[env[left]]} {op} {_BOOL[env[right]]}={_BOOL[value]}")
        env[target] = value
        envs.append({n: _BOOL[v] for n, v in env.items()})
    return _trace(code, steps, envs)


TASKS: dict[str, Task] = {
    "arithmetic": Task("arithmetic", ("arithmetic",), _make_arithmetic, "an integer"),
    "lists": Task("lists", ("lists",), _make_lists, "a list written like [1, 2, 3]"),
    "logic": Task("logic", ("logic",), _make_logic, "the value of each expression in order, like T F T"),
    "tracing": Task(
        "tracing", ("tracing",), _make_tracing, "every variable's final value, like a=3, b=7, c=0"
    ),
    "list_arith": Task("list_arith", ("lists", "arithmetic"), _make_list_arith, "an integer"),
    "bool_trace": Task(
        "bool_trace", ("tracing", "logic"), _make_bool_trace, "every variable's value, like a=T, x=F"
    ),
}
DOMAINS: tuple[str, ...] = ("arithmetic", "lists", "logic", "tracing")
COMPOSITIONAL: tuple[str, ...] = tuple(name for name, task in TASKS.items() if task.compositional)


def split_of(prompt: str) -> str:
    """The split that owns ``prompt`` (a pure function of the prompt text)."""
    bucket = int.from_bytes(hashlib.sha256(prompt.encode()).digest()[:8], "big") % 1000
    return next(split for split, span in _SPLIT_BUCKETS.items() if bucket in span)


def _check_task(task: str) -> Task:
    if task not in TASKS:
        raise TaskError(f"expected a task among {', '.join(TASKS)}, got {task!r}.")
    return TASKS[task]


def resolve_tasks(tasks: Iterable[str] | str | None) -> list[str]:
    """Task names from None (all), one name, a comma list, or an iterable; each validated."""
    if tasks is None:
        return list(TASKS)
    if isinstance(tasks, str):
        tasks = [t for t in tasks.split(",") if t.strip()]
    names = [t.strip() for t in tasks]
    for name in names:
        _check_task(name)
    if not names:
        raise TaskError("expected at least one task name, got none.")
    return names


def generate(
    task: str, split: str = "train", n: int | None = None, seed: int = 0, *, easy: bool = False
) -> list[Example]:
    """``n`` distinct examples of ``task`` owned by ``split`` (default: the split's fixed size).

    ``easy=True`` draws the task's easier variant (fewer digits, items, operators or statements),
    train split only and with repeats allowed: the curriculum a base model is pretrained on.
    Results are memoised (examples are immutable), so an evaluation loop pays for them once.
    """
    return list(_generate(task, split, n, seed, easy))


@functools.lru_cache(maxsize=256)
def _generate(task: str, split: str, n: int | None, seed: int, easy: bool) -> tuple[Example, ...]:
    """The uncached body of `generate`."""
    spec = _check_task(task)
    if split not in SPLITS:
        raise TaskError(f"expected a split among {', '.join(SPLITS)}, got {split!r}.")
    if easy and split != "train":
        raise TaskError(f"expected easy examples to come from the train split, got {split!r}.")
    size = SPLIT_SIZES[split] if n is None else n
    if size < 0:
        raise TaskError(f"expected a non-negative number of examples, got {size}.")
    level = ":easy" if easy else ""
    digest = hashlib.sha256(f"umm-testbed:{task}:{split}:{seed}{level}".encode()).digest()
    rng = random.Random(int.from_bytes(digest[:8], "big"))
    seen: set[str] = set()
    examples: list[Example] = []
    tries = 0
    while len(examples) < size:
        tries += 1
        if tries > _MAX_TRIES_PER_EXAMPLE * max(size, 1):
            raise TaskError(
                f"expected the {task} task to hold {size} distinct {split} prompts, got {len(examples)}."
            )
        prompt, steps, answer = spec.make(rng, easy)
        if (prompt in seen and not easy) or split_of(prompt) != split:
            continue
        seen.add(prompt)
        response = "\n".join([*steps, f"Answer: {answer}"])
        examples.append(Example(task, split, prompt, response, answer))
    return tuple(examples)


def export_jsonl(out_dir: str | Path, tasks: Iterable[str] | None = None, seed: int = 0) -> list[Path]:
    """Write ``<task>.<split>.jsonl`` for every task and split; returns the paths written."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for task in resolve_tasks(tasks):
        for split in SPLITS:
            lines = "".join(
                json.dumps(ex.to_dict(), sort_keys=True) + "\n" for ex in generate(task, split, seed=seed)
            )
            written.append(write_text_atomic(out / f"{task}.{split}.jsonl", lines))
    return written
