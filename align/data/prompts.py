"""Prompt datasets for the RL loop: every row's prompt tokenised once (chat template for conversational
prompts), checked against the max length, and given a stable ``uid`` (its row index)."""

from __future__ import annotations

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


def tokenize_prompts(ds, tokenizer, max_prompt_length: int, split: str = "train"):
    """``ds`` with ``prompt_ids`` and ``uid`` columns added; a one-line DataError naming the row for a
    missing, empty or too long prompt."""
    from align.evaluation import prompt_texts

    if "prompt" not in ds.column_names:
        raise DataError(f"{split} dataset: no 'prompt' column (has: {', '.join(ds.column_names)})")
    if len(ds) == 0:
        raise DataError(f"{split} dataset: no rows")
    ids = []
    for i, prompt in enumerate(ds["prompt"]):
        if not prompt:
            raise DataError(f"{split} dataset row {i}: empty prompt")
        try:
            (text,) = prompt_texts(tokenizer, [prompt])
        except Exception as err:  # noqa: BLE001 -- a malformed message list: say which row
            raise DataError(f"{split} dataset row {i}: prompt cannot be formatted ({err})") from None
        tokens = tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(tokens) > max_prompt_length:
            raise DataError(f"{split} dataset row {i}: prompt has {len(tokens)} tokens, more than max_prompt_length "
                            f"{max_prompt_length}")
        ids.append(tokens)
    ds = ds.add_column("prompt_ids", ids)
    return ds.add_column("uid", list(range(len(ds))))


def load_prompt_data(config, check_columns=None, transform=None):
    """What the generating recipes (grpo, raft, online_dpo, xpo, egpo, iterative_dpo) load before any model: the
    train and eval prompt datasets, formatted by the config's :class:`align.args.PromptArguments`
    (``prompt_column``, ``system_prompt``, ``prompt_suffix``), passed through ``transform`` (a
    ``Dataset -> Dataset``, e.g. the iterative recipe's chat wrapping), checked by
    ``check_columns(column_names, where)`` (the reward functions' or the oracle's columns) and tokenised, plus
    the tokenizer. Returns ``(tokenizer, train, evaluation)``; ``evaluation`` is None without an eval split."""
    from align.data.loading import load_train_eval
    from align.modeling import load_tokenizer

    train, evaluation = load_train_eval(config)
    fmt = (config.prompt_column, config.system_prompt, config.prompt_suffix)
    splits = {"train": train, "eval": evaluation}
    for split, ds in splits.items():
        if ds is not None:
            ds = format_prompts(ds, *fmt)
            splits[split] = transform(ds) if transform is not None else ds
            if check_columns is not None:
                check_columns(splits[split].column_names, f"{split} dataset")
    tokenizer = load_tokenizer(config.model_name_or_path, config.trust_remote_code)
    for split, ds in splits.items():
        if ds is not None:
            splits[split] = tokenize_prompts(ds, tokenizer, config.max_prompt_length, split)
    return tokenizer, splits["train"], splits["eval"]
