"""Testbed spec 3's tokenizer, model shape and SFT warm-up (the tasks are :mod:`align.testbed.arith`).

Spec 2's modules (``tasks.py``, ``tokenizer.py``, ``model.py``) are left byte for byte as they were: their
bytes name spec 2's cache folder, so spec 3 lives beside them.
"""

from __future__ import annotations

import random

from align.testbed.tokenizer import CHAT_TEMPLATE, EOS, IM_START, PAD, SPECIAL_TOKENS

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
    """Byte-level BPE trained on spec-3 text, one token per digit, spec 2's specials and chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus(), trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token=PAD, eos_token=EOS,
                                   additional_special_tokens=[IM_START], model_max_length=256, padding_side="right")
    fast.chat_template = CHAT_TEMPLATE
    return fast


def build_model(tokenizer, seed: int = 0):
    """A freshly initialised ``LlamaForCausalLM`` of :data:`MODEL_SHAPE` sized for ``tokenizer``, in fp32."""
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                         eos_token_id=tokenizer.eos_token_id, bos_token_id=None, **MODEL_SHAPE)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).to(torch.float32)
    model.generation_config = GenerationConfig(eos_token_id=tokenizer.eos_token_id,
                                               pad_token_id=tokenizer.pad_token_id,
                                               max_new_tokens=MAX_NEW_TOKENS, do_sample=False)
    return model
