"""A LoRA policy's weights merged without writing into the model (align.rollout.vllm_engine.merged_weights: what a
sharded policy pushes to vLLM or the iterative driver saves), against PEFT's own merge; what it cannot merge is one
line, given when the trainer sets up."""

import pytest
import torch

from align.errors import ConfigError
from align.rollout.vllm_engine import mergeable_layers, merged_weights


def lora_llama(targets=None):
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    model = get_peft_model(LlamaForCausalLM(config), LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0,
                                                                target_modules=targets or ["q_proj", "v_proj"]))
    with torch.no_grad():  # B starts at zero: a trained adapter instead, so the merge changes the weights
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    return model


def test_merged_weights_equal_peft_merge_and_leave_the_model_alone():
    model = lora_llama()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    base = {n: m.base_layer.weight.detach().clone() for n, m in mergeable_layers(model).items()}
    assert sorted(base) == [f"model.layers.{i}.self_attn.{p}_proj.weight" for i in (0, 1) for p in "qv"]
    ours = dict(merged_weights(model))
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # nothing written into the model
    theirs = model.merge_and_unload().state_dict()
    assert ours.keys() == theirs.keys()
    for k, v in theirs.items():
        torch.testing.assert_close(ours[k], v, rtol=0, atol=1e-6)
    for k, w in base.items():  # the adapted weights did change: W + (8 / 4) * B @ A
        assert (ours[k] - w).abs().max() > 0.1


def test_what_cannot_be_merged_from_shards_is_one_line():
    model = lora_llama(targets=["q_proj", "embed_tokens"])
    with pytest.raises(ConfigError) as err:
        mergeable_layers(model)
    assert str(err.value) == ("use_peft: merging the adapter of base_model.model.model.embed_tokens from a sharded "
                              "policy is done for plain LoRA on linear layers only (not DoRA, Conv1D or embeddings); "
                              "set lora_target_modules to linear layers")
