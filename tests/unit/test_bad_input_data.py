"""Bad data, one case per row of the data tables in docs/errors.md: each run through a recipe's entry point ends
with exit status 2 and exactly one stderr line ``error: ...`` naming the file (and row, column or line where there
is one), before any model is loaded. Plus implicit-prompt preference data (hh-rlhf style) and online DPO under an
oracle that never prefers."""

from __future__ import annotations

import json
import math

import pytest

TRAIN = "<train>"  # stands for the path of the case's train file in the expected message
EVAL = "<eval>"
CONFIGS = {"iterative_dpo": "testbed-ilr-dpo"}


def u(text):
    return {"role": "user", "content": text}


def a(text):
    return {"role": "assistant", "content": text}


def jl(*rows) -> str:
    return "".join(json.dumps(r) + "\n" for r in rows)


class Parquet:
    """A parquet file's rows (written with pyarrow); ``schema`` for a file with no rows."""

    def __init__(self, rows, schema=None):
        self.rows, self.schema = rows, schema


PREF = {"prompt": "What is 1+1?", "chosen": " Answer: 2", "rejected": " Answer: 3"}
PREF_C = {"prompt": [u("What is 1+1?")], "chosen": [a("Answer: 2")], "rejected": [a("Answer: 3")]}
SFT = {"prompt": "What is 1+1?", "completion": " Answer: 2"}
RL = {"prompt": "What is 1+1?", "answer": 2}
WRITTEN = "\"[{'role': 'user', 'content': 'What is 1+1?'}]\""  # a message list as a CSV cell holds it (Python repr)


def pc(**kw):
    return {**PREF_C, **kw}


