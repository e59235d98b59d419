"""The tiny Llama-style causal LM of the testbed, built from a config (random weights, no download)."""

from __future__ import annotations

# ~2.6M parameters: small enough that a CPU step takes milliseconds, large enough to learn the easy tasks.
MODEL_SHAPE = dict(
    hidden_size=256,
    intermediate_size=512,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    rope_theta=10000.0,
    rms_norm_eps=1e-5,
    tie_word_embeddings=False,
)


def build_model(tokenizer, seed: int = 0, shape: dict | None = None, max_new_tokens: int = 32):
    """A freshly initialised ``LlamaForCausalLM`` of ``shape`` (default: spec 2's :data:`MODEL_SHAPE`) sized for
    ``tokenizer``, in fp32, greedy for ``max_new_tokens`` by default."""
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
        **(MODEL_SHAPE if shape is None else shape),
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).to(torch.float32)
    model.generation_config = GenerationConfig(
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, max_new_tokens=max_new_tokens,
        do_sample=False
    )
    return model
