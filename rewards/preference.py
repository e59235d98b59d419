"""Preference oracles: P(y ≻ y′ | x) for a batch of pairs, the labels of online preference training.

One interface, :class:`PreferenceOracle` (``oracle(prompts, a, b, columns) -> [N] tensor in [0, 1]``), with
these implementations:

* :class:`RewardOracle`: Bradley–Terry over a scalar reward, P = σ((r(a) − r(b)) / scale), where r is any
  reward spec the RL trainers take (``accuracy``, ``model:<path>`` for a reward model, ``module:function``).
* :class:`VerifierOracle`: a verifier's verdicts, correct beats incorrect, equal verdicts tie at ½.
* :class:`PairwiseModelOracle`: a pairwise preference model, a sequence classifier over the prompt and the
  two responses; it is asked in both orders and the answers averaged, P = ½(f(a, b) + 1 − f(b, a)), so the
  position of a response cannot matter.
* :class:`CyclicOracle`: a non-transitive preference for the testbed (rock–paper–scissors over the stated
  answer's residue mod 3), whose Nash equilibrium is known.
* any ``module:function`` returning probabilities.

Every oracle counts the pairs it has judged (``calls``; the trainers log it as ``oracle/calls``), and every
answer is checked: a probability outside [0, 1] or NaN stops the run naming the oracle and the pair. An oracle
that runs user code (a model, a ``module:function``, a reward or verifier that is not a registered name) gets
``timeout_s`` seconds per call (the ``reward_timeout_s`` option, :mod:`align.timeouts`); one that has not
answered by then stops the run naming the oracle and the prompt ids.
:meth:`PreferenceOracle.best_worst` ranks K candidates by their mean win probability against the others
(for a reward oracle, the reward order), as the iterative trainers need.
"""

from __future__ import annotations

import importlib
import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from typing import Any

import torch

from align.errors import ConfigError, DataError, TrainingError
from align.rewards.math import completion_text, extract_answer
from align.timeouts import REWARD_TIMEOUT_S, DeadlineExceeded, call_with_deadline

Texts = Sequence[Any]


class PreferenceOracle(ABC):
    """Base class: subclasses implement ``_prob(prompts, a, b, columns) -> [N] float tensor``; those that run user
    code set ``runs_user_code``, and their calls get ``timeout_s`` seconds (None: unbounded)."""

    name = "oracle"
    runs_user_code = True
    timeout_s: float | None = REWARD_TIMEOUT_S

    def __init__(self):
        self.calls = 0

    @abstractmethod
    def _prob(self, prompts: Texts, a: Texts, b: Texts, columns: dict[str, Sequence]) -> torch.Tensor:
        """P(a[i] ≻ b[i]) for every pair, unchecked."""

    def __call__(self, prompts: Texts, a: Texts, b: Texts, columns: dict[str, Sequence] | None = None,
                 ids: Sequence | None = None) -> torch.Tensor:
        """P(a[i] ≻ b[i] | prompts[i]) for every i; ``columns`` are dataset columns aligned with the pairs; ``ids``
        the pairs' prompt ids for error messages (default: the ``uid`` column, if any)."""
        from align.rewards.registry import timeout_message

        n = len(a)
        if not (len(prompts) == len(b) == n):
            raise ValueError(f"oracle {self.name!r}: {len(prompts)} prompts, {n} first and {len(b)} second responses")
        columns = columns or {}
        try:
            p = call_with_deadline(self._prob, self.timeout_s if self.runs_user_code else None, prompts, a, b, columns)
        except DeadlineExceeded as e:
            ids = columns.get("uid", ()) if ids is None else ids
            raise TrainingError(timeout_message(f"oracle {self.name!r}", e.timeout_s, ids)) from None
        p = torch.as_tensor(p, dtype=torch.float32).reshape(-1)
        if p.numel() != n:
            raise TrainingError(f"oracle {self.name!r} returned {p.numel()} probabilities for {n} pairs")
        bad = (~torch.isfinite(p)) | (p < 0) | (p > 1)
        if bool(bad.any()):
            i = int(bad.nonzero()[0])
            raise TrainingError(f"oracle {self.name!r} returned {p[i].item()} for pair {i}: probabilities must be "
                                "finite and in [0, 1]")
        self.calls += n
        return p

    def best_worst(self, prompt: Any, candidates: Texts, row: dict | None = None) -> tuple[int, int, list[float]]:
        """(best, worst, scores): each candidate's score is its mean P(candidate ≻ other) over the others (one
        oracle call per unordered pair, P(j ≻ i) = 1 − P(i ≻ j)); ties go to the earlier candidate."""
        k = len(candidates)
        if k < 2:
            raise ValueError("best_worst: at least 2 candidates are needed")
        pairs = [(i, j) for i in range(k) for j in range(i + 1, k)]
        cols = {key: [value] * len(pairs) for key, value in (row or {}).items()}
        p = self([prompt] * len(pairs), [candidates[i] for i, _ in pairs], [candidates[j] for _, j in pairs], cols)
        wins = [0.0] * k
        for (i, j), pij in zip(pairs, p.tolist(), strict=True):
            wins[i] += pij
            wins[j] += 1.0 - pij
        scores = [round(w / (k - 1), 6) for w in wins]  # rounded: float noise must not break ties
        best = max(range(k), key=lambda i: (scores[i], -i))
        worst = min(range(k), key=lambda i: (scores[i], i))
        return best, worst, scores


