import json

import pytest
import yaml

from align.rewards.math import accuracy_reward, extract_answer, format_reward, is_correct
from align.testbed import tasks
from align.testbed.build import WARMUP
from align.testbed.tokenizer import CHAT_TEMPLATE, train_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer()


@pytest.mark.parametrize("text", ["What is 12+7?", "Answer: -45", "héllo wörld 😀\n\ttabs", "  spaced  ", "77*9=693."])
def test_tokenizer_round_trip(tokenizer, text):
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids) == text


def test_tokenizer_digits_are_single_tokens(tokenizer):
    assert tokenizer.tokenize("1234") == ["1", "2", "3", "4"]


def test_tokenizer_specials_and_chat_template(tokenizer):
    assert len(tokenizer) == 384
    assert tokenizer.pad_token == "<|pad|>" and tokenizer.eos_token == "<|im_end|>"
    assert tokenizer.pad_token_id != tokenizer.eos_token_id
    msgs = [{"role": "user", "content": "What is 2+3?"}, {"role": "assistant", "content": "Answer: 5"}]
    assert tokenizer.apply_chat_template(msgs, tokenize=False) == (
        "<|im_start|>user\nWhat is 2+3?<|im_end|>\n<|im_start|>assistant\nAnswer: 5<|im_end|>\n"
    )
    assert tokenizer.apply_chat_template(msgs[:1], tokenize=False, add_generation_prompt=True).endswith(
        "<|im_start|>assistant\n"
    )


def test_testbed_folders_load_with_from_pretrained(testbed):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    for folder in (testbed.base, testbed.policy):
        tok = AutoTokenizer.from_pretrained(folder)
        model = AutoModelForCausalLM.from_pretrained(folder)
        assert model.config.model_type == "llama"
        assert tok.chat_template == CHAT_TEMPLATE
        n = sum(p.numel() for p in model.parameters())
        assert 2_000_000 < n < 5_000_000, n  # "a few million parameters"
        ids = tok("What is 1+1?", return_tensors="pt")["input_ids"]
        assert model(ids).logits.shape == (1, ids.shape[1], len(tok))
        assert model.dtype == torch.float32


def test_warmup_reaches_nontrivial_imperfect_accuracy(testbed):
    info = testbed.info
    base, policy = info["held_out_accuracy"]["base"], info["held_out_accuracy"]["policy"]
    assert base["accuracy"] < 0.05  # a random model knows nothing
    assert policy["format"] > 0.95  # the warm-up teaches the answer format
    for task in tasks.EASY_TASKS:  # non-trivial but imperfect on each easy task
        assert 0.15 < policy[f"accuracy/{task}"] < 0.97, (task, policy)


def test_sft_testbed_config_matches_the_warmup(repo):
    config = yaml.safe_load((repo / "configs/sft/testbed.yaml").read_text())
    for key, value in WARMUP.items():
        assert config[key] == value, key


@pytest.mark.parametrize(
    "completion, answer, ok",
    [
        ("Answer: 11", 11, True),
        ("4+7=11. Answer: 11", 11, True),
        ("Answer: 12", 11, False),
        ("the answer is 11", 11, False),  # no parseable answer
        ("Answer: -3", -3, True),
        ("Answer: 3", -3, False),
        ("Answer: 5 ... Answer: 7", 7, True),  # the last answer counts
        ("Answer: 110", 11, False),
        ([{"role": "assistant", "content": "Answer: 9"}], 9, True),
    ],
)
def test_verifier(completion, answer, ok):
    assert is_correct(completion, answer) is ok
    assert tasks.get_task("add1").verify(completion, answer) is ok


def test_reward_functions():
    comps = ["Answer: 4", "Answer: 5", "four"]
    assert accuracy_reward(comps, answer=[4, 4, 4]) == [1.0, 0.0, 0.0]
    assert format_reward(comps) == [1.0, 1.0, 0.0]
    assert extract_answer("x Answer: 42") == 42 and extract_answer("none") is None


