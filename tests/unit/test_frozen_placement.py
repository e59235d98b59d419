"""Reward models and judges sit on the process's device, not on the CPU (issue 15): a ``model:`` reward, a
``reward:model:`` oracle and a ``pairwise:`` judge are placed by :func:`align.modeling.place_frozen` on
:func:`align.modeling.process_device`, the device accelerate gave the process, and read in bfloat16 there when it
is a GPU that computes in it (:func:`align.modeling.frozen_dtype`).

No GPU here: accelerate's state is replaced by one that reports ``cuda:3`` (the device a fourth local rank gets), and
the placement path is run end to end with the ``meta`` device standing in for the accelerator (a CPU can hold meta
tensors; moving to a CUDA device it has not got would fail)."""

from __future__ import annotations

import accelerate
import pytest
import torch

import align.modeling
from align.modeling import frozen_dtype, process_device
from align.rewards.preference import PairwiseModelOracle, build_oracle
from align.rewards.registry import resolve_reward


class FakeState:
    """accelerate.PartialState as it is in local rank 3 of a GPU run."""

    device = torch.device("cuda", 3)


def test_process_device_is_the_one_accelerate_gives_the_process(monkeypatch):
    monkeypatch.setattr(accelerate, "PartialState", FakeState)
    assert process_device() == torch.device("cuda", 3)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert frozen_dtype() is torch.bfloat16  # half the memory of float32, on every process
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert frozen_dtype() is None  # a GPU without bf16 keeps the checkpoint's dtype


def test_on_the_cpu_frozen_models_stay_float32_on_the_cpu():
    assert process_device() == torch.device("cpu")  # no launcher, no GPU: accelerate's state says CPU
    assert frozen_dtype() is None


@pytest.mark.parametrize("kind", ["model:", "reward:model:", "pairwise:"])
def test_reward_models_and_judges_land_on_the_process_device(monkeypatch, tiny_classifier, kind):
    monkeypatch.setattr(align.modeling, "process_device", lambda: torch.device("meta"))  # the accelerator
    monkeypatch.setattr(align.modeling, "frozen_dtype", lambda: torch.bfloat16)  # what a bf16 GPU gives
    if kind == "model:":
        model = resolve_reward(f"model:{tiny_classifier}").model
    else:
        oracle = build_oracle(f"{kind}{tiny_classifier}")
        model = oracle.model if isinstance(oracle, PairwiseModelOracle) else oracle.rewards.functions[0].model
    params = list(model.parameters())
    assert {p.device.type for p in params} == {"meta"}  # nothing left on the CPU
    assert {p.dtype for p in params} == {torch.bfloat16}
    assert not any(p.requires_grad for p in params) and not model.training