class RewardOracle(PreferenceOracle):
    """Bradley–Terry over a scalar reward: P(a ≻ b) = σ((r(a) − r(b)) / scale)."""

    def __init__(self, reward: str | Callable, scale: float = 1.0, options: dict | None = None):
        from align.rewards.registry import RewardSet

        super().__init__()
        if not scale > 0:
            raise ConfigError(f"oracle_scale: must be > 0, got {scale}")
        self.rewards = RewardSet([reward], options=options, timeout_s=None)  # the oracle's call is bounded
        self.runs_user_code = self.rewards.bounded[0]
        self.scale = scale
        self.name = f"reward:{self.rewards.names[0]}"

    def score(self, prompts: Texts, completions: Texts, columns: dict[str, Sequence]) -> torch.Tensor:
        lengths = [len(c) if isinstance(c, str) else 0 for c in completions]
        total, _, _ = self.rewards(prompts, completions, list(range(len(completions))), lengths, columns)
        return total

    def _prob(self, prompts, a, b, columns):
        return torch.sigmoid((self.score(prompts, a, columns) - self.score(prompts, b, columns)) / self.scale)

    def required_columns(self) -> tuple[str, ...]:
        from align.rewards.registry import required_columns

        return required_columns(self.rewards.functions[0])


class VerifierOracle(PreferenceOracle):
    """Correct beats incorrect, equal verdicts tie: P(a ≻ b) = ½ + ½(v(a) − v(b)), v ∈ {0, 1} from a 0/1
    reward function (``accuracy`` by default)."""

    def __init__(self, verifier: str | Callable = "accuracy"):
        from align.rewards.registry import is_registered, resolve_reward

        super().__init__()
        self.fn = verifier if callable(verifier) else resolve_reward(verifier)
        self.runs_user_code = not is_registered(verifier)
        self.name = f"verifier:{verifier if isinstance(verifier, str) else getattr(verifier, '__name__', 'fn')}"

    def _verdicts(self, completions, columns) -> torch.Tensor:
        v = torch.as_tensor(self.fn(completions=completions, **columns), dtype=torch.float32)
        if bool(((v != 0) & (v != 1)).any()):
            raise TrainingError(f"oracle {self.name!r}: the verifier must return 0 or 1, got {v.unique().tolist()}")
        return v

    def _prob(self, prompts, a, b, columns):
        return 0.5 + 0.5 * (self._verdicts(a, columns) - self._verdicts(b, columns))

    def required_columns(self) -> tuple[str, ...]:
        from align.rewards.registry import required_columns

        return required_columns(self.fn)


class PairwiseModelOracle(PreferenceOracle):
    """A pairwise preference model: ``AutoModelForSequenceClassification`` over the text
    ``{prompt}\\n\\n[A] {a}\\n\\n[B] {b}`` whose output says how likely A is preferred (one logit: σ(logit); two
    or more: the softmax probability of label 0). Asked in both orders, averaged: P = ½(f(a,b) + 1 − f(b,a))."""

    TEMPLATE = "{prompt}\n\n[A] {a}\n\n[B] {b}"

    def __init__(self, path: str, batch_size: int = 16, device: str | None = None):
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        super().__init__()
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(path)
            kwargs = {}
            if device is None:  # bfloat16 on a GPU (every process holds one copy)
                from align.modeling import frozen_dtype

                dtype = frozen_dtype()
                kwargs = {"dtype": dtype} if dtype is not None else {}
            from align.modeling import load_frozen

            self.model = load_frozen(AutoModelForSequenceClassification, path, **kwargs).eval()
        except Exception as e:  # any load failure is a config problem here
            raise ConfigError(f"oracle: cannot load pairwise preference model {path!r}: {type(e).__name__}: "
                              f"{' '.join(str(e).split())[:200]}") from None
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.model.config.pad_token_id = self.tokenizer.pad_token_id
        if device is None:  # rank 0's weights in every process, on this process's device
            from align.modeling import place_frozen

            place_frozen(self.model)
        else:
            self.model.requires_grad_(False).to(device)
        self.batch_size = batch_size
        self.name = f"pairwise:{path}"

    @torch.no_grad()
    def first_preferred(self, prompts, a, b) -> torch.Tensor:
        """f(a, b): the model's probability that the response in position A is preferred."""
        out = []
        for s in range(0, len(a), self.batch_size):
            texts = [self.TEMPLATE.format(prompt=completion_text(p), a=completion_text(x), b=completion_text(y))
                     for p, x, y in zip(prompts[s:s + self.batch_size], a[s:s + self.batch_size],
                                        b[s:s + self.batch_size], strict=True)]
            enc = self.tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
            logits = self.model(**{k: v.to(self.model.device) for k, v in enc.items()}).logits.float().cpu()
            out.append(torch.sigmoid(logits[:, 0]) if logits.shape[-1] == 1 else logits.softmax(-1)[:, 0])
        return torch.cat(out) if out else torch.zeros(0)

    def _prob(self, prompts, a, b, columns):
        return 0.5 * (self.first_preferred(prompts, a, b) + 1.0 - self.first_preferred(prompts, b, a))


