"""A small byte-level BPE tokenizer trained locally with the ``tokenizers`` library.

Byte-level, so every string round-trips exactly; digits are split one per token so arithmetic is
learnable by a tiny model. ChatML-style chat template, ``<|im_end|>`` is the end-of-turn/eos token and
``<|pad|>`` the padding token. Saved as an ordinary HF tokenizer folder.
"""

from __future__ import annotations

import random

from align.testbed.tasks import TASKS

PAD, EOS, IM_START = "<|pad|>", "<|im_end|>", "<|im_start|>"
SPECIAL_TOKENS = [PAD, EOS, IM_START]
VOCAB_SIZE = 384

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

_FILLER = (
    "You are a helpful assistant. The user asks a question and the assistant answers it. "
    "Please compute the result step by step and give the final answer. What is the sum, the "
    "difference and the product of these numbers? Think carefully, then answer."
)


def _corpus(n_per_task: int = 400) -> list[str]:
    rng = random.Random("align-testbed-tokenizer")
    lines = [_FILLER] * 20
    for role in ("system", "user", "assistant"):
        lines.append(role)
    for task in TASKS.values():
        for _ in range(n_per_task):
            p = task.make(rng)
            lines.append(f"{p.question}\n{p.solution()}")
    return lines


def train_tokenizer(vocab_size: int = VOCAB_SIZE, corpus: list[str] | None = None):
    """Train the testbed tokenizer and wrap it as a ``PreTrainedTokenizerFast`` (nothing is downloaded): byte-level
    BPE with one token per digit, on ``corpus`` (default: spec 2's tasks)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus() if corpus is None else corpus, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token=PAD,
        eos_token=EOS,
        additional_special_tokens=[IM_START],
        model_max_length=256,
        padding_side="right",
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast
