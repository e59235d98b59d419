"""A learned reward model as a reward function: a sequence classifier with one output scores prompt + completion.

This is the reward model of RLHF (Ouyang et al. 2022, "Training language models to follow instructions
with human feedback", arXiv:2203.02155): a transformer with a scalar head read at the last token. We
use ``transformers``' ``AutoModelForSequenceClassification`` (``num_labels=1``), whose pooling reads the
rightmost token that is not ``config.pad_token_id``, so left- and right-padded batches score alike.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch


def _is_conversation(x: Any) -> bool:
    return isinstance(x, list | tuple) and all(isinstance(m, dict) for m in x)


class RewardModel:
    """``RewardModel(path)`` or ``RewardModel(model=..., tokenizer=...)``; call as ``rm(completions, prompts)``.

    Conversational prompts and completions (message lists) are rendered with the tokenizer's chat
    template as prompt messages + the assistant's message(s); plain strings are concatenated.
    """

    def __init__(
        self,
        path: str | Path | None = None,
        *,
        model: Any = None,
        tokenizer: Any = None,
        batch_size: int = 8,
        max_length: int | None = None,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
    ):
        if (path is None) == (model is None):
            raise ValueError("RewardModel: give either path or model (with tokenizer), not both or neither")
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        if path is not None:
            kwargs = {"num_labels": 1}
            if dtype is None and device is None:  # bfloat16 on a GPU (every process holds one copy)
                from align.modeling import frozen_dtype

                dtype = frozen_dtype()
            if dtype is not None:
                kwargs["dtype"] = dtype
            from align.modeling import load_frozen

            model = load_frozen(AutoModelForSequenceClassification, str(path), **kwargs)
            tokenizer = tokenizer or AutoTokenizer.from_pretrained(str(path))
            if device is None:  # rank 0's weights in every process, on this process's device (not the CPU)
                from align.modeling import place_frozen

                model = place_frozen(model)
        if tokenizer is None:
            raise ValueError("RewardModel: a model needs its tokenizer")
        if getattr(model.config, "num_labels", 1) != 1:
            raise ValueError(f"RewardModel: the model must have num_labels=1, got {model.config.num_labels}")
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        # The model finds each sequence's last token as the rightmost one that is not the pad id.
        model.config.get_text_config().pad_token_id = tokenizer.pad_token_id
        model.config.pad_token_id = tokenizer.pad_token_id
        if device is not None:
            model.to(device)
        self.__name__ = "reward_model"
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.max_length = max_length
        self._takes_position_ids = "position_ids" in inspect.signature(model.forward).parameters

    def text(self, prompt: Any, completion: Any) -> str:
        """The text scored for one example."""
        if _is_conversation(prompt) or _is_conversation(completion):
            user = {"role": "user", "content": str(prompt)}
            assistant = {"role": "assistant", "content": str(completion)}
            prompt_msgs = list(prompt) if _is_conversation(prompt) else [user]
            completion_msgs = list(completion) if _is_conversation(completion) else [assistant]
            return self.tokenizer.apply_chat_template(prompt_msgs + completion_msgs, tokenize=False)
        return str(prompt) + str(completion)

    @torch.no_grad()
    def score_texts(self, texts: Sequence[str], chat: bool = False) -> list[float]:
        """Scores of ready-made texts, ``batch_size`` at a time."""
        scores: list[float] = []
        device = next(self.model.parameters()).device
        for start in range(0, len(texts), self.batch_size):
            batch = self.tokenizer(
                list(texts[start : start + self.batch_size]),
                padding=True,
                truncation=self.max_length is not None,
                max_length=self.max_length,
                add_special_tokens=not chat,  # a chat template already writes its special tokens
                return_tensors="pt",
            ).to(device)
            inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
            if self._takes_position_ids:
                # Positions count real tokens only, so a left-padded sequence sees the same positions as alone.
                inputs["position_ids"] = (batch["attention_mask"].long().cumsum(-1) - 1).clamp(min=0)
            logits = self.model(**inputs).logits
            scores.extend(logits[:, 0].float().cpu().tolist())
        return scores

    def __call__(self, completions: Sequence[Any], prompts: Sequence[Any], **_: Any) -> list[float]:
        """The reward model's score of each prompt + completion."""
        if len(completions) != len(prompts):
            raise ValueError(f"reward_model: {len(completions)} completions but {len(prompts)} prompts")
        texts = [self.text(p, c) for p, c in zip(prompts, completions, strict=True)]
        chat = any(_is_conversation(p) or _is_conversation(c) for p, c in zip(prompts, completions, strict=True))
        return self.score_texts(texts, chat=chat)

    def __repr__(self) -> str:
        return f"RewardModel({type(self.model).__name__}, batch_size={self.batch_size})"
