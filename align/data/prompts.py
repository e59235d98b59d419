"""Prompt datasets for the RL loop: every row's prompt tokenised once (chat template for conversational
prompts), checked against the max length, and given a stable ``uid`` (its row index)."""

from __future__ import annotations

from align.data.validate import check_rows, check_values, source_named
from align.errors import DataError


def format_prompts(ds, column: str = "prompt", system_prompt: str | None = None, suffix: str = ""):
    """``ds`` with a conversational ``prompt`` built from ``column`` (e.g. NuminaMath's ``problem``): an optional
    system message, then the user message ``row[column] + suffix``. A dataset whose ``prompt`` column is used
    as is (``column="prompt"``, no system prompt, no suffix) is returned unchanged."""
    if column == "prompt" and not system_prompt and not suffix:
        return ds
    if column not in ds.column_names:
        raise DataError(f"prompt_column: {column!r} is not a column (has: {', '.join(ds.column_names)})")

    def build(row):
        text = row[column] if isinstance(row[column], str) else row[column][-1]["content"]
        messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
        return {"prompt": [*messages, {"role": "user", "content": text + suffix}]}

    return ds.map(build, remove_columns=["prompt"] if "prompt" in ds.column_names and column != "prompt" else None)


def _prompt_ids(ds, tokenizer, max_prompt_length: int, split: str) -> list[list[int]]:
    from align.evaluation import prompt_texts
    from align.modeling import require_chat_template

    if "prompt" not in ds.column_names:
        raise DataError(f"{split} dataset: no 'prompt' column (has: {', '.join(ds.column_names)})")
    if len(ds) == 0:
        raise DataError(f"{split} dataset: no rows")
    ids = []
    for i, prompt in enumerate(ds["prompt"]):
        if not prompt:
            raise DataError(f"{split} dataset row {i}: empty prompt")
        if not isinstance(prompt, str):
            require_chat_template(tokenizer, f"the {split} dataset")
        try:
            (text,) = prompt_texts(tokenizer, [prompt])
        except Exception as err:  # noqa: BLE001 -- a malformed message list: say which row
            raise DataError(f"{split} dataset row {i}: prompt cannot be formatted ({err})") from None
        tokens = tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(tokens) > max_prompt_length:
            raise DataError(f"{split} dataset row {i}: prompt has {len(tokens)} tokens, more than max_prompt_length "
                            f"{max_prompt_length}")
        ids.append(tokens)
    return ids


def tokenize_prompts(ds, tokenizer, max_prompt_length: int, split: str = "train"):
    """``ds`` with ``prompt_ids`` and ``uid`` columns added; a one-line DataError naming the row for a
    missing, empty or too long prompt."""
    with source_named(ds):
        ids = _prompt_ids(ds, tokenizer, max_prompt_length, split)
    ds = ds.add_column("prompt_ids", ids)
    return ds.add_column("uid", list(range(len(ds))))


def needed_columns(check_columns, names, where: str) -> list[tuple[str, str]]:
    """The columns ``check_columns(names, where)`` (a reward set's or an oracle's check) cannot do without, each with
    who reads it (``reward function 'accuracy'``): those whose absence it refuses."""
    import re

    needed = []
    for column in names:
        try:
            check_columns([n for n in names if n != column], where)
        except DataError as err:
            reader = re.search(r"needed by (.+) is missing", str(err))
            needed.append((column, reader.group(1) if reader else "training"))
    return needed


def load_prompt_data(config, check_columns=None, transform=None):
    """What the generating recipes (grpo, raft, online_dpo, xpo, egpo, iterative_dpo) load before any model: the
    train and eval prompt datasets, formatted by the config's :class:`align.args.PromptArguments`
    (``prompt_column``, ``system_prompt``, ``prompt_suffix``), passed through ``transform`` (a
    ``Dataset -> Dataset``, e.g. the iterative recipe's chat wrapping), checked by
    ``check_columns(column_names, where)`` (the reward functions' or the oracle's columns) and tokenised, plus
    the tokenizer. Every row is checked before the tokenizer loads: the prompt cell (:func:`check_rows`), and a value
    in every column the rewards or the oracle need (no null that would fail only when the row is sampled).
    Returns ``(tokenizer, train, evaluation)``; ``evaluation`` is None without an eval split."""
    from align.data.loading import load_train_eval
    from align.modeling import load_tokenizer

    train, evaluation = load_train_eval(config)
    fmt = (config.prompt_column, config.system_prompt, config.prompt_suffix)
    splits = {"train": train, "eval": evaluation}
    for split, ds in splits.items():
        if ds is None:
            continue
        with source_named(ds):
            column = config.prompt_column
            if column not in ds.column_names:
                raise DataError(f"prompt_column: {column!r} is not a column of the {split} dataset "
                                f"(has: {', '.join(ds.column_names)})")
            check_rows(ds, [column], split, turns={column: "prompt"})
            ds = format_prompts(ds, *fmt)
            ds = transform(ds) if transform is not None else ds
            if check_columns is not None:
                check_columns(ds.column_names, f"{split} dataset")
                for name, reader in needed_columns(check_columns, ds.column_names, f"{split} dataset"):
                    check_values(ds, name, split, reader)
        splits[split] = ds
    tokenizer = load_tokenizer(config.model_name_or_path, config.trust_remote_code)
    for split, ds in splits.items():
        if ds is not None:
            splits[split] = tokenize_prompts(ds, tokenizer, config.max_prompt_length, split)
    return tokenizer, splits["train"], splits["eval"]
