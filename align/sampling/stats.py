"""Per-prompt statistics across training steps (acceptance rate, gradient scale, sample counts, ...).

The RL trainer records estimates here (GVM reads p_i and G_i back for its allocation, docs/methods.md §13.3-13.4, and
uses :meth:`PromptStats.is_stale` to decide which prompts to re-estimate); monitors can read the same store.
"""

from __future__ import annotations

import operator
from collections import deque

__all__ = ["PromptStats"]

Uid = int | str
_SCALARS = (bool, int, float, str, type(None))


def _check_uid(uid) -> Uid:
    if isinstance(uid, str):
        return uid
    if isinstance(uid, bool):
        raise TypeError(f"uid: must be an int or a str, got {uid!r}")
    try:
        return operator.index(uid)  # int, numpy integer, 0-d integer tensor
    except TypeError:
        raise TypeError(f"uid: must be an int or a str, got {type(uid).__name__}") from None


def _scalar(key: str, value):
    if not isinstance(value, _SCALARS) and hasattr(value, "item"):
        value = value.item()  # numpy / torch scalars
    if not isinstance(value, _SCALARS):
        raise TypeError(f"{key}: values must be JSON scalars (number, str, bool, None), got {type(value).__name__}")
    return value


class PromptStats:
    """A store of per-prompt records keyed by prompt uid (int or str).

    Each record is a dict ``{"step": step, **values}``. :meth:`update` at the same step as the prompt's latest
    record merges into it (so p_i and G_i can be written separately by one estimation pass); at another step it
    starts a new record. The last ``max_history`` (default 20) records per prompt are kept.
    """

    def __init__(self, max_history: int = 20):
        if isinstance(max_history, bool) or not isinstance(max_history, int) or max_history < 1:
            raise ValueError(f"max_history: must be a positive integer, got {max_history!r}")
        self.max_history = max_history
        self._records: dict[Uid, deque[dict]] = {}

    def __len__(self) -> int:
        return len(self._records)

    def __contains__(self, uid) -> bool:
        try:
            return _check_uid(uid) in self._records
        except TypeError:
            return False

    def update(self, uid: Uid, step: int, **values) -> None:
        """Record ``values`` (e.g. ``accept_rate=``, ``grad_norm=``, ``n_samples=``) for ``uid`` at ``step``."""
        uid = _check_uid(uid)
        if isinstance(step, bool):
            raise ValueError(f"step: must be an integer, got {step!r}")
        step = operator.index(step)
        clean = {k: _scalar(k, v) for k, v in values.items()}
        history = self._records.get(uid)
        if history is None:
            history = self._records[uid] = deque(maxlen=self.max_history)
        if history and history[-1]["step"] == step:
            history[-1].update(clean)
        else:
            history.append({"step": step, **clean})

    def get(self, uid: Uid) -> dict | None:
        """A copy of the latest record of ``uid`` (with its ``"step"``), or ``None`` if it has none."""
        history = self._records.get(_check_uid(uid))
        return dict(history[-1]) if history else None

    def is_stale(self, uid: Uid, step: int, interval: int) -> bool:
        """True if ``uid`` has no record, or its latest was made at a step ``<= step - interval``."""
        if isinstance(interval, bool) or operator.index(interval) < 0:
            raise ValueError(f"interval: must be a non-negative integer, got {interval!r}")
        record = self.get(uid)
        return record is None or record["step"] <= step - interval

    def state_dict(self) -> dict:
        """A JSON-serialisable snapshot. Prompts are a list of ``{"uid", "records"}``, so int uids stay ints."""
        return {
            "version": 1,
            "max_history": self.max_history,
            "prompts": [{"uid": uid, "records": [dict(r) for r in h]} for uid, h in self._records.items()],
        }

    def load_state_dict(self, state: dict) -> None:
        """Replace the contents with a :meth:`state_dict` snapshot."""
        if not isinstance(state, dict) or "prompts" not in state:
            raise ValueError("state: not a PromptStats state_dict (no 'prompts')")
        self.max_history = int(state.get("max_history", self.max_history))
        records: dict[Uid, deque[dict]] = {}
        for entry in state["prompts"]:
            uid = _check_uid(entry["uid"])
            records[uid] = deque((dict(r) for r in entry["records"]), maxlen=self.max_history)
        self._records = records
