"""RLTrainer: the RL loop with ragged groups (GRPO, Dr.GRPO, DAPO, RAFT / RAFT++, GVM, dynamic sampling).

Make a round, update on it (:meth:`RLTrainer.training_step`): at the first optimizer step of each round the
:class:`~align.trainers.rounds.RoundBuilder` turns the round's prompts into rollouts with rewards, advantages
and old / reference log-probs (allocation, generation and scoring are its business); then
``num_minibatches x num_iterations`` optimizer steps update on that round (:meth:`RLTrainer._update`), each one
``transformers.Trainer`` step, so checkpointing, resume, schedulers and logging are the Trainer's. The loss
normalisers are computed identically on every process from gathered counts, so N processes reproduce one
process with the same global batch.
"""

from __future__ import annotations

import math
import statistics
import time
from contextlib import nullcontext

import torch

from align.logps import pack, scoring, token_logps
from align.microbatch import longest_first
from align.objectives.policy import AGGREGATIONS, TOKEN_LOSSES, policy_loss, truncated_is_weights
from align.sampling import PromptStats
from align.tracking import completions_due, log_table
from align.trainers.base import RolloutTrainer, wrap_peft
from align.trainers.rl_args import RLArguments
from align.trainers.rounds import Round, RoundBuilder, Sample


