"""Testbed spec 3: multi-digit arithmetic with a digit-by-digit worked scratchpad, a procedure a small model
learns and applies to problems it never saw.

Tasks (``<op><n>d``; ``n`` = digits of the operands):

* ``add2d`` … ``add5d``: a + b, both n-digit; one column per digit, right to left, ``a+b+carry=sum``;
* ``sub2d`` … ``sub5d``: a − b, both n-digit, a ≥ b; ``top-b-borrow=r`` where top is the column's digit of a,
  plus 10 when the column borrows (so a borrow shows as a two-digit top, as a carry shows as a two-digit sum);
* ``mul2d`` … ``mul5d``: a × b, a n-digit, b one digit (2–9); ``digit*b+carry=product``.

The answer is the last column's result followed by the units digits of the earlier columns, last to first
(leading zeros dropped)::

    What is 4738+2965?   8+5+0=13 3+6+1=10 7+9+1=17 4+2+1=7 Answer: 7703
    What is 5302-2865?   12-5-0=7 10-6-1=3 13-8-1=4 5-2-1=2 Answer: 2437
    What is 4738*7?      8*7+0=56 3*7+5=26 7*7+2=51 4*7+5=33 Answer: 33166

Difficulty = digits + carries (or borrows): the number of columns that pass a non-zero carry (borrow) on.

Split: a problem is held out when a hash of its question falls in the held-out tenth (:func:`is_held_out`), so
the train split never serves a held-out problem, whatever its seed, and the held-out pool of a task is every
such problem (up to :data:`TEST_POOL`, drawn in a fixed order).

Rows are those of :mod:`align.testbed.tasks` (SFT, preference, RL; conversational or standard); a preference
pair's ``rejected`` keeps the worked columns and states a wrong answer.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache

from align.testbed.tasks import SPLITS, Problem, preference_row, rl_row, rows_dataset, sft_row

OPS = {"add": "+", "sub": "-", "mul": "*"}
DIGITS = (2, 3, 4, 5)
TEST_POOL = 256  # held-out problems per task (fewer where the task has fewer)
HELD_OUT_PERCENT = 10


@dataclass(frozen=True)
class LongProblem(Problem):
    carries: int = 0

    def solution(self, answer: int | None = None) -> str:
        """The worked columns and ``Answer: <n>``; with ``answer`` given, the same columns ending in that answer."""
        return " ".join([*self.steps, f"Answer: {self.answer if answer is None else answer}"])


def columns(op: str, a: int, b: int) -> tuple[list[str], list[int], int]:
    """The worked columns of ``a op b`` (right to left), each column's result, and how many columns pass a
    non-zero carry (borrow) on to the next."""
    da = [int(c) for c in reversed(str(a))]
    db = [int(c) for c in reversed(str(b))] if op != "mul" else []
    steps, results, carry, carries = [], [], 0, 0
    for i, x in enumerate(da):
        if op == "add":
            r = x + db[i] + carry
            steps.append(f"{x}+{db[i]}+{carry}={r}")
            carry = r // 10
        elif op == "sub":
            top = x + (10 if x - carry < db[i] else 0)
            r = top - db[i] - carry
            steps.append(f"{top}-{db[i]}-{carry}={r}")
            carry = top // 10
        else:
            r = x * b + carry
            steps.append(f"{x}*{b}+{carry}={r}")
            carry = r // 10
        results.append(r)
        carries += bool(carry) and i < len(da) - 1
    return steps, results, carries


def make_problem(task: str, a: int, b: int) -> LongProblem:
    """The problem ``a op b`` of ``task`` (e.g. ``add3d``), with its worked columns."""
    op = task[:3]
    steps, results, carries = columns(op, a, b)
    answer = int(str(results[-1]) + "".join(str(r % 10) for r in reversed(results[:-1])))
    n = len(str(a))
    return LongProblem(task, n + carries, f"What is {a}{OPS[op]}{b}?", tuple(steps), answer, carries)


@dataclass(frozen=True)
class LongTask:
    name: str
    op: str
    digits: int

    @property
    def space(self) -> int:
        width = 9 * 10 ** (self.digits - 1)
        return width * 8 if self.op == "mul" else width * width // (2 if self.op == "sub" else 1)

    def draw(self, rng: random.Random) -> LongProblem:
        lo, hi = 10 ** (self.digits - 1), 10**self.digits - 1
        a = rng.randint(lo, hi)
        if self.op == "mul":
            return make_problem(self.name, a, rng.randint(2, 9))
        b = rng.randint(lo, hi)
        if self.op == "sub" and b > a:
            a, b = b, a
        return make_problem(self.name, a, b)


TASKS: dict[str, LongTask] = {f"{op}{n}d": LongTask(f"{op}{n}d", op, n) for op in OPS for n in DIGITS}
# The RL mix of spec 3 (and the warm-up's tasks).
DEFAULT_TASKS = tuple(TASKS)


def get_task(name: str) -> LongTask:
    try:
        return TASKS[name]
    except KeyError:
        raise ValueError(f"unknown testbed task {name!r} (spec 3 knows: {', '.join(TASKS)})") from None


def is_held_out(question: str) -> bool:
    """Whether a question belongs to the held-out split (a fixed tenth of every task's problems, by hash)."""
    h = int.from_bytes(hashlib.sha1(f"align-testbed-v3:{question}".encode()).digest()[:8], "big")
    return h % 100 < HELD_OUT_PERCENT


@cache
def test_pool(name: str) -> tuple[LongProblem, ...]:
    """Task ``name``'s held-out problems: up to :data:`TEST_POOL`, in a fixed order."""
    task = get_task(name)
    rng = random.Random(f"align-testbed-v3-test-{name}")
    pool: dict[str, LongProblem] = {}
    misses = 0
    while len(pool) < TEST_POOL and misses < 20 * task.space:  # small tasks: until no new one shows up
        p = task.draw(rng)
        if is_held_out(p.question) and p.question not in pool:
            pool[p.question], misses = p, 0
        else:
            misses += 1
    return tuple(pool.values())


def problems(tasks: Sequence[str] = DEFAULT_TASKS, n: int | None = 256, split: str = "train",
             seed: int = 0) -> list[LongProblem]:
    """``n`` problems, tasks interleaved round-robin. ``split="test"``: the tasks' held-out pools in order
    (``n=None``: all of them); ``split="train"``: drawn with ``seed``, never a held-out problem."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if not tasks:
        raise ValueError("tasks: at least one task is needed")
    chosen = [get_task(t) for t in tasks]
    if split == "test":
        pools = [test_pool(t.name) for t in chosen]
        if n is None:
            return [p for pool in pools for p in pool]
        out = []
        for i in range(n):
            pool, k = pools[i % len(pools)], i // len(pools)
            if k >= len(pool):
                raise ValueError(f"test split of task {chosen[i % len(pools)].name!r} has only {len(pool)} problems")
            out.append(pool[k])
        return out
    if n is None:
        raise ValueError("n: the train split needs a size")
    rng = random.Random(f"align-testbed-v3-train-{seed}")
    out = []
    for i in range(n):
        while is_held_out((p := chosen[i % len(chosen)].draw(rng)).question):
            pass
        out.append(p)
    return out


def _wrong(p: LongProblem, rng: random.Random) -> int:
    return p.answer + rng.choice((-100, -10, -1, 1, 10, 100))


def sft_rows(tasks=DEFAULT_TASKS, n=256, split="train", seed=0, fmt="conversational") -> list[dict]:
    return [sft_row(p, fmt) for p in problems(tasks, n, split, seed)]


def preference_rows(tasks=DEFAULT_TASKS, n=256, split="train", seed=0, fmt="conversational") -> list[dict]:
    rng = random.Random(f"align-testbed-v3-rejected-{seed}-{split}")
    return [preference_row(p, _wrong(p, rng), fmt) for p in problems(tasks, n, split, seed)]


def rl_rows(tasks=DEFAULT_TASKS, n=256, split="train", seed=0, fmt="conversational") -> list[dict]:
    return [rl_row(p, fmt) for p in problems(tasks, n, split, seed)]


KINDS = {"sft": sft_rows, "preference": preference_rows, "rl": rl_rows}


def dataset(kind: str, tasks=DEFAULT_TASKS, n=256, split="train", seed=0, fmt="conversational"):
    """The spec-3 rows of ``kind`` (``sft``, ``preference`` or ``rl``) as a ``datasets.Dataset``."""
    return rows_dataset(KINDS, kind, tasks, n, split, seed, fmt)
