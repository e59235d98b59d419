"""Preference data: checking TRL-format rows, tokenising them, and collating [chosen; rejected] batches.

Rows are TRL's standard (``prompt``/``chosen``/``rejected`` strings) or conversational (message lists;
the chat template is applied) format, or implicit-prompt conversations (``chosen``/``rejected`` only, e.g.
hh-rlhf) whose shared leading turns become the prompt. Each tokenised row keeps ``row_id`` (its index in the
dataset) so an error late in training can still name the rows of the batch.
"""

from __future__ import annotations

import torch

from align.data.validate import PROMPT_ENDS, check_cell, check_rows, source_named
from align.errors import DataError

COLUMNS = ("prompt", "chosen", "rejected")


def check_preference_rows(ds, split: str = "train") -> str:
    """All rows well-formed, chosen != rejected; returns the format (standard / conversational)."""
    with source_named(ds):
        if not all(c in ds.column_names for c in COLUMNS):
            raise DataError(
                f"{split} dataset: preference data needs columns prompt, chosen, rejected in TRL's standard or "
                f"conversational format, or chosen and rejected conversations that share their prompt turns "
                f"(has: {', '.join(ds.column_names)})"
            )
        fmt = check_rows(ds, COLUMNS, split)
        for i, (c, r) in enumerate(zip(ds["chosen"], ds["rejected"], strict=True)):
            if c == r:
                raise DataError(f"{split} row {i}: chosen and rejected are identical")
    return fmt


def split_prompt(chosen: list[dict], rejected: list[dict]) -> int:
    """How many leading messages of two conversations form their shared prompt: the longest common prefix of
    messages (TRL's ``extract_prompt``), cut back to end with a user or tool turn, so that both responses start
    with the assistant's turn. 0 when they share no prompt."""
    n = 0
    while n < min(len(chosen), len(rejected)) and chosen[n] == rejected[n]:
        n += 1
    while n and chosen[n - 1].get("role") not in PROMPT_ENDS:
        n -= 1
    return n


def with_prompt(ds, split: str = "train"):
    """``ds`` with a ``prompt`` column: as it is when it has one; else (implicit-prompt data such as hh-rlhf's
    ``chosen``/``rejected`` whole conversations) the shared leading turns of each row become its prompt and the
    rest its chosen and rejected responses (:func:`split_prompt`). Strings are not split: where a prompt ends
    inside two texts is not knowable (a common prefix of "Answer: 41" and "Answer: 42" is "Answer: 4")."""
    names = ds.column_names
    if "prompt" in names or not {"chosen", "rejected"} <= set(names) or len(ds) == 0:
        return ds
    fix = "add a 'prompt' column (TRL's format)"
    with source_named(ds):
        for i, (c, r) in enumerate(zip(ds["chosen"], ds["rejected"], strict=True)):
            for key, value in (("chosen", c), ("rejected", r)):
                if isinstance(value, str):
                    raise DataError(f"{split} row {i}, column {key!r}: a string, and there is no 'prompt' column; "
                                    f"{fix}, or give chosen and rejected as whole conversations (message lists)")
                check_cell(value, f"{split} row {i}, column {key!r}")
            if c == r:
                raise DataError(f"{split} row {i}: chosen and rejected are identical")
            if split_prompt(c, r) == 0:
                raise DataError(f"{split} row {i}: chosen and rejected share no prompt (no common leading turns "
                                f"ending with a user message); {fix}, or start both with the same prompt turns")

    def divide(row):
        n = split_prompt(row["chosen"], row["rejected"])
        return {"prompt": row["chosen"][:n], "chosen": row["chosen"][n:], "rejected": row["rejected"][n:]}

    return ds.map(divide)


