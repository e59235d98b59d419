"""Preference data: row checks, tokenisation with the chat template, the [chosen; rejected] collator,
and the completion log-prob kernel on hand-checked numbers."""

import math

import pytest
import torch
from datasets import Dataset

from align.data.preference import PreferenceCollator, check_preference_rows, tokenize_preferences
from align.errors import DataError
from align.logps import completion_logps
from align.testbed import tasks
from align.testbed.tokenizer import train_tokenizer


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer()


def test_conversational_rows_use_the_chat_template(tok):
    ds = tasks.dataset("preference", ("add1",), n=2, fmt="conversational")
    out = tokenize_preferences(ds, tok, max_length=64)
    row, raw = out[0], ds[0]
    prompt = tok.decode(row["prompt_ids"])
    assert prompt == f"<|im_start|>user\n{raw['prompt'][0]['content']}<|im_end|>\n<|im_start|>assistant\n"
    assert tok.decode(row["chosen_ids"]) == raw["chosen"][0]["content"] + "<|im_end|>\n"
    assert tok.decode(row["rejected_ids"]) == raw["rejected"][0]["content"] + "<|im_end|>\n"
    assert out["row_id"] == [0, 1]


def test_standard_rows_get_eos(tok):
    ds = Dataset.from_list([{"prompt": "What is 1+1?", "chosen": " Answer: 2", "rejected": " Answer: 3"}])
    row = tokenize_preferences(ds, tok, max_length=64)[0]
    assert tok.decode(row["chosen_ids"]) == " Answer: 2<|im_end|>"
    assert row["chosen_ids"][-1] == tok.eos_token_id


def test_collator_layout_and_masks(tok):
    ds = tokenize_preferences(tasks.dataset("preference", ("add1", "mul1"), n=3), tok, max_length=64)
    feats = [dict(r, ref_chosen_logps=-1.0 * i, ref_rejected_logps=-2.0 * i) for i, r in enumerate(ds)]
    batch = PreferenceCollator(tok.pad_token_id)(feats)
    assert batch["input_ids"].shape[0] == 6
    for i, f in enumerate(feats):
        for j, key in ((i, "chosen_ids"), (i + 3, "rejected_ids")):  # chosen first, then rejected
            n_p, n_c = len(f["prompt_ids"]), len(f[key])
            assert batch["input_ids"][j, : n_p + n_c].tolist() == f["prompt_ids"] + f[key]
            assert batch["completion_mask"][j].sum().item() == n_c
            assert batch["completion_mask"][j, :n_p].sum().item() == 0
            assert batch["attention_mask"][j].sum().item() == n_p + n_c
            assert (batch["input_ids"][j, n_p + n_c :] == tok.pad_token_id).all()
    assert batch["ref_rejected_logps"].tolist() == [0.0, -2.0, -4.0]


def test_completion_logps_hand_checked():
    # One sequence [a, b, c] with completion tokens b, c; vocab 2; uniform logits then a sure guess.
    logits = torch.tensor([[[0.0, 0.0], [0.0, math.log(3.0)], [5.0, 5.0]]])
    ids = torch.tensor([[0, 1, 1]])
    mask = torch.tensor([[0, 1, 1]])
    logps, lengths, entropy = completion_logps(logits, ids, mask)
    # log p(b=1 | a) = log 1/2 ; log p(c=1 | a b) = log 3/4
    assert logps.item() == pytest.approx(math.log(0.5) + math.log(0.75))
    assert lengths.item() == 2
    h1 = math.log(2)
    h2 = -(0.25 * math.log(0.25) + 0.75 * math.log(0.75))
    assert entropy.item() == pytest.approx((h1 + h2) / 2)
    # prompt positions do not count
    logps_p, lengths_p, _ = completion_logps(logits, ids, torch.tensor([[0, 0, 1]]))
    assert logps_p.item() == pytest.approx(math.log(0.75)) and lengths_p.item() == 1


@pytest.mark.parametrize(
    "rows, message",
    [
        ([{"prompt": "q", "chosen": "a"}], "needs columns prompt, chosen, rejected"),
        ([{"prompt": "q", "chosen": "a", "rejected": "b"}, {"prompt": "q", "chosen": "", "rejected": "b"}],
         "train row 1, column 'chosen': is empty"),
        ([{"prompt": "q", "chosen": "a", "rejected": "b"}, {"prompt": "q", "chosen": "same", "rejected": "same"}],
         "train row 1: chosen and rejected are identical"),
        ([{"prompt": "q", "chosen": 3, "rejected": "b"}], "train row 0, column 'chosen': expected a string"),
        ([{"prompt": [{"role": "user", "content": "q"}], "chosen": "a", "rejected": "b"}],
         "train row 0, column 'chosen': is standard but earlier cells are conversational"),
    ],
)
def test_bad_preference_rows(rows, message):
    with pytest.raises(DataError) as err:
        check_preference_rows(Dataset.from_list(rows))
    assert message in str(err.value) and "\n" not in str(err.value)


def test_prompt_longer_than_max_length(tok):
    rows = [{"prompt": "What is 1+1?", "chosen": " Answer: 2", "rejected": " Answer: 3"},
            {"prompt": "What is 1+1? " * 20, "chosen": " Answer: 2", "rejected": " Answer: 3"}]
    with pytest.raises(DataError, match=r"train row 1: prompt has \d+ tokens, not below max_length 32"):
        tokenize_preferences(Dataset.from_list(rows), tok, max_length=32)


def test_completions_are_cut_to_fit(tok):
    rows = [{"prompt": "Hi", "chosen": " Answer: 123456789", "rejected": " Answer: 987654321"}]
    row = tokenize_preferences(Dataset.from_list(rows), tok, max_length=6)[0]
    assert len(row["prompt_ids"]) + len(row["chosen_ids"]) == 6