# (id, recipe, {file name: content}, overrides, substrings of the one error line). The first file is dataset_name;
# a file named eval.* is eval_dataset_name (with dataset_test_split=test).
CASES = [
    # --- files that cannot be read ---
    ("empty-jsonl", "dpo", {"train.jsonl": ""}, [], [f"dataset_name {TRAIN}: the file is empty"]),
    ("empty-json", "grpo", {"train.json": ""}, [], [f"dataset_name {TRAIN}: the file is empty"]),
    ("empty-csv", "sft", {"train.csv": ""}, [], [f"dataset_name {TRAIN}: the file is empty"]),
    ("empty-parquet", "dpo", {"train.parquet": b""}, [], [f"dataset_name {TRAIN}: the file is empty"]),
    ("csv-header-only", "grpo", {"train.csv": "prompt,answer\n"}, [], [f"dataset_name {TRAIN}: has no rows"]),
    ("json-empty-array", "sft", {"train.json": "[]"}, [], [f"dataset_name {TRAIN}: has no rows"]),
    ("jsonl-blank-lines", "dpo", {"train.jsonl": "\n\n  \n"}, [], [f"dataset_name {TRAIN}: has no rows"]),
    ("parquet-no-rows", "grpo", {"train.parquet": Parquet([], {"prompt": "string", "answer": "int64"})}, [],
     [f"dataset_name {TRAIN}: has no rows"]),
    ("jsonl-not-utf8", "dpo", {"train.jsonl": jl(PREF).encode() + b'{"prompt": "caf\xe9?", "chosen": "a"}\n'}, [],
     [f"dataset_name {TRAIN} line 2: not UTF-8 text (byte 0xe9)"]),
    ("csv-latin1", "grpo", {"train.csv": "prompt,answer\nWhat is 1+1?,2\ncafé,3\n".encode("latin-1")}, [],
     [f"dataset_name {TRAIN} line 3: not UTF-8 text (byte 0xe9)"]),
    ("json-not-utf8", "sft", {"train.json": b'[{"prompt": "\xff", "completion": "b"}]'}, [],
     [f"dataset_name {TRAIN} line 1: not UTF-8 text (byte 0xff)"]),
    ("jsonl-invalid-line", "dpo", {"train.jsonl": jl(PREF, PREF) + '{"prompt": "q", "chosen": \n' + jl(PREF)}, [],
     [f"dataset_name {TRAIN} line 3: invalid JSON (Expecting value at column"]),
    ("jsonl-trailing-data", "grpo", {"train.jsonl": jl(RL) + json.dumps(RL) + " 7\n"}, [],
     [f"dataset_name {TRAIN} line 2: invalid JSON (Extra data at column 41)"]),
    ("json-truncated-array", "sft", {"train.json": '[\n{"prompt": "a", "completion": "b"},\n{"prompt": '}, [],
     [f"dataset_name {TRAIN} line 3: invalid JSON (Expecting value at column 12)"]),
    ("jsonl-duplicate-key", "dpo", {"train.jsonl": '{"prompt": "a", "prompt": "b", "chosen": "c", "rejected": "d"}\n'},
     [], [f"dataset_name {TRAIN} line 1: key 'prompt' appears twice in one object"]),
    ("json-scalar", "grpo", {"train.json": "3\n"}, [],
     [f"dataset_name {TRAIN} line 1: expected one JSON object ({{...}}) per line, got int"]),
    ("csv-ragged-row", "grpo", {"train.csv": "prompt,answer\nWhat is 1+1?,2\nWhat is 2+2?,4,extra\n"}, [],
     [f"dataset_name {TRAIN} line 3: 3 fields, but the header has 2"]),
    ("csv-duplicate-column", "grpo", {"train.csv": "prompt,prompt,answer\nWhat is 1+1?,What is 2+2?,2\n"}, [],
     [f"dataset_name {TRAIN} line 1: column 'prompt' appears twice in the header"]),
    ("parquet-garbage", "dpo", {"train.parquet": b"PAR1 this is not parquet"}, [],
     [f"dataset_name {TRAIN}: not a readable parquet file (Parquet magic bytes not found"]),
    ("eval-file-broken", "dpo", {"train.jsonl": jl(PREF), "eval.jsonl": jl(PREF) + "{oops\n"}, [],
     [f"eval_dataset_name {EVAL} line 2: invalid JSON"]),
    ("eval-file-empty", "grpo", {"train.jsonl": jl(RL), "eval.csv": ""}, [],
     [f"eval_dataset_name {EVAL}: the file is empty"]),
    ("eval-rows-bad", "sft", {"train.jsonl": jl(SFT), "eval.jsonl": jl(SFT, {**SFT, "completion": " "})}, [],
     ["eval row 1, column 'completion': is empty", f"(in {EVAL})"]),
    ("test-split-of-a-file", "dpo", {"train.jsonl": jl(PREF)}, ["dataset_test_split=test"],
     [f"dataset_name {TRAIN} is a single file, so it has no split 'test' (set eval_dataset_name"]),
    ("max-train-samples-zero", "dpo", {"train.jsonl": jl(PREF)}, ["max_train_samples=0"],
     ["max_train_samples: must be >= 1, got 0"]),
    # --- preference rows (dpo) ---
    ("pref-missing-column", "dpo", {"train.jsonl": jl({"prompt": "q", "chosen": "a"})}, [],
     ["train dataset: preference data needs columns prompt, chosen, rejected", "(has: prompt, chosen)",
      f"(in {TRAIN})"]),
    ("pref-null-chosen", "dpo", {"train.jsonl": jl(PREF, {**PREF, "chosen": None})}, [],
     ["train row 1, column 'chosen': expected a string or a list of messages, got NoneType", f"(in {TRAIN})"]),
    ("pref-number-chosen", "dpo", {"train.jsonl": jl(PREF, {**PREF, "chosen": 3})}, [],
     ["train row 1, column 'chosen': expected a string or a list of messages, got int"]),
    ("pref-empty-prompt", "dpo", {"train.jsonl": jl(PREF, PREF, {**PREF, "prompt": "  "})}, [],
     ["train row 2, column 'prompt': is empty", f"(in {TRAIN})"]),
    ("pref-identical", "dpo", {"train.jsonl": jl(PREF, {**PREF, "rejected": PREF["chosen"]})}, [],
     ["train row 1: chosen and rejected are identical", f"(in {TRAIN})"]),
    ("pref-role-in-prompt", "dpo", {"train.jsonl": jl(PREF_C, pc(prompt=[{"role": "usr", "content": "q"}]))}, [],
     ["train row 1, column 'prompt': message 0 has role 'usr', not one of system, developer, user", f"(in {TRAIN})"]),
    ("pref-role-in-chosen", "dpo", {"train.jsonl": jl(pc(chosen=[{"role": "bot", "content": "Answer: 2"}]))}, [],
     ["train row 0, column 'chosen': message 0 has role 'bot'"]),
    ("pref-chosen-starts-with-user", "dpo", {"train.jsonl": jl(pc(chosen=[u("hm"), a("Answer: 2")]))}, [],
     ["train row 0, column 'chosen': message 0 has role 'user', but a response holds only assistant and tool turns"]),
    ("pref-prompt-ends-with-assistant", "dpo", {"train.jsonl": jl(pc(prompt=[u("What is 1+1?"), a("Answer:")]))},
     [], ["train row 0, column 'prompt': the prompt ends with a 'assistant' message"]),
    ("pref-message-without-content", "dpo", {"train.jsonl": jl(pc(prompt=[{"role": "user"}]))}, [],
     ["train row 0, column 'prompt': message 0 needs 'role' and 'content' keys (has: role)"]),
    ("pref-message-content-null", "dpo", {"train.jsonl": jl(pc(rejected=[{"role": "assistant", "content": None}]))},
     [], ["train row 0, column 'rejected': message 0 (assistant) is empty"]),
    ("pref-message-content-parts", "dpo",
     {"train.jsonl": jl(pc(prompt=[{"role": "user", "content": [{"type": "text", "text": "q"}]}]))}, [],
     ["train row 0, column 'prompt': message 0 (user) content is a list, not a string"]),
    ("pref-messages-are-strings", "dpo", {"train.jsonl": jl(pc(prompt=["What is 1+1?"]))}, [],
     ["train row 0, column 'prompt': expected a string or a list of messages, got list"]),
    ("pref-mixed-columns", "dpo", {"train.jsonl": jl(pc(prompt="What is 1+1?"))}, [],
     ["train row 0, column 'chosen': is conversational but earlier cells are standard"]),
    ("pref-mixed-rows", "dpo", {"train.jsonl": jl(PREF, PREF_C)}, [],
     ["train row 1, column 'prompt': is conversational but earlier cells are standard"]),
    ("pref-csv-message-lists", "dpo", {"train.csv": f"prompt,chosen,rejected\n{WRITTEN},Answer: 2,Answer: 3\n"}, [],
     ["train row 0, column 'prompt': holds a message list written as text", f"(in {TRAIN})"]),
    ("pref-json-string-messages", "dpo", {"train.jsonl": jl({**PREF, "chosen": json.dumps([a("Answer: 2")])})}, [],
     ["train row 0, column 'chosen': holds a message list written as text"]),
    ("pref-implicit-strings", "dpo",
     {"train.jsonl": jl({"chosen": "Human: 1+1? Assistant: 2", "rejected": "Human: 1+1? Assistant: 3"})}, [],
     ["train row 0, column 'chosen': a string, and there is no 'prompt' column; add a 'prompt' column"]),
    ("pref-implicit-no-shared-prompt", "dpo",
     {"train.jsonl": jl({"chosen": [u("1+1?"), a("2")], "rejected": [u("1+1?"), a("3")]},
                        {"chosen": [u("1+1?"), a("2")], "rejected": [u("2+2?"), a("4")]})}, [],
     ["train row 1: chosen and rejected share no prompt", "add a 'prompt' column", f"(in {TRAIN})"]),
    ("pref-implicit-identical", "dpo",
     {"train.jsonl": jl({"chosen": [u("1+1?"), a("2")], "rejected": [u("1+1?"), a("2")]})}, [],
     ["train row 0: chosen and rejected are identical"]),
    ("pref-prompt-too-long", "dpo", {"train.jsonl": jl(PREF, {**PREF, "prompt": "What is 1+1? " * 20})},
     ["max_length=16"], ["train row 1: prompt has", "tokens, not below max_length 16", f"(in {TRAIN})"]),
    ("pref-parquet-null-rejected", "dpo", {"train.parquet": Parquet([PREF, {**PREF, "rejected": None}])}, [],
     ["train row 1, column 'rejected': expected a string or a list of messages, got NoneType", f"(in {TRAIN})"]),
    # --- SFT rows ---
    ("sft-no-layout", "sft", {"train.jsonl": jl({"question": "q", "answer": "a"})}, [],
     ["train dataset: needs columns prompt+completion or messages or text (has: question, answer)", f"(in {TRAIN})"]),
    ("sft-empty-completion", "sft", {"train.jsonl": jl(SFT, {**SFT, "completion": ""})}, [],
     ["train row 1, column 'completion': is empty"]),
    ("sft-messages-role", "sft", {"train.jsonl": jl({"messages": [u("1+1?"), {"role": "gpt", "content": "2"}]})},
     [], ["train row 0, column 'messages': message 1 has role 'gpt'", f"(in {TRAIN})"]),
    ("sft-sharegpt-keys", "sft", {"train.jsonl": jl({"messages": [{"from": "human", "value": "1+1?"}]})}, [],
     ["train row 0, column 'messages': message 0 needs 'role' and 'content' keys (has: from, value)"]),
    ("sft-messages-empty-list", "sft", {"train.jsonl": jl({"messages": [u("1+1?"), a("2")]}, {"messages": []})}, [],
     ["train row 1, column 'messages': has no messages"]),
    ("sft-completion-starts-with-user", "sft",
     {"train.jsonl": jl({"prompt": [u("1+1?")], "completion": [u("and 2+2?")]})}, [],
     ["train row 0, column 'completion': message 0 has role 'user', but a response holds only"]),
    ("sft-csv-written-messages", "sft", {"train.csv": f"messages\n{WRITTEN}\n"}, [],
     ["train row 0, column 'messages': holds a message list written as text", f"(in {TRAIN})"]),
    ("sft-parquet-null-completion", "sft", {"train.parquet": Parquet([SFT, {**SFT, "completion": None}])}, [],
     ["train row 1, column 'completion': expected a string or a list of messages, got NoneType", f"(in {TRAIN})"]),
    # --- prompt rows of the generating recipes ---
    ("rl-no-prompt-column", "grpo", {"train.jsonl": jl({"problem": "1+1?", "answer": 2})}, [],
     ["prompt_column: 'prompt' is not a column of the train dataset (has: problem, answer)", f"(in {TRAIN})"]),
    ("rl-prompt-column-missing", "grpo", {"train.jsonl": jl(RL)}, ["prompt_column=problem"],
     ["prompt_column: 'problem' is not a column of the train dataset (has: prompt, answer)"]),
    ("rl-answer-null", "grpo", {"train.jsonl": jl(RL, RL, {**RL, "answer": None})}, [],
     ["train row 2, column 'answer': is null, and reward function 'accuracy' reads it", f"(in {TRAIN})"]),
    ("rl-answer-empty-string", "grpo", {"train.jsonl": jl({**RL, "answer": "2"}, {**RL, "answer": " "})}, [],
     ["train row 1, column 'answer': is empty, and reward function 'accuracy' reads it"]),
    ("rl-csv-answer-missing-cell", "raft", {"train.csv": "prompt,answer\nWhat is 1+1?,2\nWhat is 2+2?,\n"}, [],
     ["train row 1, column 'answer': is null, and reward function 'accuracy' reads it", f"(in {TRAIN})"]),
    ("rl-parquet-answer-nan", "grpo", {"train.parquet": Parquet([RL, {**RL, "answer": math.nan}])}, [],
     ["train row 1, column 'answer': is NaN, and reward function 'accuracy' reads it"]),
    ("rl-solution-null", "grpo", {"train.jsonl": jl({"prompt": "1+1?", "solution": None})},
     ["reward_funcs=[math_verify]"], ["train row 0, column 'solution': is null, and reward function 'math_verify'"]),
    ("rl-answer-column-missing", "grpo", {"train.jsonl": jl({"prompt": "What is 1+1?"})}, [],
     ["train dataset: column 'answer' needed by reward function 'accuracy' is missing", f"(in {TRAIN})"]),
    ("rl-empty-prompt", "raft", {"train.jsonl": jl({**RL, "prompt": ""})}, [],
     ["train row 0, column 'prompt': is empty", f"(in {TRAIN})"]),
    ("rl-csv-message-list-prompt", "grpo", {"train.csv": f"prompt,answer\n{WRITTEN},2\n"}, [],
     ["train row 0, column 'prompt': holds a message list written as text", f"(in {TRAIN})"]),
    ("rl-prompt-role", "grpo", {"train.jsonl": jl({"prompt": [{"role": "human", "content": "1+1?"}], "answer": 2})},
     [], ["train row 0, column 'prompt': message 0 has role 'human'"]),
    ("rl-prompt-column-null", "grpo",
     {"train.jsonl": jl({"problem": "1+1?", "answer": 2}, {"problem": None, "answer": 3})}, ["prompt_column=problem"],
     ["train row 1, column 'problem': expected a string or a list of messages, got NoneType"]),
    ("rl-prompt-too-long", "grpo", {"train.jsonl": jl(RL, {**RL, "prompt": "What is 1+1? " * 20})},
     ["max_prompt_length=8"], ["train dataset row 1: prompt has", "more than max_prompt_length 8", f"(in {TRAIN})"]),
    ("online-answer-null", "online_dpo", {"train.jsonl": jl(RL, {**RL, "answer": None})}, [],
     ["train row 1, column 'answer': is null, and oracle 'verifier:accuracy' reads it", f"(in {TRAIN})"]),
    ("online-eval-answer-null", "online_dpo", {"train.jsonl": jl(RL), "eval.jsonl": jl({**RL, "answer": None})}, [],
     ["eval row 0, column 'answer': is null, and oracle 'verifier:accuracy' reads it", f"(in {EVAL})"]),
    ("xpo-answer-empty", "xpo", {"train.jsonl": jl(RL, {**RL, "answer": ""})}, [],
     ["train row 1, column 'answer': is empty, and oracle 'verifier:accuracy' reads it"]),
    ("egpo-prompt-null", "egpo", {"train.jsonl": jl(RL, {**RL, "prompt": None})}, [],
     ["train row 1, column 'prompt': expected a string or a list of messages, got NoneType", f"(in {TRAIN})"]),
    ("iterative-answer-null", "iterative_dpo", {"train.jsonl": jl(RL, {**RL, "answer": None})}, [],
     ["train row 1, column 'answer': is null, and oracle 'reward:accuracy_and_length' reads it", f"(in {TRAIN})"]),
    ("iterative-prompt-ends-with-system", "iterative_dpo",
     {"train.jsonl": jl({"prompt": [{"role": "system", "content": "Be brief."}], "answer": 2})}, [],
     ["train row 0, column 'prompt': the prompt ends with a 'system' message"]),
]