def _texts(tokenizer, row, fmt: str, where: str) -> tuple[str, str, str]:
    """Prompt text and the two completion texts, with the chat template applied when conversational."""
    if fmt == "standard":
        eos = tokenizer.eos_token or ""
        chosen, rejected = row["chosen"], row["rejected"]
        return (row["prompt"], chosen if chosen.endswith(eos) else chosen + eos,
                rejected if rejected.endswith(eos) else rejected + eos)
    prompt = tokenizer.apply_chat_template(row["prompt"], tokenize=False, add_generation_prompt=True)
    out = [prompt]
    for key in ("chosen", "rejected"):
        full = tokenizer.apply_chat_template(row["prompt"] + row[key], tokenize=False)
        if not full.startswith(prompt):
            raise DataError(
                f"{where}: chat template of {tokenizer.name_or_path!r} does not extend the prompt with the {key} turn"
            )
        out.append(full[len(prompt):])
    return tuple(out)


def tokenize_preferences(ds, tokenizer, max_length: int, split: str = "train"):
    """Rows -> ``row_id, prompt_ids, chosen_ids, rejected_ids``; one-line DataError on any bad row.

    Implicit-prompt rows get their prompt first (:func:`with_prompt`); every row is checked
    (:func:`check_preference_rows`). A prompt that leaves no room for a
    completion within ``max_length`` is an error; completions are cut to fit.
    """
    ds = with_prompt(ds, split)
    fmt = check_preference_rows(ds, split)
    if fmt == "conversational":
        from align.modeling import require_chat_template

        require_chat_template(tokenizer, f"the {split} dataset")
    rows = {"row_id": [], "prompt_ids": [], "chosen_ids": [], "rejected_ids": []}
    with source_named(ds):
        for i, row in enumerate(ds.select_columns(list(COLUMNS))):
            prompt, chosen, rejected = _texts(tokenizer, row, fmt, f"{split} row {i}")
            p = tokenizer(prompt, add_special_tokens=fmt == "standard")["input_ids"]
            if len(p) >= max_length:
                raise DataError(f"{split} row {i}: prompt has {len(p)} tokens, not below max_length {max_length}")
            room = max_length - len(p)
            c = tokenizer(chosen, add_special_tokens=False)["input_ids"][:room]
            r = tokenizer(rejected, add_special_tokens=False)["input_ids"][:room]
            if c == r:
                raise DataError(f"{split} row {i}: chosen and rejected are identical after truncation to max_length")
            rows["row_id"].append(i)
            rows["prompt_ids"].append(p)
            rows["chosen_ids"].append(c)
            rows["rejected_ids"].append(r)
    from datasets import Dataset

    return Dataset.from_dict(rows)


class PreferenceCollator:
    """Batches of B rows -> 2B right-padded sequences, chosen first: ``[chosen_0..B-1; rejected_0..B-1]``.

    ``completion_mask`` marks the completion tokens, the only ones scored. Precomputed reference
    log-probs, when present in the rows, pass through as ``ref_chosen_logps``/``ref_rejected_logps``.
    """

    def __init__(self, pad_token_id: int):
        self.pad = pad_token_id

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        seqs, masks = [], []
        for key in ("chosen_ids", "rejected_ids"):
            for f in features:
                seqs.append(list(f["prompt_ids"]) + list(f[key]))
                masks.append([0] * len(f["prompt_ids"]) + [1] * len(f[key]))
        width = max(len(s) for s in seqs)
        n = len(seqs)
        input_ids = torch.full((n, width), self.pad, dtype=torch.long)
        attention = torch.zeros((n, width), dtype=torch.long)
        completion = torch.zeros((n, width), dtype=torch.long)
        for i, (s, m) in enumerate(zip(seqs, masks, strict=True)):
            input_ids[i, : len(s)] = torch.tensor(s)
            attention[i, : len(s)] = 1
            completion[i, : len(m)] = torch.tensor(m)
        batch = {
            "input_ids": input_ids,
            "attention_mask": attention,
            "completion_mask": completion,
            "row_id": torch.tensor([f["row_id"] for f in features]),
        }
        if "ref_chosen_logps" in features[0]:
            batch["ref_chosen_logps"] = torch.tensor([f["ref_chosen_logps"] for f in features])
            batch["ref_rejected_logps"] = torch.tensor([f["ref_rejected_logps"] for f in features])
        return batch
