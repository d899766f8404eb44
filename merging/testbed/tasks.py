"""The reasoning task suite: seeded generators of instruction -> response pairs.

Four domains (``arithmetic``, ``lists``, ``logic``, ``tracing``) and two compositional tasks that
need two domains at once (``list_arith``: lists + arithmetic; ``bool_trace``: tracing + logic).
Every response is a short step-by-step scratchpad followed by a final line ``Answer: ...``;
scoring reads only that final answer.

Splits: a prompt's split is a function of the prompt alone (a sha256 bucket), so train, dev and
test can never share a prompt. Each split is filled by rejection sampling from a generator seeded
from ``(task, split, seed)``; identical arguments give identical examples on every machine.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import tempfile
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

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
    make: Callable[[random.Random], tuple[str, list[str], str]]
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


def _make_arithmetic(rng: random.Random) -> tuple[str, list[str], str]:
    a = rng.randint(10, 999)
    b = rng.randint(10, 999)
    return f"Compute {a} + {b}.", column_addition(a, b), str(a + b)


# --------------------------------------------------------------------------- lists


def _fmt_list(values: Sequence[int]) -> str:
    return "[" + ", ".join(str(v) for v in values) + "]"


def _running(values: Sequence[int], pick: Callable[[int, int], int]) -> list[int]:
    out, best = [], values[0]
    for v in values:
        best = pick(best, v)
        out.append(best)
    return out


def _make_lists(rng: random.Random) -> tuple[str, list[str], str]:
    values = [rng.randint(10, 99) for _ in range(rng.randint(3, 6))]
    op = rng.choice(("max", "min", "reverse"))
    if op == "reverse":
        rev = values[::-1]
        return f"Reverse {_fmt_list(values)}.", ["from the end: " + " ".join(map(str, rev))], _fmt_list(rev)
    run = _running(values, max if op == "max" else min)
    return (
        f"Find the {op} of {_fmt_list(values)}.",
        [f"{op} so far: " + " ".join(map(str, run))],
        str(run[-1]),
    )


# --------------------------------------------------------------------------- logic

_BOOL = {True: "T", False: "F"}


def _random_bool_expr(rng: random.Random, ops: int) -> tuple:
    """A random expression tree with exactly ``ops`` operators; leaves are booleans."""
    if ops == 0:
        return ("lit", rng.random() < 0.5)
    if rng.random() < 0.25:
        return ("not", _random_bool_expr(rng, ops - 1))
    left_ops = rng.randint(0, ops - 1)
    return (
        rng.choice(("and", "or")),
        _random_bool_expr(rng, left_ops),
        _random_bool_expr(rng, ops - 1 - left_ops),
    )


def _render_bool(node: tuple, top: bool = True) -> str:
    kind = node[0]
    if kind == "lit":
        return _BOOL[node[1]]
    if kind == "not":
        return "not " + _render_bool(node[1], top=False)
    text = f"{_render_bool(node[1], False)} {kind} {_render_bool(node[2], False)}"
    return text if top else f"({text})"


def _reduce_bool(node: tuple, steps: list[str]) -> bool:
    """Evaluate innermost-first, recording one ``T and F = F`` line per operator."""
    kind = node[0]
    if kind == "lit":
        return node[1]
    if kind == "not":
        inner = _reduce_bool(node[1], steps)
        steps.append(f"not {_BOOL[inner]} = {_BOOL[not inner]}")
        return not inner
    left = _reduce_bool(node[1], steps)
    right = _reduce_bool(node[2], steps)
    value = (left and right) if kind == "and" else (left or right)
    steps.append(f"{_BOOL[left]} {kind} {_BOOL[right]} = {_BOOL[value]}")
    return value


def _make_logic(rng: random.Random) -> tuple[str, list[str], str]:
    tree = _random_bool_expr(rng, rng.randint(2, 4))
    steps: list[str] = []
    value = _reduce_bool(tree, steps)
    return f"Evaluate {_render_bool(tree)}.", steps, str(value)


# --------------------------------------------------------------------------- tracing

_VARS = ("a", "b", "c", "x", "y", "z")


def _make_tracing(rng: random.Random) -> tuple[str, list[str], str]:
    names = rng.sample(_VARS, 3)
    env: dict[str, int] = {}
    code, steps = [], []
    first = names[0]
    env[first] = rng.randint(1, 9)
    code.append(f"{first}={env[first]}")
    steps.append(f"{first}={env[first]}")
    for _ in range(rng.randint(2, 3)):
        target = rng.choice(names)
        source = rng.choice(sorted(env))
        k = rng.randint(1, 9)
        op = "-" if env[source] - k >= 0 and rng.random() < 0.4 else "+"
        value = env[source] + k if op == "+" else env[source] - k
        code.append(f"{target}={source}{op}{k}")
        steps.append(f"{target}={env[source]}{op}{k}={value}")
        env[target] = value
    asked = rng.choice(sorted(env))
    return f"Run {'; '.join(code)}. What is {asked}?", steps, str(env[asked])


# --------------------------------------------------------------------------- compositional


def _make_list_arith(rng: random.Random) -> tuple[str, list[str], str]:
    values = [rng.randint(10, 99) for _ in range(rng.randint(3, 5))]
    hi, lo = _running(values, max), _running(values, min)
    steps = ["max so far: " + " ".join(map(str, hi)), "min so far: " + " ".join(map(str, lo))]
    steps += column_addition(hi[-1], lo[-1])
    return f"Add the max and the min of {_fmt_list(values)}.", steps, str(hi[-1] + lo[-1])


def _make_bool_trace(rng: random.Random) -> tuple[str, list[str], str]:
    names = rng.sample(_VARS, 3)
    env: dict[str, bool] = {}
    code, steps = [], []
    for name in names[:2]:
        env[name] = rng.random() < 0.5
        code.append(f"{name}={_BOOL[env[name]]}")
        steps.append(f"{name}={_BOOL[env[name]]}")
    for _ in range(rng.randint(2, 3)):
        target = rng.choice(names)
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
    asked = rng.choice(sorted(env))
    return f"Run {'; '.join(code)}. What is {asked}?", steps, str(env[asked])


TASKS: dict[str, Task] = {
    "arithmetic": Task("arithmetic", ("arithmetic",), _make_arithmetic, "an integer"),
    "lists": Task("lists", ("lists",), _make_lists, "a number, or a list written like [1, 2, 3]"),
    "logic": Task("logic", ("logic",), _make_logic, "True or False (T means True, F means False)"),
    "tracing": Task("tracing", ("tracing",), _make_tracing, "an integer"),
    "list_arith": Task("list_arith", ("lists", "arithmetic"), _make_list_arith, "an integer"),
    "bool_trace": Task(
        "bool_trace", ("tracing", "logic"), _make_bool_trace, "True or False (T means True, F means False)"
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


def generate(task: str, split: str = "train", n: int | None = None, seed: int = 0) -> list[Example]:
    """``n`` distinct examples of ``task`` owned by ``split`` (default: the split's fixed size)."""
    spec = _check_task(task)
    if split not in SPLITS:
        raise TaskError(f"expected a split among {', '.join(SPLITS)}, got {split!r}.")
    size = SPLIT_SIZES[split] if n is None else n
    if size < 0:
        raise TaskError(f"expected a non-negative number of examples, got {size}.")
    digest = hashlib.sha256(f"umm-testbed:{task}:{split}:{seed}".encode()).digest()
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
        prompt, steps, answer = spec.make(rng)
        if prompt in seen or split_of(prompt) != split:
            continue
        seen.add(prompt)
        response = "\n".join([*steps, f"Answer: {answer}"])
        examples.append(Example(task, split, prompt, response, answer))
    return examples


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


def write_text_atomic(path: Path, text: str) -> Path:
    """Write ``text`` to a temp file beside ``path``, fsync it, and rename it into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