def write(path, content) -> None:
    if isinstance(content, Parquet):
        import pyarrow as pa
        import pyarrow.parquet as pq

        schema = pa.schema(list(content.schema.items())) if content.schema else None
        table = pa.Table.from_pylist(content.rows, schema=schema) if content.rows else schema.empty_table()
        pq.write_table(table, path)
    elif isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content, encoding="utf-8")


@pytest.fixture
def quiet_progress():
    """``datasets`` draws progress bars on stderr while it reads a file; the tests count stderr lines."""
    import datasets

    was = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    yield
    if was:
        datasets.enable_progress_bars()


class ModelLoaded(Exception):
    pass


@pytest.fixture
def model_loads(monkeypatch):
    """Every model load, recorded; a load raises :class:`ModelLoaded` (not an AlignError), so a case whose error
    comes only after the model loads fails the test instead of exiting 2."""
    import align.modeling

    loads = []

    def load_model(name, *args, **kwargs):
        loads.append(name)
        raise ModelLoaded(name)

    monkeypatch.setattr(align.modeling, "load_model", load_model)
    return loads


def run_recipe(name: str, argv: list[str], capsys) -> tuple[int, list[str]]:
    from align.recipe import get_recipe, main

    capsys.readouterr()
    code = main(get_recipe(name), ["--config", CONFIGS.get(name, "testbed"), *argv])
    return code, capsys.readouterr().err.splitlines()


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_data_is_one_line_before_the_model(case, tmp_path, testbed, quiet_progress, model_loads, capsys):
    _, recipe, files, overrides, expected = case
    paths = {}
    for name, content in files.items():
        write(tmp_path / name, content)
        paths[EVAL if name.startswith("eval.") else TRAIN] = str(tmp_path / name)
    argv = [f"dataset_name={paths[TRAIN]}", f"output_dir={tmp_path / 'out'}", "dataset_test_split=null"]
    if EVAL in paths:
        argv += [f"eval_dataset_name={paths[EVAL]}", "dataset_test_split=test"]
    code, lines = run_recipe(recipe, [*argv, *overrides], capsys)
    assert code == 2
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    for part in expected:
        for key, path in paths.items():
            part = part.replace(key, repr(path))
        assert part in lines[0]
    assert model_loads == []
    assert not (tmp_path / "out").exists()


