"""Synthetic verifiable arithmetic tasks with graded difficulty.

Every problem has a question, a worked solution that ends in ``Answer: <integer>`` and the integer
ground truth, so any completion can be checked with :func:`rewards.math.is_correct`. The same problems
are served in the formats trainers consume, as ``datasets.Dataset``:

* SFT rows: ``prompt``/``completion`` (TRL prompt-completion format);
* preference pairs: ``prompt``/``chosen``/``rejected``, where ``rejected`` is a well-formed derivation
  with a wrong final result;
* RL prompts: ``prompt`` with its ground-truth ``answer``.

``fmt="conversational"`` gives message lists (the chat template is applied by the trainer),
``fmt="standard"`` gives plain strings. Every row also carries ``task``, ``difficulty`` and ``answer``.

Test split: the single-digit "fact" tasks (at most 100 distinct problems: add1, sub1, mul1) have no
room for unseen problems, so their test split is the whole fact table; a tiny model learns them by
heart and accuracy measures how much of the table it has. Every larger task keeps a fixed held-out
pool of 200 problems that ``split="train"`` never yields, whatever its seed or size.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cache

from align.rewards.math import is_correct

SPLITS = ("train", "test")
FORMATS = ("conversational", "standard")


@dataclass(frozen=True)
class Problem:
    task: str
    difficulty: int
    question: str
    steps: tuple[str, ...]
    answer: int

    def solution(self, answer: int | None = None) -> str:
        """The worked solution; with ``answer`` given, the same derivation ending in that answer."""
        if answer is None or answer == self.answer:
            return " ".join([*self.steps, f"Answer: {self.answer}"])
        if not self.steps:
            return f"Answer: {answer}"
        *head, last = self.steps
        lhs = last.rsplit("=", 1)[0]
        return " ".join([*head, f"{lhs}={answer}.", f"Answer: {answer}"])


@dataclass(frozen=True)
class Task:
    name: str
    difficulty: int
    description: str
    space: int  # number of distinct problems
    make: Callable[[random.Random], Problem]

    def verify(self, completion, answer: int) -> bool:
        """True when ``completion`` states ``answer`` in the ``Answer: <n>`` format."""
        return is_correct(completion, answer)


def _binary(name: str, difficulty: int, op: str, lo_a: int, hi_a: int, lo_b: int, hi_b: int, ordered=False):
    fn = {"+": int.__add__, "-": int.__sub__, "*": int.__mul__}[op]

    def make(rng: random.Random) -> Problem:
        a, b = rng.randint(lo_a, hi_a), rng.randint(lo_b, hi_b)
        if ordered and b > a:
            a, b = b, a
        r = fn(a, b)
        return Problem(name, difficulty, f"What is {a}{op}{b}?", (), r)

    space = (hi_a - lo_a + 1) * (hi_b - lo_b + 1) // (2 if ordered else 1)
    return Task(name, difficulty, f"{op} with a in [{lo_a},{hi_a}], b in [{lo_b},{hi_b}]", space, make)


def _chain(rng: random.Random) -> Problem:
    a, b, c = rng.randint(1, 9), rng.randint(1, 9), rng.randint(2, 9)
    s = a + b
    return Problem("chain", 3, f"What is ({a}+{b})*{c}?", (f"{a}+{b}={s}.", f"{s}*{c}={s * c}."), s * c)


TASKS: dict[str, Task] = {
    t.name: t
    for t in (
        _binary("add1", 1, "+", 0, 9, 0, 9),
        _binary("sub1", 1, "-", 0, 9, 0, 9, ordered=True),
        _binary("add2", 2, "+", 10, 99, 10, 99),
        _binary("mul1", 2, "*", 2, 9, 2, 9),
        _binary("mul2", 3, "*", 10, 99, 2, 9),
        Task("chain", 3, "(a+b)*c, two steps, single digits", 9 * 9 * 8, _chain),
    )
}
EASY_TASKS = ("add1", "sub1", "mul1")
DEFAULT_TASKS = EASY_TASKS
FACT_TABLE_MAX = 100  # tasks with at most this many distinct problems are "fact tables"
TEST_POOL = 200  # held-out problems per larger task


def get_task(name: str) -> Task:
    try:
        return TASKS[name]
    except KeyError:
        raise ValueError(f"unknown testbed task {name!r} (known: {', '.join(TASKS)})") from None


def is_fact_task(name: str) -> bool:
    """Tasks small enough to enumerate (single-digit facts): their test split is the whole table."""
    return get_task(name).space <= FACT_TABLE_MAX


@cache
def _test_pool(name: str) -> tuple[Problem, ...]:
    task = get_task(name)
    rng = random.Random(f"align-testbed-test-{name}")
    pool: dict[str, Problem] = {}
    if is_fact_task(name):  # enumerate the table: draw until no new fact shows up in a long run
        misses = 0
        while misses < 20 * task.space:
            p = task.make(rng)
            misses = misses + 1 if p.question in pool else 0
            pool.setdefault(p.question, p)
        return tuple(sorted(pool.values(), key=lambda p: p.question))
    while len(pool) < TEST_POOL:
        p = task.make(rng)
        pool.setdefault(p.question, p)
    return tuple(pool.values())


def problems(
    tasks: Sequence[str] = DEFAULT_TASKS, n: int | None = 256, split: str = "train", seed: int = 0
) -> list[Problem]:
    """``n`` problems, tasks interleaved round-robin (exact proportions).

    ``split="test"`` draws without replacement from each task's fixed held-out pool (so at most the
    pool's size per task; ``n=None`` gives every held-out problem); ``split="train"`` samples with ``seed``
    and skips every held-out problem of the larger tasks.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if not tasks:
        raise ValueError("tasks: at least one task is needed")
    for t in tasks:
        get_task(t)
    if split == "test":
        pools = [list(_test_pool(t)) for t in tasks]
        if n is None:  # the whole held-out set of these tasks
            return [p for pool in pools for p in pool]
        out = []
        for i in range(n):
            pool = pools[i % len(tasks)]
            k = i // len(tasks)
            if k >= len(pool):
                raise ValueError(f"test split of task {tasks[i % len(tasks)]!r} has only {len(pool)} problems")
            out.append(pool[k])
        return out
    if n is None:
        raise ValueError("n: the train split needs a size")
    rng = random.Random(f"align-testbed-train-{seed}")
    held = {t: {p.question for p in _test_pool(t)} for t in tasks}
    out = []
    for i in range(n):
        name = tasks[i % len(tasks)]
        while (p := get_task(name).make(rng)).question in held[name] and not is_fact_task(name):
            pass
        out.append(p)
    return out


