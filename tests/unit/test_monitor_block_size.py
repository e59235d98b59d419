"""The gradient monitors score their sequences with the run's ``logits_block_size`` (issue 18), not the default:
the entanglement probe of a DPO run and GVM's gradient-norm estimate of an RL round, each with the key set to 7,
pass 7 to every log-prob pass they make (recorded at :func:`align.logps.token_logps`)."""

from __future__ import annotations

import os
from contextlib import nullcontext
from types import SimpleNamespace

import pytest
import torch

import align.logps

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ONE_PROCESS = SimpleNamespace(is_main_process=False, num_processes=1, process_index=0)  # an accelerator stand-in


@pytest.fixture
def block_sizes(monkeypatch):
    """Every ``block_size`` a ``token_logps`` call gets, in order."""
    seen = []
    real = align.logps.token_logps

    def record(*args, **kwargs):
        seen.append(kwargs.get("block_size"))
        return real(*args, **kwargs)

    monkeypatch.setattr(align.logps, "token_logps", record)
    return seen


def test_entanglement_probe_uses_the_runs_block_size(testbed, tmp_path, block_sizes):
    from align.config import load_config
    from align.monitors.entanglement import EntanglementMonitor
    from align.recipes.dpo import DPORecipeConfig, build_trainer

    over = {"output_dir": str(tmp_path / "out"), "max_steps": 1, "disable_tqdm": True, "max_train_samples": 8,
            "entanglement_steps": 1, "entanglement_probe_size": 4, "logits_block_size": 7}
    trainer = build_trainer(load_config(DPORecipeConfig, os.path.join(REPO, "configs/dpo/testbed.yaml"), over))
    monitor = next(c for c in trainer.callback_handler.callbacks if isinstance(c, EntanglementMonitor))
    metrics = monitor.check(0)
    assert 0 <= metrics["entanglement/both_down"] <= 1
    assert block_sizes == [7]  # the 4 pairs' 8 sequences: one chunk, one forward


def test_gvm_gradient_norms_use_the_runs_block_size(testbed, block_sizes):
    from align.modeling import load_model, load_tokenizer
    from align.trainers.rounds import RoundBuilder, Sample

    model, tok = load_model(str(testbed.policy)), load_tokenizer(str(testbed.policy))
    args = SimpleNamespace(allocator="gvm", advantage="grpo", scale_rewards="group", accept_threshold=0.5,
                           grad_norm_monitor_steps=None, gvm_grad_params=["embed_tokens"], logits_block_size=7,
                           output_dir="unused", disable_tqdm=True)
    builder = RoundBuilder(args, ONE_PROCESS, None, None, None, tok, [], tok.pad_token_id, policy=lambda: model,
                           reference=lambda: (model, nullcontext()), step=lambda: 0)
    gen = torch.Generator().manual_seed(0)
    samples = [Sample(g, k, 0, 1.0, {}, 6, False, torch.randint(2, 384, (5,), generator=gen).tolist(),
                      torch.randint(2, 384, (6,), generator=gen).tolist()) for g in range(2) for k in range(2)]
    metrics = builder.estimate([{"uid": "a"}, {"uid": "b"}], samples, 0, "gvm")
    assert metrics["gvm/prompts_measured"] == 2.0 and metrics["gvm/G_min"] > 0
    assert block_sizes == [7]  # 4 accepted samples: one chunk of up to 8, one forward