def test_the_case_table_is_large_and_names_every_format_and_recipe():
    ids = [c[0] for c in CASES]
    assert len(ids) == len(set(ids)) >= 60
    names = {name for c in CASES for name in c[2]}
    assert {n.rsplit(".", 1)[1] for n in names} == {"jsonl", "json", "csv", "parquet"}
    assert {c[1] for c in CASES} == {"sft", "dpo", "grpo", "raft", "online_dpo", "xpo", "egpo", "iterative_dpo"}


def test_a_split_the_saved_dataset_lacks(tmp_path, testbed, quiet_progress, model_loads, capsys):
    from datasets import Dataset, DatasetDict

    folder = tmp_path / "saved"
    DatasetDict({"train": Dataset.from_list([RL])}).save_to_disk(str(folder))
    code, lines = run_recipe("grpo", [f"dataset_name={folder}", f"output_dir={tmp_path / 'out'}",
                                      "dataset_test_split=validation"], capsys)
    assert code == 2 and model_loads == []
    assert lines == [f"error: split 'validation' not in {str(folder)!r} (has: train)"]


def test_rows_past_max_train_samples_are_not_read(tmp_path, testbed, quiet_progress, model_loads, capsys):
    """The limit applies before the checks: a bad row 2 with max_train_samples=2 reaches the model load."""
    data = tmp_path / "train.jsonl"
    data.write_text(jl(PREF, PREF, {**PREF, "chosen": None}))
    argv = [f"dataset_name={data}", f"output_dir={tmp_path / 'out'}", "dataset_test_split=null"]
    with pytest.raises(ModelLoaded):
        run_recipe("dpo", [*argv, "max_train_samples=2"], capsys)
    assert len(model_loads) == 1
    code, lines = run_recipe("dpo", [*argv, "max_train_samples=3"], capsys)
    assert code == 2 and len(model_loads) == 1
    assert lines == [f"error: train row 2, column 'chosen': expected a string or a list of messages, got NoneType "
                     f"(in {str(data)!r})"]


