"""Online preference trainers on one base: online DPO, XPO and EGPO (online IPO with extragradient steps).

One optimizer step, top to bottom (:meth:`OnlinePreferenceTrainer.training_step`):

    prompts (this process's share of the step's batch)
      -> rollout engine: the responses the method needs (``make_pairs``)
      -> preference oracle (rewards/preference.py): P(y ≻ y′ | x), labels or soft targets
      -> one policy forward over every response, reference log-probs without gradient
      -> the objective from the registry (align/objectives) -> backward; the Trainer steps the optimizer

Each response is drawn from its own random stream, keyed by the prompt's row id, the step and its role, so
N processes reproduce one process with the same global batch. The methods differ only in ``make_pairs`` and
the extra loss term:

* :class:`OnlineDPOTrainer`: two policy samples, the oracle's winner is chosen (exact ties carry no label
  and weigh 0), a DPO-family loss (``objective``).
* :class:`XPOTrainer` (Xie et al. 2024, arXiv:2405.21046; docs/methods.md §5): one policy sample y and one reference
  sample ỹ, labelled; loss = pair loss + α·S_θ(ỹ) (exploration: likelihood pushed away from reference samples).
* :class:`align.trainers.egpo.EGPOTrainer`: the extragradient steps of docs/methods.md §6.

Rollouts: the policy's samples come from the engine ``rollout`` names (:func:`align.rollout.build_engine`: hf,
a colocated vLLM or ``align serve``), which is pushed the policy's weights before a generation the way the RL
trainer's is (:class:`align.rollout.WeightSync`: every ``vllm_sync_steps`` optimizer steps; with
``vllm_sync_steps`` > 1 the pairs come from weights up to that many steps old, uncorrected). Only the sampled
token ids are used: the sampling log-probs a vLLM engine returns are ignored, since the loss recomputes every
log-prob with the trainer's policy and reference. Reference samples (XPO) and EGPO's mixture samples need the
reference model and run HF ``generate`` on the live models whatever ``rollout`` says.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass

import torch
from accelerate.utils import gather_object

from align import progress
from align.errors import TrainingError
from align.fsdp2 import gathered
from align.logps import pack, scoring, token_logps
from align.objectives import build
from align.rollout import HFEngine, SamplingParams
from align.tracking import completions_due, log_table
from align.trainers.base import RolloutTrainer, wrap_peft
from align.trainers.online_args import OnlineArguments

# A run stops when every pair of its first TIE_STEPS steps (or of all its steps, if fewer) tied under the oracle:
# tied pairs weigh 0, so the loss is 0 and the run would "train" to the end learning nothing.
TIE_STEPS = 4


@dataclass
class Pairs:
    """One step's responses on this process: ``first[i]`` and ``second[i]`` answer ``prompts[i]``. ``first`` is the
    chosen slot and ``second`` the rejected one (for EGPO just the two positions). ``weights`` scale each pair's
    loss; ``extra`` holds objective inputs such as ``preference_gap``; ``explore`` marks, for XPO, which slot
    holds the reference sample (0 first, 1 second); ``preference``, for labelled pairs, the oracle's
    P(first ≻ second)."""

    prompts: list[list[int]]
    first: list[list[int]]
    second: list[list[int]]
    weights: torch.Tensor
    extra: dict
    explore: torch.Tensor | None = None
    preference: torch.Tensor | None = None


class OnlinePreferenceTrainer(RolloutTrainer):
    method = "online_dpo"
    state_file = "online_state.json"  # the oracle-call counter, saved in every checkpoint
    fsdp2_supported = True  # align/fsdp2.py: sampling and evaluation run gathered, the reference sharded too
    fsdp2_reference_copy = True

    def __init__(self, model, args: OnlineArguments, train_dataset, eval_dataset=None, processing_class=None,
                 oracle=None, ref_model=None, peft_config=None, callbacks=None, engine=None):
        from align.rewards.preference import build_oracle, check_columns

        model = wrap_peft(model, peft_config, args.seed)
        self.oracle = oracle or build_oracle(args.oracle, args.oracle_scale, timeout_s=args.reward_timeout_s)
        for split, ds in (("train", train_dataset), ("eval", eval_dataset)):
            if ds is not None:
                check_columns(self.oracle, ds.column_names, f"{split} dataset")
        super().__init__(model, args, train_dataset, eval_dataset, processing_class, callbacks)
        self.loss_fn = build(args.objective, **args.objective_params())
        self.setup_reference(ref_model)  # by default a frozen copy of the initial policy
        self.setup_rollout(engine)
        # reference samples (XPO) run HF generate on the live reference, whatever engine draws the policy's
        self.hf_engine = self.engine if args.rollout == "hf" else HFEngine(model, processing_class,
                                                                          args.generation_batch_size)
        self.oracle_calls = 0
        self.tied_steps = 0  # steps of this run so far without one preferred pair; None once a pair had a label

    def resume_state(self) -> dict:
        return {"oracle_calls": self.oracle_calls}

    def load_resume_state(self, state: dict) -> None:
        self.oracle_calls = state["oracle_calls"]

    # --- sampling and judging ---------------------------------------------------------------------

    def sample(self, rows: list[dict], role: str, engine=None, temperature: float | None = None,
               reference: bool = False) -> list[list[int]]:
        """One completion per row (token ids), from the policy (or the reference), on its own random stream. The
        policy's samples come from the rollout engine, brought up to the policy first; the reference's, and those of
        an HF ``engine`` passed in (EGPO's mixture), from HF generate on the live models. Token ids only: a vLLM
        engine's sampling log-probs are dropped (the loss computes its own)."""
        a = self.args
        sampling = SamplingParams(max_new_tokens=a.max_completion_length, top_p=a.top_p, top_k=a.top_k, seed=a.seed,
                                  temperature=a.temperature if temperature is None else temperature)
        keys = [f"{r['uid']}|{self.state.global_step}|{role}" for r in rows]
        ctx = nullcontext()
        if engine is None and not reference:
            engine = self.engine
            self.weight_sync(self.policy, self.state.global_step)
            # FSDP2: generation from the whole weights, gathered once, each process its own forwards (align/fsdp2.py)
            whole = gathered(self.policy) if a.rollout == "hf" else nullcontext()
        else:
            whole = gathered(self.policy, self.ref_model) if engine is not None else None  # EGPO's mixture
            model, ctx = self.reference() if reference else (self.policy, nullcontext())
            whole = whole or gathered(model)
            engine = engine or self.hf_engine
            engine.model = model
        with ctx, whole, self.stage(f"sampling {role!r}", len(rows), "completions") as stage:
            out = engine.generate([r["prompt_ids"] for r in rows], [1] * len(rows), sampling, keys)
            stage.finish()
        return out.completion_ids

    def judge(self, rows: list[dict], a: list[list[int]], b: list[list[int]]) -> torch.Tensor:
        """P(a[i] ≻ b[i] | prompt i) from the oracle, over decoded texts; the dataset's columns go along."""
        dec = self.processing_class.batch_decode
        columns = {k: [r[k] for r in rows] for k in rows[0] if k not in ("prompt", "prompt_ids", "uid")}
        with self.stage(f"oracle {self.oracle.name!r}", len(rows), "pairs") as stage:
            p = self.oracle([r["prompt"] for r in rows], dec(a, skip_special_tokens=True),
                            dec(b, skip_special_tokens=True), columns, ids=[r["uid"] for r in rows])
            stage.finish()
        return p

    def stage(self, what: str, total: int, unit: str) -> progress.Bar:
        """The progress bar of one wait of this step (:mod:`align.progress`): this process's rows, so under N
        processes the main process's share, as its description says."""
        share = " (main process's share)" if self.accelerator.num_processes > 1 else ""
        return progress.bar(f"{what} (step {self.state.global_step + 1}){share}", total, unit,
                            show=progress.shown(self.args, self.is_world_process_zero()))

    def labelled(self, rows, y, z, p: torch.Tensor) -> Pairs:
        """The pair (y, z) with the oracle's winner in the chosen slot; exact ties weigh 0."""
        swap = (p < 0.5).tolist()
        first = [b if s else a for a, b, s in zip(y, z, swap, strict=True)]
        second = [a if s else b for a, b, s in zip(y, z, swap, strict=True)]
        weights = (p != 0.5).float()
        return Pairs([r["prompt_ids"] for r in rows], first, second, weights, {},
                     explore=torch.tensor([0 if s else 1 for s in swap]), preference=torch.maximum(p, 1 - p))

    def make_pairs(self, rows: list[dict]) -> Pairs:
        """Online DPO's pairs (methods override this): two policy samples, labelled by the oracle."""
        y, z = self.sample(rows, "a"), self.sample(rows, "b")
        return self.labelled(rows, y, z, self.judge(rows, y, z))

    def check_preferences(self, pairs: Pairs) -> None:
        """A TrainingError when no pair of the run's first :data:`TIE_STEPS` steps (all processes) got a preference:
        the oracle says nothing about these samples, e.g. a constant judge or a column it reads being wrong."""
        if self.tied_steps is None:
            return
        device = self.args.device
        labelled = self.accelerator.reduce((pairs.weights > 0).sum().float().to(device), reduction="sum")
        if labelled.item() > 0:
            self.tied_steps = None
            return
        self.tied_steps += 1
        run_steps = self.state.max_steps - (self.state.global_step + 1 - self.tied_steps)  # steps this run takes
        if self.tied_steps >= min(TIE_STEPS, run_steps):
            per_step = self.accelerator.reduce(torch.tensor(float(len(pairs.first)), device=device), reduction="sum")
            raise TrainingError(
                f"step {self.state.global_step + 1}: the oracle {self.oracle.name!r} gave no preference: every pair of "
                f"this run's first {self.tied_steps} step(s) tied ({int(per_step.item())} pairs a step), so the loss "
                "is 0 and nothing is learned; check the oracle and the dataset columns it reads"
            )

    def log_completions(self, pairs: Pairs) -> None:
        """This step's pairs (every process's) as the ``completions`` table: the prompt, both responses, the
        oracle's P(chosen ≻ rejected) for labelled pairs, the loss weight and any per-pair objective input."""
        dec = self.processing_class.decode
        names = ["chosen", "rejected"] if pairs.preference is not None else ["first", "second"]
        values = {"preference": pairs.preference, "weight": pairs.weights, **pairs.extra}
        values = {k: v.tolist() for k, v in values.items() if torch.is_tensor(v) and v.shape == (len(pairs.first),)}
        local = [[dec(x, skip_special_tokens=True) for x in (pairs.prompts[i], pairs.first[i], pairs.second[i])]
                 + [v[i] for v in values.values()] for i in range(len(pairs.first))]
        step = self.state.global_step + 1
        log_table(self, "completions", ["step", "prompt", *names, *values],
                  [[step, *row] for row in gather_object(local)], step)

    def prepare_update(self) -> None:
        """Called between sampling and the forward/backward of a step (EGPO restores θ_t here)."""

    # --- loss ------------------------------------------------------------------------------------

    def _sequence_logps(self, model, prompts, completions) -> tuple[torch.Tensor, torch.Tensor]:
        ids, attn, cmask, width = pack(prompts, completions, self.pad_id, self.args.device)
        logps = token_logps(model, ids, attn, width, **scoring(self.args))
        return (logps * cmask).sum(-1), cmask.sum(-1).float()

    def pair_loss(self, model, pairs: Pairs) -> tuple[torch.Tensor, dict]:
        """Mean over this process's pairs of weight·objective, plus the method's extra term."""
        n = len(pairs.first)
        prompts, completions = pairs.prompts * 2, pairs.first + pairs.second
        logps, lengths = self._sequence_logps(model, prompts, completions)
        ref_model, ctx = self.reference()
        with torch.no_grad(), ctx:
            ref, _ = self._sequence_logps(ref_model, prompts, completions)
        batch = {"policy_chosen_logps": logps[:n], "policy_rejected_logps": logps[n:],
                 "ref_chosen_logps": ref[:n], "ref_rejected_logps": ref[n:],
                 "chosen_lengths": lengths[:n], "rejected_lengths": lengths[n:], **pairs.extra}
        out = self.loss_fn(batch)
        w = pairs.weights.to(out.losses.device, out.losses.dtype)
        loss = (out.losses * w).mean()
        metrics = {**out.metrics, "completions/mean_length": lengths.mean(), "pairs/labelled": (w > 0).float().mean()}
        extra, extra_metrics = self.extra_loss(batch, pairs)
        metrics.update(extra_metrics)
        return loss + extra, metrics

    def extra_loss(self, batch: dict, pairs: Pairs) -> tuple[torch.Tensor, dict]:
        return torch.zeros((), device=self.args.device), {}

    def training_step(self, model, inputs, num_items_in_batch=None):
        rows = inputs["rows"]
        calls = self.oracle.calls
        pairs = self.make_pairs(rows)
        if completions_due(self.args, self.state.global_step):  # a gather: every process, the same steps
            self.log_completions(pairs)
        self.check_preferences(pairs)
        self.prepare_update()
        model.train()
        loss, metrics = self.pair_loss(model, pairs)
        total = self.accelerator.reduce(loss.detach(), reduction="mean")
        self.check_finite(total, detail=f", prompt ids {[r['uid'] for r in rows]}")
        self.accelerator.backward(loss)
        calls = self.accelerator.reduce(torch.tensor(float(self.oracle.calls - calls), device=self.args.device),
                                        reduction="sum")
        self.oracle_calls += int(calls.item())
        self._record("train", metrics)
        return total

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if not any(k.startswith("eval_") for k in logs):
            logs["oracle/calls"] = float(self.oracle_calls)
        super().log(logs, start_time)

    # --- evaluation: win rate against the reference policy ----------------------------------------

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval") -> dict[str, float]:
        """``eval_win_rate``: P(policy ≻ reference) under the oracle, ``eval_num_samples`` paired samples per eval
        prompt (the same on every process), with the mean completion lengths of both."""
        from align.evaluation import win_rate

        ds = eval_dataset if eval_dataset is not None else self.eval_dataset
        if ds is None:
            return {}
        a = self.args
        ref_model, ctx = self.reference()
        calls = self.oracle.calls
        with gathered(self.policy, self.ref_model):  # FSDP2: each process generates its own share (align/fsdp2.py)
            result = win_rate(self.policy, ref_model, self.processing_class, [ds[i] for i in range(len(ds))],
                              self.oracle, a.eval_num_samples, a.eval_max_new_tokens or a.max_completion_length,
                              a.temperature, a.seed, a.generation_batch_size, baseline_context=ctx,
                              progress=progress.shown(a, self.is_world_process_zero()))
        self.oracle.calls = calls  # evaluation judgements are not training labels
        metrics = {f"{metric_key_prefix}_{k}": float(v) for k, v in result.items()}
        self.log(metrics)
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
        return metrics


class OnlineDPOTrainer(OnlinePreferenceTrainer):
    """Online DPO (Guo et al. 2024, "Direct Language Model Alignment from Online AI Feedback", arXiv:2402.04792):
    two samples per prompt from the current policy, labelled by the oracle, a DPO-family loss."""

    method = "online_dpo"  # the base's sampling and loss, as they are


class XPOTrainer(OnlinePreferenceTrainer):
    """XPO (Xie et al. 2024, arXiv:2405.21046; docs/methods.md §5): y ~ π_θ, ỹ ~ π_ref, labelled by the oracle; loss =
    pair loss + α·S_θ(ỹ), α from ``xpo_alpha`` (per epoch, the last value repeats). Minimising α·S_θ(ỹ) pushes
    likelihood away from the reference's samples."""

    method = "xpo"

    def make_pairs(self, rows):
        y, z = self.sample(rows, "policy"), self.sample(rows, "reference", reference=True)
        return self.labelled(rows, y, z, self.judge(rows, y, z))

    def xpo_alpha(self) -> float:
        schedule = self.args.xpo_alpha
        return float(schedule[min(int(self.state.epoch or 0), len(schedule) - 1)])

    def extra_loss(self, batch, pairs):
        explore = pairs.explore.to(batch["policy_chosen_logps"].device)
        s_ref_sample = torch.where(explore == 0, batch["policy_chosen_logps"], batch["policy_rejected_logps"])
        alpha = self.xpo_alpha()
        return alpha * s_ref_sample.mean(), {"xpo/alpha": torch.tensor(alpha),
                                             "xpo/ref_sample_logps": s_ref_sample.detach().mean()}