def _wrong(p: Problem, rng: random.Random) -> int:
    return p.answer + rng.choice((-10, -2, -1, 1, 2, 10))


def _message(role: str, text: str) -> list[dict]:
    return [{"role": role, "content": text}]


def prompt_of(p: Problem, fmt: str):
    """A problem's prompt in ``fmt`` (a user message, or plain text); shared by every testbed spec."""
    if fmt not in FORMATS:
        raise ValueError(f"fmt must be one of {FORMATS}, got {fmt!r}")
    return _message("user", p.question) if fmt == "conversational" else p.question


def completion_of(text: str, fmt: str):
    """A worked solution as the completion in ``fmt`` (an assistant message, or text after a space)."""
    return _message("assistant", text) if fmt == "conversational" else " " + text


def meta_of(p) -> dict:
    """The row fields every testbed row carries: task, difficulty, answer."""
    return {"task": p.task, "difficulty": p.difficulty, "answer": p.answer}


def sft_row(p, fmt: str) -> dict:
    """One SFT row of a problem (any spec's): its prompt and worked solution."""
    return {"prompt": prompt_of(p, fmt), "completion": completion_of(p.solution(), fmt), **meta_of(p)}


def preference_row(p, wrong: int, fmt: str) -> dict:
    """One preference row of a problem: the worked solution chosen, the same solution ending in ``wrong`` rejected."""
    return {"prompt": prompt_of(p, fmt), "chosen": completion_of(p.solution(), fmt),
            "rejected": completion_of(p.solution(wrong), fmt), **meta_of(p)}


def rl_row(p, fmt: str) -> dict:
    """One RL row of a problem: the prompt, its ground truth, and the reference worked solution (plain text)."""
    return {"prompt": prompt_of(p, fmt), **meta_of(p), "solution": p.solution()}


def rows_dataset(kinds: dict, kind: str, tasks, n, split, seed, fmt):
    """``kinds[kind]``'s rows (a spec's ``KINDS``: ``sft``, ``preference``, ``rl``) as a ``datasets.Dataset``."""
    from datasets import Dataset

    if kind not in kinds:
        raise ValueError(f"unknown testbed dataset kind {kind!r} (known: {', '.join(kinds)})")
    return Dataset.from_list(kinds[kind](tuple(tasks), n, split, seed, fmt))


def sft_rows(tasks=DEFAULT_TASKS, n=256, split="train", seed=0, fmt="conversational") -> list[dict]:
    return [sft_row(p, fmt) for p in problems(tasks, n, split, seed)]


def preference_rows(tasks=DEFAULT_TASKS, n=256, split="train", seed=0, fmt="conversational") -> list[dict]:
    rng = random.Random(f"align-testbed-rejected-{seed}-{split}")
    return [preference_row(p, _wrong(p, rng), fmt) for p in problems(tasks, n, split, seed)]


def rl_rows(tasks=DEFAULT_TASKS, n=256, split="train", seed=0, fmt="conversational") -> list[dict]:
    return [rl_row(p, fmt) for p in problems(tasks, n, split, seed)]


KINDS = {"sft": sft_rows, "preference": preference_rows, "rl": rl_rows}


def dataset(kind: str, tasks=DEFAULT_TASKS, n=256, split="train", seed=0, fmt="conversational"):
    """The testbed rows of ``kind`` (``sft``, ``preference`` or ``rl``) as a ``datasets.Dataset``."""
    return rows_dataset(KINDS, kind, tasks, n, split, seed, fmt)
