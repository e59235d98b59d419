"""The GPU check's model and data (scripts/gpu_check.py): a config-built model of Qwen2.5's shape with random weights
and the testbed tokenizer, random-text DPO pairs and GRPO prompts, and the reward both trainers call."""

from __future__ import annotations

import json
import random

from bench_memory import preference_rows, random_ids

PROMPT_TOKENS = 64
# config.json values of the models (Qwen2.5-0.5B / 1.5B), and a tiny one for the CPU path
SHAPES = {
    "0.5b": dict(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                 num_attention_heads=14, num_key_value_heads=2, tie_word_embeddings=True),
    "1.5b": dict(vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                 num_attention_heads=12, num_key_value_heads=2, tie_word_embeddings=True),
    "tiny": dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, tie_word_embeddings=True),
}
SETTINGS = {  # (dpo pairs a step, dpo completion tokens, dpo steps, grpo prompts, generations, tokens, steps)
    "gpu": dict(dpo_pairs=4, dpo_tokens=448, dpo_steps=6, grpo_prompts=4, grpo_generations=4, grpo_tokens=256,
                grpo_steps=3),
    "tiny": dict(dpo_pairs=2, dpo_tokens=24, dpo_steps=3, grpo_prompts=2, grpo_generations=2, grpo_tokens=8,
                 grpo_steps=2),
}


def reward(completions, **_):
    """A reward both trainers can call: spreads the rewards of a group, so the advantages are not all zero."""
    return [(len(str(c)) % 7) / 7.0 for c in completions]


def build_model(folder: str, shape: str) -> int:
    """Random weights of ``shape`` (Qwen2 architecture) and the testbed tokenizer, saved to ``folder``; returns N."""
    import torch
    from transformers import AutoModelForCausalLM, Qwen2Config

    from align.testbed.tokenizer import train_tokenizer

    tok = train_tokenizer()  # the testbed's tokenizer, trained in seconds (the whole testbed build takes a minute)
    tok.model_max_length = 32768
    config = Qwen2Config(**SHAPES[shape], max_position_embeddings=32768, rope_theta=1e6, rms_norm_eps=1e-6,
                         pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return sum(p.numel() for p in model.parameters())  # tied: the embedding counts once, as the head's matmul


def write_data(folder: str, s: dict) -> None:
    """dpo.jsonl (random-text pairs), grpo.jsonl (random-text prompts) and lengths.json: the DPO ``max_length``
    that keeps every pair whole (decoded random ids re-tokenise longer) and the tokens a DPO step trains."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    rows = preference_rows(tok, s["dpo_pairs"] * s["dpo_steps"], s["dpo_tokens"])
    rows.to_json(f"{folder}/dpo.jsonl")
    sizes = [len(tok(r["prompt"] + r[k])["input_ids"]) for r in rows for k in ("chosen", "rejected")]
    prompts = [len(tok(r["prompt"])["input_ids"]) for r in rows]
    rng = random.Random(2)
    texts = [tok.decode(random_ids(rng, tok, PROMPT_TOKENS)) for _ in range(s["grpo_prompts"] * s["grpo_steps"])]
    with open(f"{folder}/grpo.jsonl", "w", encoding="utf-8") as fh:
        fh.writelines(json.dumps({"prompt": t}) + "\n" for t in texts)
    prompt_tokens = [len(tok(t)["input_ids"]) for t in texts]
    with open(f"{folder}/lengths.json", "w", encoding="utf-8") as fh:
        json.dump({"max_length": max(sizes) + 8, "max_prompt": max(prompts + prompt_tokens),
                   "dpo_tokens_per_step": sum(sizes) / s["dpo_steps"],
                   "grpo_prompt_tokens_per_step": sum(prompt_tokens) / s["grpo_steps"]}, fh)


def lengths(folder: str) -> dict:
    with open(f"{folder}/lengths.json", encoding="utf-8") as fh:
        return json.load(fh)
