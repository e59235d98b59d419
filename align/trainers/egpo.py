"""EGPO: extragradient preference optimisation on the online IPO loss (docs/methods.md §6).

Zhou et al., "Extragradient Preference Optimization (EGPO): Beyond Last-Iterate Convergence for Nash Learning
from Human Feedback" (code: zhourunlong/EGPO, ``lms/trainers/extragradient_trainer.py``). One EG iteration is two
optimizer steps on the same prompt batch, both starting from θ_t:

    half step:  θ_{t+½} = θ_t − η·∇L(θ; π_{θ_t})|θ_t          (samples and preferences from θ_t)
    full step:  θ_{t+1} = θ_t − η·∇L(θ; π_{θ_{t+½}})|θ_t      (samples from θ_{t+½}, gradient at θ_t)

Before the half step the trainable parameters and the whole optimizer state (Adam moments and step counts)
are copied to the CPU; before the full step's backward both are restored exactly, so the full step is one
optimizer step from θ_t and the moments only ever see full-step gradients. The learning-rate scheduler
advances on both steps (as the reference code's Trainer does): ``max_steps`` counts half and full steps.

L is :func:`align.objectives.online_ipo.online_ipo` on token-mean log-probs. The pair (y, y′) comes from
μ = the policy, or the geometric mixture with the reference (``mixture_coef``); its target is
``oipo1``: P(y ≻ y″) − P(y′ ≻ y″) with one opponent sample y″ ~ π_θ (at ``opponent_temperature``), or
``oipo2``: P(y ≻ y′) − ½. ``egpo_extragradient: false`` gives the online IPO baseline (one step per batch).

Rollouts: with ``mixture_coef: 0`` every sample (y, y′, y″) is a plain policy sample and comes from the engine
``rollout`` names (vLLM included), pushed the policy's weights before every step (the full step's samples must
be θ_{t+½}'s, so ``vllm_sync_steps`` must be 1 with the extragradient). With ``mixture_coef > 0`` the config
refuses ``rollout: vllm`` / ``vllm-server`` in one line: the mixture needs the policy's and the reference's
logits at every token, which vLLM cannot combine, and the pair (y, y′) is the bulk of the sampling, so running
only y″ on vLLM would buy little for a second copy of the weights.
"""

from __future__ import annotations

import copy

import torch

from align import zero3
from align.errors import TrainingError
from align.rollout.mixture import MixtureEngine
from align.trainers.online import OnlinePreferenceTrainer, Pairs


class EGPOTrainer(OnlinePreferenceTrainer):
    method = "egpo"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.batch_repeats = 2 if self.args.egpo_extragradient else 1
        self._backup = None
        self.mixture = None
        if self.args.mixture_coef > 0:
            ref, _ = self.reference()
            if ref is self.policy:
                raise ValueError("mixture_coef: needs a separate reference model (LoRA's adapter-off base cannot be "
                                 "run beside the policy in one generate call)")
            self.mixture = MixtureEngine(self.policy, ref, self.processing_class, self.args.mixture_coef,
                                         self.args.generation_batch_size)

    def make_pairs(self, rows) -> Pairs:
        a = self.args
        y = self.sample(rows, "y", engine=self.mixture)
        y2 = self.sample(rows, "y2", engine=self.mixture)
        if a.egpo_variant == "oipo2":
            gap = self.judge(rows, y, y2) - 0.5
        else:
            opponent = self.sample(rows, "opponent", temperature=a.opponent_temperature)
            gap = self.judge(rows, y, opponent) - self.judge(rows, y2, opponent)
        return Pairs([r["prompt_ids"] for r in rows], y, y2, torch.ones(len(rows)),
                     {"preference_gap": gap.to(self.args.device)})

    # --- the extragradient step -------------------------------------------------------------------

    @property
    def is_half_step(self) -> bool:
        return self.args.egpo_extragradient and self.state.global_step % 2 == 0

    def _trainable(self) -> list[torch.nn.Parameter]:
        return [p for p in self.policy.parameters() if p.requires_grad]

    def backup(self) -> None:
        """θ_t and the optimizer state, copied to the CPU (under DeepSpeed: each process's master and working
        partitions and its optimizer state, where they live: :func:`align.zero3.zero_snapshot`)."""
        if zero3.zero_optimizer(self.optimizer) is not None:
            self._backup = zero3.zero_snapshot(self.optimizer)
            return
        self._backup = snapshot(self._trainable(), self.optimizer.optimizer)

    def restore(self) -> None:
        """Parameters and optimizer state back to θ_t, exactly."""
        if zero3.zero_optimizer(self.optimizer) is not None:
            zero3.zero_restore(self.optimizer, self._backup)
        else:
            restore(self._trainable(), self.optimizer.optimizer, self._backup)
        self._backup = None

    def training_step(self, model, inputs, num_items_in_batch=None):
        if self.is_half_step:
            self.backup()
        elif self.args.egpo_extragradient and self._backup is None:
            raise TrainingError(f"EGPO: step {self.state.global_step + 1} is a full step without its half step (a "
                                "resume from an odd step); save_steps must be even")
        return super().training_step(model, inputs, num_items_in_batch)

    def prepare_update(self) -> None:
        """On a full step the samples came from θ_{t+½}; the gradient is taken at θ_t."""
        if self.args.egpo_extragradient and not self.is_half_step:
            self.restore()


def snapshot(params, optimizer) -> tuple:
    """``params`` and ``optimizer``'s state, copied to the CPU. Under FSDP2 each process copies its own shards (the
    parameters and the Adam moments are DTensors whose local part is this process's rows)."""
    return [p.detach().to("cpu", copy=True) for p in params], _to_cpu(copy.deepcopy(optimizer.state_dict()))


def restore(params, optimizer, saved: tuple) -> None:
    """``params`` and ``optimizer``'s state back to a :func:`snapshot`, bit for bit."""
    values, state = saved
    with torch.no_grad():
        for p, value in zip(params, values, strict=True):
            p.copy_(value.to(p.device))
    optimizer.load_state_dict(state)


def _to_cpu(obj):
    if torch.is_tensor(obj):
        return obj.to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_to_cpu(v) for v in obj]
    return obj