# --- implicit-prompt preference data ----------------------------------------------------------------------------


def test_implicit_prompt_is_the_shared_leading_turns():
    from datasets import Dataset

    from align.data.preference import with_prompt

    system = {"role": "system", "content": "Be brief."}
    rows = [
        # hh-rlhf style: one shared user turn
        {"chosen": [u("What is 1+1?"), a("Answer: 2")], "rejected": [u("What is 1+1?"), a("Answer: 3")]},
        # multi-turn: the shared prefix ends with an assistant turn, so it is cut back to the last user turn
        {"chosen": [system, u("Hi"), a("Hello."), u("2+2?"), a("Let me see."), a("4")],
         "rejected": [system, u("Hi"), a("Hello."), u("2+2?"), a("Let me see."), a("5")]},
    ]
    out = with_prompt(Dataset.from_list(rows))
    assert out[0] == {"prompt": [u("What is 1+1?")], "chosen": [a("Answer: 2")], "rejected": [a("Answer: 3")]}
    assert out[1] == {"prompt": [system, u("Hi"), a("Hello."), u("2+2?")], "chosen": [a("Let me see."), a("4")],
                      "rejected": [a("Let me see."), a("5")]}
    explicit = Dataset.from_list([PREF])
    assert with_prompt(explicit) is explicit  # a prompt column is used as it is


