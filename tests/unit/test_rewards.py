"""Reward functions, the reward registry and RewardSet, with hand-checked numbers."""

from __future__ import annotations

import math

import pytest
import torch

from align.errors import ConfigError, DataError, TrainingError
from align.rewards import (
    REWARD_FUNCTIONS,
    RewardModel,
    RewardSet,
    accuracy_reward,
    format_reward,
    math_verify_reward,
    overlong_reward,
    required_columns,
    resolve_reward,
    soft_overlong_punishment,
)

# --- DAPO soft overlong punishment -------------------------------------------------------------------


def test_soft_overlong_boundaries():
    # L_max = 20, L_cache = 5: 0 up to 15 tokens, (15 - L) / 5 on (15, 20], -1 beyond 20.
    got = soft_overlong_punishment([0, 15, 16, 18, 20, 21, 100], 20, 5)
    assert got == pytest.approx([0.0, 0.0, -0.2, -0.6, -1.0, -1.0, -1.0])


def test_soft_overlong_edge_caches():
    assert soft_overlong_punishment([10, 11], 10, 0) == [0.0, -1.0]  # hard step
    assert soft_overlong_punishment([0, 1, 5, 10, 11], 10, 10) == pytest.approx([0.0, -0.1, -0.5, -1.0, -1.0])


@pytest.mark.parametrize("cache", [-1, 21])
def test_soft_overlong_rejects_bad_cache(cache):
    with pytest.raises(ValueError, match="cache_length"):
        soft_overlong_punishment([1], 20, cache)
    with pytest.raises(ValueError, match="cache_length"):
        overlong_reward(20, cache)


def test_overlong_reward_function():
    fn = overlong_reward(20, 5)
    assert fn.__name__ == "overlong"
    assert fn(["a", "b", "c"], completion_lengths=[15, 16, 21], answer=[1, 2, 3]) == pytest.approx([0.0, -0.2, -1.0])
    assert fn(["a"], completion_lengths=torch.tensor([17])) == pytest.approx([-0.4])
    with pytest.raises(ValueError, match="completion_lengths"):
        fn(["a", "b"], completion_lengths=[1])


# --- Math-Verify -------------------------------------------------------------------------------------


def test_math_verify_full_solutions():
    solution = ["We add: $1/2 + 1/4 = \\frac{3}{4}$, so the answer is $\\boxed{\\frac{3}{4}}$."] * 4
    completions = [
        "The sum is \\boxed{\\frac{3}{4}}.",
        "So the answer is $0.75$.",
        "I get \\boxed{\\frac{2}{3}}.",
        "no idea",
    ]
    assert math_verify_reward(completions, solution) == [1.0, 1.0, 0.0, 0.0]


def test_math_verify_bare_answers():
    completions = [
        "2 + 40 = 42, the answer is \\boxed{42}",
        "The answer is \\boxed{41}",
        "Therefore $x = \\sqrt{2}$.",
        "\\boxed{(1, 2)}",
        [{"role": "assistant", "content": "So \\boxed{0.5}"}],
    ]
    solution = ["42", 42, "\\sqrt{2}", "(1,2)", "\\frac{1}{2}"]
    assert math_verify_reward(completions, solution) == [1.0, 0.0, 1.0, 1.0, 1.0]


def test_math_verify_garbage_is_zero_and_lengths_checked():
    assert math_verify_reward(["\\boxed{\\frac{", ""], ["\\frac{", "}{"]) == [0.0, 0.0]
    with pytest.raises(ValueError, match="2 completions but 1 solutions"):
        math_verify_reward(["a", "b"], ["1"])


# --- registry ----------------------------------------------------------------------------------------


def test_resolve_registered_and_imported():
    assert resolve_reward("accuracy", {}) is accuracy_reward
    assert resolve_reward("format", {}) is format_reward
    assert resolve_reward("math_verify", {}) is math_verify_reward
    assert resolve_reward("align.rewards.math:format_reward", {}) is format_reward
    fn = resolve_reward("overlong", {"max_completion_length": 20, "overlong_cache_length": 5})
    assert fn.__name__ == "overlong" and fn(["x"], completion_lengths=[16]) == pytest.approx([-0.2])
    assert set(REWARD_FUNCTIONS) >= {"accuracy", "format", "math_verify", "overlong"}


@pytest.mark.parametrize(
    "spec, match",
    [
        ("nope", "unknown reward function 'nope' \\(known: accuracy, format"),
        ("no_such_pkg.mod:fn", "cannot import 'no_such_pkg.mod'"),
        ("align.rewards.math:no_such_fn", "has no attribute 'no_such_fn'"),
        ("align.rewards.math:ANSWER_RE", "'align.rewards.math:ANSWER_RE' is not callable"),
        ("align.rewards.math:", "package.module:function"),
        ("overlong", "needs the option 'max_completion_length'"),
    ],
)
def test_resolve_bad_specs(spec, match):
    with pytest.raises(ConfigError, match=match) as info:
        resolve_reward(spec, {})
    assert "\n" not in str(info.value)