class CyclicOracle(PreferenceOracle):
    """A non-transitive preference for the testbed: a response's class is its stated answer mod 3, and class
    c + 1 beats class c (mod 3): 1 ≻ 0, 2 ≻ 1, 0 ≻ 2, as rock–paper–scissors. A response with no answer loses to
    any with one; equal classes tie at ½. The symmetric game's only Nash equilibrium puts ⅓ on each class."""

    name = "cyclic"
    runs_user_code = False

    @staticmethod
    def classes(completions: Texts) -> list[int | None]:
        return [None if (n := extract_answer(c)) is None else n % 3 for c in completions]

    def _prob(self, prompts, a, b, columns):
        out = []
        for ca, cb in zip(self.classes(a), self.classes(b), strict=True):
            if ca is None or cb is None:
                out.append(0.5 if ca == cb else float(cb is None))
            else:
                out.append({0: 0.5, 1: 1.0, 2: 0.0}[(ca - cb) % 3])
        return torch.tensor(out)


class FunctionOracle(PreferenceOracle):
    """A user function ``fn(prompts, a, b, **columns) -> probabilities``."""

    def __init__(self, fn: Callable, name: str):
        super().__init__()
        self.fn, self.name = fn, name

    def _prob(self, prompts, a, b, columns):
        return self.fn(prompts=prompts, a=a, b=b, **columns)


ORACLE_KINDS = ("verifier:<reward fn>", "reward:<reward spec>", "pairwise:<model path>", "cyclic", "module:function")


def build_oracle(spec: str | PreferenceOracle, scale: float = 1.0, options: dict | None = None,
                 timeout_s: float | None = REWARD_TIMEOUT_S) -> PreferenceOracle:
    """The oracle a config's ``oracle:`` names (one of :data:`ORACLE_KINDS`), its calls bounded by ``timeout_s``
    (``reward_timeout_s``); a one-line ConfigError otherwise. An oracle object is returned as it is."""
    if isinstance(spec, PreferenceOracle):
        return spec
    oracle = _build(spec, scale, options)
    oracle.timeout_s = timeout_s
    return oracle


def _build(spec: str, scale: float, options: dict | None) -> PreferenceOracle:
    if not isinstance(spec, str) or not spec.strip():
        raise ConfigError(f"oracle: must be one of {', '.join(ORACLE_KINDS)}, got {spec!r}")
    spec = spec.strip()
    kind, _, rest = spec.partition(":")
    if spec == "cyclic":
        return CyclicOracle()
    if kind == "verifier":
        return VerifierOracle(rest or "accuracy")
    if kind == "reward":
        if not rest:
            raise ConfigError("oracle: 'reward:' names no reward function (e.g. reward:accuracy, reward:model:<path>)")
        return RewardOracle(rest, scale, options)
    if kind == "pairwise":
        if not rest:
            raise ConfigError("oracle: 'pairwise:' names no model path")
        return PairwiseModelOracle(rest)
    if rest:
        try:
            fn = getattr(importlib.import_module(kind), rest)
        except (ImportError, AttributeError) as e:
            raise ConfigError(f"oracle: cannot load {spec!r}: {type(e).__name__}: {e}") from None
        return FunctionOracle(fn, spec)
    raise ConfigError(f"oracle: unknown oracle {spec!r} (one of {', '.join(ORACLE_KINDS)})")


def check_columns(oracle: PreferenceOracle, column_names: Sequence[str], where: str = "train dataset") -> None:
    """A one-line DataError when the dataset lacks a column the oracle reads (checked before any generation)."""
    fn = getattr(oracle, "required_columns", None)
    for column in fn() if fn else ():
        if column not in column_names:
            raise DataError(f"{where}: column {column!r} needed by oracle {oracle.name!r} is missing")


def win_rate(probs: torch.Tensor) -> float:
    """Mean preference probability, the win rate with ties counted as half."""
    return float(probs.mean()) if probs.numel() else math.nan