def test_implicit_prompt_rows_tokenise_like_explicit_ones():
    from datasets import Dataset

    from align.data.preference import tokenize_preferences
    from align.testbed.tokenizer import train_tokenizer

    tok = train_tokenizer()
    implicit = Dataset.from_list([{"chosen": [u("What is 1+1?"), a("Answer: 2")],
                                   "rejected": [u("What is 1+1?"), a("Answer: 3")]}])
    got = tokenize_preferences(implicit, tok, max_length=64)[0]
    want = tokenize_preferences(Dataset.from_list([PREF_C]), tok, max_length=64)[0]
    assert got == want
    assert tok.decode(got["prompt_ids"]) == "<|im_start|>user\nWhat is 1+1?<|im_end|>\n<|im_start|>assistant\n"
    assert tok.decode(got["chosen_ids"]) == "Answer: 2<|im_end|>\n"
    assert tok.decode(got["rejected_ids"]) == "Answer: 3<|im_end|>\n"


def test_implicit_prompt_file_reaches_training(tmp_path, testbed, quiet_progress, model_loads, capsys):
    data = tmp_path / "hh.jsonl"
    data.write_text(jl({"chosen": [u("What is 1+1?"), a("Answer: 2")], "rejected": [u("What is 1+1?"), a("3")]}))
    with pytest.raises(ModelLoaded):
        run_recipe("dpo", [f"dataset_name={data}", f"output_dir={tmp_path / 'out'}", "dataset_test_split=null"],
                   capsys)
    assert len(model_loads) == 1  # the data passed every check


