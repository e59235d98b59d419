"""Testbed spec 3's tokenizer, model shape and SFT warm-up (the tasks are :mod:`align.testbed.arith`).

The tokenizer recipe and the model builder are spec 2's (``tokenizer.py``, ``model.py``), given spec 3's corpus and
shape; every source file that shapes a spec is in its cache folder's name (``build.spec_hash``).
"""

from __future__ import annotations

import random

VOCAB_SIZE = 320
MODEL_SHAPE = dict(
    hidden_size=128,
    intermediate_size=384,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    rope_theta=10000.0,
    rms_norm_eps=1e-5,
    tie_word_embeddings=False,
)
EVAL_PER_TASK = 32  # held-out problems per task in the build's accuracy before and after the warm-up
MAX_NEW_TOKENS = 64  # the longest worked solution (5 columns) and its answer fit
WARMUP = dict(
    dataset_name="testbed:sft",
    testbed_tasks=["add2d", "sub2d", "mul2d", "add3d", "sub3d", "mul3d"],  # the RL mix too
    max_train_samples=8192,
    max_steps=300,
    per_device_train_batch_size=64,
    learning_rate=3e-3,
    lr_scheduler_type="cosine",
    warmup_steps=20,
    weight_decay=0.0,
    logging_steps=20,
    save_strategy="no",
    max_length=64,
    seed=0,
)


def corpus(n_per_task: int = 200) -> list[str]:
    from align.testbed.arith import TASKS

    rng = random.Random("align-testbed-v3-tokenizer")
    lines = ["system", "user", "assistant"]
    for task in TASKS.values():
        for _ in range(n_per_task):
            p = task.draw(rng)
            lines.append(f"{p.question}\n{p.solution()}")
    return lines


def train_tokenizer(vocab_size: int = VOCAB_SIZE):
    """Spec 2's tokenizer recipe (byte-level BPE, one token per digit, its specials and chat template) trained on
    spec-3 text."""
    from align.testbed.tokenizer import train_tokenizer as train

    return train(vocab_size, corpus())


def build_model(tokenizer, seed: int = 0):
    """A freshly initialised ``LlamaForCausalLM`` of :data:`MODEL_SHAPE` sized for ``tokenizer``, in fp32."""
    from align.testbed.model import build_model as build

    return build(tokenizer, seed, MODEL_SHAPE, MAX_NEW_TOKENS)