def test_resolve_overlong_bad_cache():
    with pytest.raises(ConfigError, match="cache_length"):
        resolve_reward("overlong", {"max_completion_length": 20, "overlong_cache_length": 30})


def test_required_columns():
    def custom(completions, prompts, solution, difficulty, completion_ids, completion_lengths, scale=1.0, *a, **kw):
        return [0.0] * len(completions)

    assert required_columns(accuracy_reward) == ("answer",)
    assert required_columns(format_reward) == ()
    assert required_columns(math_verify_reward) == ("solution",)
    assert required_columns(overlong_reward(20, 5)) == ()
    assert required_columns(custom) == ("solution", "difficulty")


# --- RewardSet ---------------------------------------------------------------------------------------

COMPLETIONS = ["Answer: 3", "Answer: 4", "no answer", "Answer: 7"]
PROMPTS = ["1+2?", "1+2?", "3+4?", "3+4?"]
IDS = [17, 17, 5, 5]


def test_reward_set_weighted_total():
    rs = RewardSet(
        ["accuracy", "format", "overlong"],
        [1.0, 0.5, 2.0],
        {"max_completion_length": 20, "overlong_cache_length": 5},
    )
    assert rs.names == ("accuracy", "format", "overlong")
    total, per, errors = rs(PROMPTS, COMPLETIONS, IDS, [3, 16, 20, 21], {"answer": [3, 3, 7, 7], "prompt": PROMPTS})
    # accuracy [1, 0, 0, 1], format [1, 1, 0, 1], overlong [0, -0.2, -1, -1]
    assert per["accuracy"].tolist() == [1.0, 0.0, 0.0, 1.0]
    assert per["format"].tolist() == [1.0, 1.0, 0.0, 1.0]
    assert per["overlong"].tolist() == pytest.approx([0.0, -0.2, -1.0, -1.0])
    assert total.dtype == torch.float32 and total.shape == (4,)
    assert total.tolist() == pytest.approx([1.5, 0.1, -2.0, -0.5])
    assert errors == {"accuracy": 0, "format": 0, "overlong": 0}


def test_reward_set_defaults_and_duplicate_names():
    rs = RewardSet(["format", "align.rewards.math:format_reward", "format"])
    assert rs.names == ("format", "format_reward", "format_2")
    total, _, _ = rs(PROMPTS, COMPLETIONS, IDS, [1, 1, 1, 1], {})
    assert total.tolist() == [3.0, 3.0, 0.0, 3.0]


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(specs=[], weights=None), "reward_funcs: no reward functions"),
        (dict(specs=["accuracy", "format"], weights=[1.0]), "reward_weights: 1 weights for 2 reward functions"),
        (dict(specs=["acuracy"], weights=None), "reward_funcs: unknown reward function 'acuracy' \\(known: accuracy"),
        (dict(specs=["format"], weights=None, on_error="skip"), "on_reward_error: must be one of raise, zero"),
        (dict(specs=["format"], weights=[math.nan]), "reward_weights"),
    ],
)
def test_reward_set_config_errors(kwargs, match):
    with pytest.raises(ConfigError, match=match) as info:
        RewardSet(**kwargs)
    assert "\n" not in str(info.value)


def test_check_columns():
    rs = RewardSet(["format", "accuracy"])
    rs.check_columns(["prompt", "answer"])
    with pytest.raises(DataError) as info:
        rs.check_columns(["prompt", "solution"])
    assert str(info.value) == "train dataset: column 'answer' needed by reward function 'accuracy' is missing"
    with pytest.raises(DataError, match="^eval dataset: column 'solution'"):
        RewardSet(["math_verify"]).check_columns(["prompt"], where="eval dataset")


def nan_second(completions, **_):
    return [1.0, math.nan, 1.0, None]


def boom(completions, **_):
    raise RuntimeError("kaput\nsecond line")


def too_few(completions, **_):
    return [1.0]


def test_reward_set_raises_naming_function_and_prompt_id():
    with pytest.raises(TrainingError) as info:
        RewardSet([nan_second])(PROMPTS, COMPLETIONS, IDS, [1] * 4, {})
    assert str(info.value) == "reward function 'nan_second' returned nan for prompt id 17"
    with pytest.raises(TrainingError, match="^reward function 'boom' raised RuntimeError for prompt id 17: kaput sec"):
        RewardSet(["format", boom])(PROMPTS, COMPLETIONS, IDS, [1] * 4, {})
    with pytest.raises(TrainingError, match="'too_few' returned 1 values for 4 completions \\(prompt id 17\\)"):
        RewardSet([too_few])(PROMPTS, COMPLETIONS, IDS, [1] * 4, {})
    with pytest.raises(TrainingError, match="'accuracy' raised TypeError for prompt id 17"):
        RewardSet(["accuracy"])(PROMPTS, COMPLETIONS, IDS, [1] * 4, {})  # no `answer` column


def test_reward_set_zero_counts_bad_items():
    rs = RewardSet(["format", nan_second, boom, too_few], [1.0, 2.0, 1.0, 1.0], on_error="zero")
    total, per, errors = rs(PROMPTS, COMPLETIONS, IDS, [1] * 4, {})
    assert per["nan_second"].tolist() == [1.0, 0.0, 1.0, 0.0]
    assert per["boom"].tolist() == [0.0] * 4 and per["too_few"].tolist() == [0.0] * 4
    assert errors == {"format": 0, "nan_second": 2, "boom": 4, "too_few": 4}
    assert total.tolist() == [3.0, 1.0, 2.0, 1.0]


# --- RewardModel -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_rm(testbed):
    from transformers import AutoTokenizer, LlamaConfig, LlamaForSequenceClassification

    tok = AutoTokenizer.from_pretrained(testbed.policy)
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        num_labels=1,
        pad_token_id=None,
    )
    model = LlamaForSequenceClassification(config)
    return model, tok


def _direct(model, tok, text, chat):
    ids = tok(text, add_special_tokens=not chat, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        return model(input_ids=ids).logits[0, 0].item()


CONV_PROMPTS = [
    [{"role": "user", "content": "1+2?"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 12 times 11?"}],
    [{"role": "user", "content": "3+4?"}],
]
CONV_COMPLETIONS = [
    [{"role": "assistant", "content": "Answer: 3"}],
    [{"role": "assistant", "content": "Let me think. 12 times 11 is 132. Answer: 132"}],
    [{"role": "assistant", "content": "7"}],
]


@pytest.mark.parametrize("padding_side", ["right", "left"])
@pytest.mark.parametrize("batch_size", [1, 2, 3])
def test_reward_model_matches_direct_forward(tiny_rm, padding_side, batch_size):
    model, tok = tiny_rm
    tok.padding_side = padding_side
    rm = RewardModel(model=model, tokenizer=tok, batch_size=batch_size)
    assert rm.__name__ == "reward_model" and not model.training
    assert required_columns(rm) == ()

    got = rm(CONV_COMPLETIONS, prompts=CONV_PROMPTS, answer=[1, 2, 3])
    want = [
        _direct(model, tok, tok.apply_chat_template(p + c, tokenize=False), chat=True)
        for p, c in zip(CONV_PROMPTS, CONV_COMPLETIONS)
    ]
    assert got == pytest.approx(want, abs=1e-5)
    assert len(set(round(x, 6) for x in got)) == 3  # the examples really differ

    plain_prompts = ["1+2? ", "What is 12 times 11? "]
    plain_completions = ["Answer: 3", "Answer: 132 after some thought"]
    got = rm(plain_completions, plain_prompts)
    want = [_direct(model, tok, p + c, chat=False) for p, c in zip(plain_prompts, plain_completions)]
    assert got == pytest.approx(want, abs=1e-5)


def test_reward_model_string_completion_with_chat_prompt(tiny_rm):
    model, tok = tiny_rm
    rm = RewardModel(model=model, tokenizer=tok)
    messages = CONV_PROMPTS[0] + [{"role": "assistant", "content": "Answer: 3"}]
    want = _direct(model, tok, tok.apply_chat_template(messages, tokenize=False), chat=True)
    assert rm(["Answer: 3"], [CONV_PROMPTS[0]]) == pytest.approx([want], abs=1e-5)


def test_reward_model_from_path_and_in_reward_set(tiny_rm, tmp_path):
    model, tok = tiny_rm
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    rs = RewardSet([f"model:{tmp_path}", "format"], [1.0, 1.0])
    assert rs.names == ("reward_model", "format")
    total, per, _ = rs(PROMPTS[:2], COMPLETIONS[:2], IDS[:2], [1, 1], {})
    want = RewardModel(model=model, tokenizer=tok)(COMPLETIONS[:2], PROMPTS[:2])
    assert per["reward_model"].tolist() == pytest.approx(want, abs=1e-5)
    assert total.tolist() == pytest.approx([w + 1.0 for w in want], abs=1e-5)
    with pytest.raises(ConfigError, match="cannot load reward model"):
        resolve_reward(f"model:{tmp_path / 'missing'}", {})