@pytest.mark.parametrize("name", list(tasks.TASKS))
def test_every_task_solution_verifies(name):
    for p in tasks.problems((name,), n=50, split="train", seed=3):
        assert is_correct(p.solution(), p.answer)
        assert eval(p.question.removeprefix("What is ").removesuffix("?")) == p.answer  # noqa: S307
        assert not is_correct(p.solution(p.answer + 1), p.answer)


def test_dataset_formats():
    conv = tasks.dataset("preference", ("add1", "add2"), n=8, fmt="conversational")
    assert set(conv.column_names) == {"prompt", "chosen", "rejected", "task", "difficulty", "answer"}
    row = conv[0]
    assert row["prompt"] == [{"role": "user", "content": row["prompt"][0]["content"]}]
    assert row["chosen"][0]["role"] == "assistant"
    std = tasks.dataset("preference", ("add1", "add2"), n=8, fmt="standard")
    for r in std:
        assert isinstance(r["prompt"], str) and r["chosen"].startswith(" ")
        assert is_correct(r["chosen"], r["answer"]) and not is_correct(r["rejected"], r["answer"])
        assert extract_answer(r["rejected"]) is not None  # wrong, but well-formed
    sft = tasks.dataset("sft", n=6, fmt="standard")
    assert sft.column_names[:2] == ["prompt", "completion"] and sft["task"] == ["add1", "sub1", "mul1"] * 2
    rl = tasks.dataset("rl", ("chain",), n=4)
    assert rl.column_names == ["prompt", "task", "difficulty", "answer", "solution"] and rl["difficulty"] == [3] * 4
    assert all(is_correct(s, a) for s, a in zip(rl["solution"], rl["answer"], strict=True))


def test_splits():
    # Larger tasks: a fixed held-out pool, never served by the train split.
    test_q = {p.question for p in tasks.problems(("add2", "mul2"), n=None, split="test")}
    assert len(test_q) == 400
    train_q = {p.question for p in tasks.problems(("add2", "mul2"), n=3000, split="train", seed=7)}
    assert not test_q & train_q
    # Fact tasks: the test split is the whole table.
    add1 = tasks.problems(("add1",), n=None, split="test")
    assert len(add1) == 100 and {p.answer for p in add1} == set(range(19))
    assert len(tasks.problems(("sub1",), n=None, split="test")) == 55
    # Deterministic.
    assert tasks.problems(n=20, seed=1) == tasks.problems(n=20, seed=1) != tasks.problems(n=20, seed=2)


def test_bad_task_arguments():
    with pytest.raises(ValueError, match="unknown testbed task 'div'"):
        tasks.problems(("div",), n=3)
    with pytest.raises(ValueError, match="split"):
        tasks.problems(n=3, split="dev")
    with pytest.raises(ValueError, match="only 55"):
        tasks.problems(("sub1",), n=60, split="test")


def test_build_info_is_complete(testbed):
    info = json.loads((testbed.root / "testbed.json").read_text())
    assert info["warmup"] == WARMUP and info["build_seconds"] > 0
    assert (testbed.policy / "metrics.jsonl").is_file()


def test_testbed_prefix_is_a_plugin(testbed):
    """``testbed:`` names work with nothing imported but the loaders: the first one imports the plugin that owns
    the prefix (:data:`align.modeling.PLUGINS`); other ``x:y`` names stay ordinary paths."""
    import subprocess
    import sys

    code = """if True:
        import sys
        from align.data.loading import check_dataset_name
        from align.errors import ConfigError
        from align.modeling import check_model_path, resolve_model_path
        assert "align.testbed.plugin" not in sys.modules
        check_dataset_name("testbed:rl")
        assert "align.testbed.plugin" in sys.modules
        check_model_path("testbed:policy")
        print(resolve_model_path("testbed:policy"))
        assert resolve_model_path("other:thing") == "other:thing"
        try:
            check_model_path("testbed:large")
        except ConfigError as err:
            print(err)
    """
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.splitlines()
    assert out == [str(testbed.policy), "model_name_or_path: unknown testbed model 'testbed:large' "
                                        "(use testbed:base, testbed:policy, testbed:v3-base or testbed:v3-policy)"]