class RLTrainer(RolloutTrainer):
    state_file = "rl_state.json"  # rollouts so far and the prompt statistics, saved in every checkpoint
    fsdp2_supported = True  # align/fsdp2.py: generation and the per-process passes run gathered (RoundBuilder)

    def wants_reference_copy(self, args) -> bool:
        return bool(args.beta)  # the KL term's reference: a frozen copy, sharded, gathered with the policy
    batch_unit = "round"

    def __init__(self, model, args: RLArguments, train_dataset, eval_dataset=None, processing_class=None,
                 reward_set=None, ref_model=None, peft_config=None, callbacks=None, engine=None):
        from align.rewards.registry import RewardSet

        model = wrap_peft(model, peft_config, args.seed)
        self.rewards = reward_set or RewardSet.from_config(args)
        self.rewards.check_columns(train_dataset.column_names, "train dataset")
        if eval_dataset is not None:
            self.rewards.check_columns(eval_dataset.column_names, "eval dataset")
        super().__init__(model, args, train_dataset, eval_dataset, processing_class, callbacks)
        self.setup_rollout(engine)
        self._train_start: float | None = None
        self.setup_reference(ref_model, needed=bool(args.beta))
        self.rounds = RoundBuilder(args, self.accelerator, self.engine, self.weight_sync, self.rewards,
                                   self.processing_class, self.train_dataset, self.pad_id, policy=lambda: self.policy,
                                   reference=self.reference, step=lambda: self.state.global_step)
        self._round: Round | None = None

    @property
    def batch_repeats(self) -> int:
        return self.args.updates_per_round

    @property
    def stats(self) -> PromptStats:
        """The per-prompt statistics (p_i, G_i, ...) the round builder keeps."""
        return self.rounds.stats

    @property
    def rollouts_total(self) -> int:
        """Training rollouts generated so far (kept across resume)."""
        return self.rounds.rollouts_total

    @rollouts_total.setter
    def rollouts_total(self, value: int) -> None:
        self.rounds.rollouts_total = value

    # --- state kept across resume -----------------------------------------------------------------

    def resume_state(self) -> dict:
        return {"rollouts_total": self.rollouts_total, "prompt_stats": self.stats.state_dict()}

    def load_resume_state(self, state: dict) -> None:
        self.rollouts_total = state["rollouts_total"]
        self.stats.load_state_dict(state["prompt_stats"])

    def train(self, resume_from_checkpoint=None, *args, **kwargs):
        self._train_start = time.perf_counter()
        return super().train(resume_from_checkpoint, *args, **kwargs)

    # --- one optimizer step -----------------------------------------------------------------------

    def training_step(self, model, inputs, num_items_in_batch=None):
        position = self.state.global_step % self.args.updates_per_round
        if self._round is None or position == 0:
            index = self.state.global_step // self.args.updates_per_round
            self._round = self.rounds.make(inputs["rows"], index)
            self.record_global("train", self._round.metrics)
            if completions_due(self.args, index):  # a gather: every process, the same rounds
                step = self.state.global_step + 1
                log_table(self, "completions", *self.rounds.completions_table(self._round, step), step)
        loss = self._update(model, self._round, position % self.args.num_minibatches)
        if position == self.args.updates_per_round - 1:
            self._round = None
        return loss

    def _update(self, model, rnd: Round, minibatch: int) -> torch.Tensor:
        """Forward/backward of one mini-batch in micro-batches; every process runs the same number of
        micro-batches (padding with zero-weight ones), so DDP, FSDP and ZeRO-3 collectives line up; one optimizer
        update after the last (:meth:`_backward`)."""
        a = self.args
        rank, world = self.accelerator.process_index, self.accelerator.num_processes
        members = [s for s in rnd.samples if s.minibatch == minibatch]
        mask_of = {id(s): (not (a.mask_truncated_completions and s.truncated)) for s in members}
        norm = {"num_sequences": float(len(members)),
                "num_tokens": float(max(sum(s.length for s in members if mask_of[id(s)]), 1)),
                "max_completion_length": a.max_completion_length}
        per_rank = [sum(s.owner == r for s in members) for r in range(world)]
        micro_counts = [math.ceil(n / a.micro_batch_size) for n in per_rank]
        steps = max(max(micro_counts), 1)
        local = [s for s in members if s.owner == rank]
        scale = float(world)
        if AGGREGATIONS.get(a.loss_type).info.get("per_micro_batch"):  # bnpo: averaged over every micro-batch
            scale /= max(sum(micro_counts), 1)
        else:  # a sum over micro-batches with whole-batch constants: grouping by length changes no number
            local = [local[j] for j in longest_first([(len(s.prompt_ids), s.length) for s in local])]
        model.train()
        total = torch.zeros((), device=a.device)
        sums: dict[str, float] = {}
        tokens = 0.0
        for j in range(steps):
            chunk = local[j * a.micro_batch_size : (j + 1) * a.micro_batch_size]
            weight = 1.0 if chunk else 0.0
            chunk = chunk or [self._dummy(rnd)]
            ctx = self.accelerator.no_sync(model) if j < steps - 1 else nullcontext()
            with ctx:
                loss, metrics, n_tok = self._micro_loss(model, chunk, mask_of, norm)
                self._backward(model, loss * (scale * weight), last=j == steps - 1)
            if weight:
                total += loss.detach() * (scale / world)
                tokens += n_tok
                for k, v in metrics.items():
                    sums[k] = sums.get(k, 0.0) + float(v) * n_tok
        packed = torch.tensor([tokens, *(sums.get(k, 0.0) for k in self._step_keys())], device=a.device)
        packed = self.accelerator.reduce(packed, reduction="sum")
        total = self.accelerator.reduce(total, reduction="sum")
        self.check_finite(total)
        n = max(packed[0].item(), 1.0)
        self.record_global("train", {k: v / n for k, v in zip(self._step_keys(), packed[1:].tolist())})
        return total

    def _backward(self, model, loss: torch.Tensor, last: bool) -> None:
        """``accelerator.backward``, except before the last micro-batch under DeepSpeed: accelerate's backward steps
        the engine (an optimizer update) after every call, so the others go through the engine's own backward with
        the gradient-accumulation boundary off (the gradients add up, nothing is updated)."""
        if not last and hasattr(model, "set_gradient_accumulation_boundary"):
            model.set_gradient_accumulation_boundary(False)
            model.backward(loss)
            return
        self.accelerator.backward(loss)

    def _step_keys(self) -> tuple[str, ...]:
        keys = ["entropy"]
        keys += TOKEN_LOSSES.get(self.args.policy_loss).info.get("metrics", ())
        if self.args.beta:
            keys.append("kl")
        if self.args.rollout != "hf":
            keys += ["rollout/logp_gap", "rollout/is_weight", "rollout/is_clipped"]
        return tuple(keys)

    def _dummy(self, rnd: Round) -> Sample:
        """A one-token stand-in for a process with no sample in a micro-batch slot (its loss weighs 0)."""
        s = Sample(0, 0, self.accelerator.process_index, 0.0, {}, 1, False, rnd.rows[0]["prompt_ids"], [self.pad_id])
        s.old_logps = torch.zeros(1)
        s.ref_logps = torch.zeros(1)
        s.sampling_logps = [0.0]
        return s

    def _micro_loss(self, model, chunk: list[Sample], mask_of: dict, norm: dict):
        a = self.args
        ids, attn, cmask, width = pack([s.prompt_ids for s in chunk], [s.completion_ids for s in chunk], self.pad_id,
                                       a.device)
        logps, entropy = token_logps(model, ids, attn, width, with_entropy=True, **scoring(a))
        mask = cmask & torch.tensor([mask_of.get(id(s), True) for s in chunk], device=a.device)[:, None]

        def stacked(attr):
            rows = [getattr(s, attr) for s in chunk]
            if any(r is None for r in rows):
                return None
            out = torch.zeros_like(logps)
            for b, r in enumerate(rows):
                out[b, : len(r)] = torch.as_tensor(r, dtype=out.dtype).to(out.device)
            return out

        adv = torch.tensor([s.advantage for s in chunk], device=a.device)
        old = stacked("old_logps")
        is_weights, is_metrics = None, {}
        if a.rollout != "hf":  # another engine sampled: correct by min(π_old / π_sampler, cap) per token
            is_weights, is_metrics = truncated_is_weights(logps.detach() if old is None else old,
                                                          stacked("sampling_logps"), cmask, a.vllm_is_cap)
        loss, metrics = policy_loss(logps, adv, mask, old_logps=old, ref_logps=stacked("ref_logps"),
                                    policy=a.policy_loss, epsilon=a.epsilon, epsilon_high=a.epsilon_high, beta=a.beta,
                                    loss_type=a.loss_type, is_weights=is_weights, kl_estimator=a.kl_estimator, **norm)
        metrics.update(is_metrics)
        n_tok = float(cmask.sum())
        metrics["entropy"] = (entropy * cmask).sum() / max(n_tok, 1.0)
        return loss, metrics, n_tok

    # --- logging and evaluation -------------------------------------------------------------------

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if not any(k.startswith("eval_") for k in logs):
            logs["rollouts/total"] = float(self.rollouts_total)
            if self._train_start is not None:  # shares of the training wall time so far
                wall = max(time.perf_counter() - self._train_start, 1e-9)
                for k, v in self.rounds.timing.items():
                    logs[f"timing/{k}"] = v / wall
                    logs[f"timing/{k}_s"] = v
        super().log(logs, start_time)

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval") -> dict[str, float]:
        """Every eval prompt scored by the reward functions, greedy (``eval_reward``, ``eval_rewards/<name>``)
        and, with ``eval_num_samples`` k > 0, sampled k times at the training temperature (``eval_sampled_*``:
        mean@k, the GVM paper's metric). With the testbed's ``accuracy`` reward these are held-out accuracy."""
        ds = eval_dataset if eval_dataset is not None else self.eval_dataset
        if ds is None:
            return {}
        rows = [ds[i] for i in range(len(ds))]
        saved = self.rollouts_total
        p = metric_key_prefix
        metrics: dict[str, float] = {}
        runs = [("", 1, self.rounds.sampling(temperature=0.0, max_new_tokens=self.args.eval_max_new_tokens))]
        if self.args.eval_num_samples:
            runs.append(("sampled_", self.args.eval_num_samples,
                         self.rounds.sampling(max_new_tokens=self.args.eval_max_new_tokens)))
        for name, k, sampling in runs:
            samples = self.rounds.generate(rows, [k] * len(rows), f"eval{name}", sampling)
            metrics[f"{p}_{name}reward"] = statistics.fmean(s.reward for s in samples)
            metrics[f"{p}_{name}completion_length"] = statistics.fmean(s.length for s in samples)
            for fn in sorted({key for s in samples for key in s.per_fn if not key.endswith("/errors")}):
                metrics[f"{p}_{name}rewards/{fn}"] = statistics.fmean(s.per_fn[fn] for s in samples)
        self.rollouts_total = saved  # evaluation rollouts are not training rollouts
        self.log(metrics)
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
        return metrics