# --- online DPO under an oracle that never prefers --------------------------------------------------------------


def tie_check(weights_per_step, max_steps: int, start: int = 0):
    """Run :meth:`OnlinePreferenceTrainer.check_preferences` over steps ``start + 1 ...`` with each step's pair
    weights (1 labelled, 0 tied) on one process; returns the steps checked and the error, if any."""
    from types import SimpleNamespace

    import torch

    from align.errors import TrainingError
    from align.trainers.online import OnlinePreferenceTrainer, Pairs

    fake = SimpleNamespace(tied_steps=0, args=SimpleNamespace(device="cpu"), oracle=SimpleNamespace(name="judge"),
                           accelerator=SimpleNamespace(reduce=lambda t, reduction: t),
                           state=SimpleNamespace(global_step=start, max_steps=max_steps))
    checked = []
    for weights in weights_per_step:
        pairs = Pairs([[1]] * len(weights), [[2]] * len(weights), [[3]] * len(weights), torch.tensor(weights), {})
        checked.append(fake.state.global_step + 1)
        try:
            OnlinePreferenceTrainer.check_preferences(fake, pairs)
        except TrainingError as err:
            return checked, str(err)
        fake.state.global_step += 1
    return checked, None


def tie_message(step: int, steps: int, per_step: int = 3) -> str:
    return (f"step {step}: the oracle 'judge' gave no preference: every pair of this run's first {steps} step(s) "
            f"tied ({per_step} pairs a step), so the loss is 0 and nothing is learned; check the oracle and the "
            "dataset columns it reads")


def test_online_pairs_that_all_tie_stop_the_run():
    tie, one = [0.0, 0.0, 0.0], [0.0, 1.0, 0.0]
    assert tie_check([tie] * 6, max_steps=6) == ([1, 2, 3, 4], tie_message(4, 4))
    assert tie_check([tie] * 2, max_steps=2) == ([1, 2], tie_message(2, 2))  # a run shorter than the window
    assert tie_check([tie] * 3, max_steps=12, start=10) == ([11, 12], tie_message(12, 2))  # resumed at step 10
    # one labelled pair within the window is a preference: the run goes on, ties later are the policy's business
    assert tie_check([tie, tie, tie, one, tie, tie, tie, tie, tie], max_steps=9) == (list(range(1, 10)), None)
    assert tie_check([[1.0, 1.0]] * 5, max_steps=5) == ([1, 2, 3, 4, 5], None)  # EGPO's pairs all weigh 1


JUDGED = []


def tie_oracle(prompts, a, b, **_):
    JUDGED.append(len(a))
    return [0.5] * len(a)


@pytest.mark.slow
def test_online_dpo_run_under_a_tie_oracle_exits_2(tmp_path, testbed, quiet_progress, capsys):
    """End to end: the run stops at step 2 of 2 with one error line (transformers' own progress bars aside)."""
    JUDGED.clear()
    out = tmp_path / "out"
    code, lines = run_recipe("online_dpo", [
        "per_device_train_batch_size=2", "max_train_samples=8", "dataset_test_split=null", "max_steps=2",
        "max_completion_length=4", "disable_tqdm=true", f"oracle={__name__}:tie_oracle", f"output_dir={out}"], capsys)
    assert code == 2
    errors = [line for line in lines if line.startswith("error")]
    assert errors == [lines[-1]] == [f"error: step 2: the oracle '{__name__}:tie_oracle' gave no preference: every "
                                     "pair of this run's first 2 step(s) tied (2 pairs a step), so the loss is 0 and "
                                     "nothing is learned; check the oracle and the dataset columns it reads"]
    assert JUDGED == [2, 2]
    assert not (out / "model.safetensors").exists()


def test_docs_table_lists_exactly_these_cases():
    import re
    from pathlib import Path

    text = (Path(__file__).resolve().parents[2] / "docs/errors.md").read_text()
    section = text.split("## Bad input, case by case: data", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("| `")]
    assert [re.match(r"\| `([a-z0-9-]+)`", row).group(1) for row in rows] == [c[0] for c in CASES]
