"""Making one RL round: allocation, generation, rewards, advantages, old / reference log-probs.

:meth:`RoundBuilder.make`, top to bottom:

    prompts (the global batch: every process's prompts, gathered)
      -> allocator (``align.sampling.allocators``, by name: uniform | gvm | dynamic): n_i per prompt, and
         the rollout engine (weights pushed first when it holds a copy) generating n_i completions per prompt,
         each group on one process, work balanced (:meth:`RoundBuilder.generate`)
      -> rewards (on the process that generated them), gathered so every process sees all of them
      -> advantages by group id over the whole batch (ragged groups, never reshaped; estimator by name)
      -> old / reference log-probs -> mini-batches

Every choice that must agree across processes (allocation, which process generates which group,
mini-batch membership) is computed identically on every process from gathered data, and each completion's
random stream depends only on the seed, the round and the prompt (the generation ``tag``), so N processes
reproduce one process with the same global batch. The builder owns the engine calls, the rewards, the
per-prompt statistics and the rollouts counter; the trainer only updates on the rounds it makes. Each generation,
GVM's gradient norms and the log-prob pass show a progress bar on the main process (:mod:`align.progress`).
"""

from __future__ import annotations

import re
import statistics
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field

import torch
from accelerate.utils import gather_object

from align import progress
from align.errors import TrainingError
from align.fsdp2 import gathered
from align.logps import pack, scoring, token_logps
from align.microbatch import token_budget_batches
from align.monitors.grad_norm import sequence_grad_norms
from align.monitors.gradients import select_parameters
from align.objectives.advantages import ESTIMATORS
from align.rollout import SamplingParams
from align.sampling import PromptStats
from align.sampling.allocation_log import AllocationLog, allocation_record
from align.sampling.allocators import ALLOCATORS, RoundContext
from align.sampling.shard import assign_groups


@dataclass
class Sample:
    """One rollout. Every process knows every sample's metadata; only its generator holds the tokens."""

    g: int  # group: index of the prompt in the round's prompt list
    k: int  # which completion of its prompt
    owner: int  # process that generated it
    reward: float
    per_fn: dict[str, float]
    length: int
    truncated: bool
    prompt_ids: list[int] | None = None
    completion_ids: list[int] | None = None
    sampling_logps: list[float] | None = None
    advantage: float = 0.0
    minibatch: int = 0
    old_logps: torch.Tensor | None = None
    ref_logps: torch.Tensor | None = None
    grad_norm: float | None = None

    def meta(self) -> Sample:
        """This sample without its tokens (what is sent to the other processes)."""
        return Sample(self.g, self.k, self.owner, self.reward, self.per_fn, self.length, self.truncated,
                      grad_norm=self.grad_norm)


@dataclass
class Round:
    rows: list[dict]
    samples: list[Sample]  # every sample of the round, canonical order (g, k); local ones carry tokens
    metrics: dict[str, float] = field(default_factory=dict)


class RoundBuilder:
    """Turns each round's prompt rows into a :class:`Round` (see the module docstring).

    ``policy()`` gives the policy being trained (unwrapped), ``reference()`` a (model, context) pair that computes
    the reference log-probs, ``step()`` the optimizer step (the weight sync's clock)."""

    def __init__(self, args, accelerator, engine, weight_sync, rewards, tokenizer, dataset, pad_id: int, *,
                 policy: Callable, reference: Callable, step: Callable[[], int]):
        self.args, self.accelerator, self.engine, self.weight_sync = args, accelerator, engine, weight_sync
        self.rewards, self.tokenizer, self.dataset, self.pad_id = rewards, tokenizer, dataset, pad_id
        self.policy, self.reference, self.step = policy, reference, step
        self.allocate = ALLOCATORS.get(args.allocator).fn
        self.advantages = ESTIMATORS.bind(args.advantage, scale_rewards=args.scale_rewards,
                                          accept_threshold=args.accept_threshold)
        if args.allocator == "gvm" or args.grad_norm_monitor_steps:  # a name matching nothing: refused now
            select_parameters(policy(), args.gvm_grad_params)
        self.stats = PromptStats()
        self.rollouts_total = 0
        self.timing = {"generate": 0.0, "sync": 0.0}
        self.show = progress.shown(args, accelerator.is_main_process)  # progress bars on this process
        self.context = RoundContext(args, self.stats, dataset, self.generate, self.estimate)
        self.allocation_log = AllocationLog(args.output_dir) if accelerator.is_main_process else None

    def make(self, local_rows: list[dict], index: int) -> Round:
        """Round ``index`` from this process's prompt rows (gathered first: every process builds the same round)."""
        a = self.args
        rows = gather_object(local_rows)
        before = self.rollouts_total
        allocation = self.allocate(rows, index, self.context)
        if self.allocation_log is not None:  # before the monitor below re-measures p_i, G_i (allocation.jsonl)
            self.allocation_log.append(allocation_record(index, self.step() + 1, a.num_generations * len(rows),
                                                         self.rollouts_total - before, allocation.rows,
                                                         allocation.counts, allocation.samples, self.stats))
        rows, counts, samples = allocation.rows, allocation.counts, allocation.samples
        metrics = dict(allocation.metrics)
        metrics.update(round_metrics(counts, samples))
        if a.grad_norm_monitor_steps and index % a.grad_norm_monitor_steps == 0:
            metrics.update(self.estimate(rows, samples, index, "grad_norm"))
        metrics["rollouts/round"] = float(self.rollouts_total - before)
        self._assign(samples, index)
        self._precompute_logps([s for s in samples if s.completion_ids is not None], index)
        return Round(rows, samples, metrics)

    # --- generation and rewards -------------------------------------------------------------------

    def sampling(self, temperature: float | None = None, max_new_tokens: int | None = None) -> SamplingParams:
        a = self.args
        return SamplingParams(max_new_tokens=max_new_tokens or a.max_completion_length,
                              temperature=a.temperature if temperature is None else temperature,
                              top_p=a.top_p, top_k=a.top_k, seed=a.seed)

    def generate(self, rows: list[dict], counts: list[int], tag: str, sampling: SamplingParams | None = None,
                 k_offset: int = 0) -> list[Sample]:
        """``counts[i]`` scored completions of ``rows[i]``, generated where :func:`assign_groups` puts each
        group; returns every sample (metadata for all, tokens for this process's), canonical order."""
        rank, world = self.accelerator.process_index, self.accelerator.num_processes
        costs = [n * (len(r["prompt_ids"]) + self.args.max_completion_length) for r, n in zip(rows, counts)]
        owners = assign_groups(costs, world)
        mine = [i for i, n in enumerate(counts) if n > 0 and owners[i] == rank]
        self.timing["sync"] += self.weight_sync(self.policy(), self.step())
        stage = progress.bar(stage_name(tag), sum(counts), "completions", show=self.show,
                             groups=[counts[i] for i in mine], groups_total=sum(n > 0 for n in counts))
        # FSDP2: the HF engine generates from the whole weights, gathered once for the generation, so each process
        # runs as many forwards as its own groups need (align/fsdp2.py)
        whole = gathered(self.policy()) if getattr(self.args, "rollout", "hf") == "hf" else nullcontext()
        with stage, whole:  # the HF engine ticks it per batch; the other processes' shares come in with the gather
            start = time.perf_counter()
            out = self.engine.generate([rows[i]["prompt_ids"] for i in mine], [counts[i] for i in mine],
                                       sampling or self.sampling(), keys=[f"{tag}:{rows[i]['uid']}" for i in mine])
            if not tag.startswith("eval"):
                self.timing["generate"] += time.perf_counter() - start
            stage.reach(len(out))
            local = [Sample(mine[pi], k + k_offset, rank, 0.0, {}, len(c), fin == "length",
                            rows[mine[pi]]["prompt_ids"], c, lp)
                     for pi, k, c, fin, lp in zip(out.prompt_index, out.sample_index, out.completion_ids,
                                                  out.finish_reason, out.sampling_logps)]
            error = self._score(rows, local)
            everything = gather_object([(error, [s.meta() for s in local])])
            stage.finish()
        errors = [e for e, _ in everything if e]
        if errors:
            raise TrainingError(errors[0])
        self.rollouts_total += sum(counts)
        by_key = {(s.g, s.k): s for s in local}
        merged = [by_key.get((m.g, m.k), m) for _, metas in everything for m in metas]
        return sorted(merged, key=lambda s: (s.g, s.k))

    def _score(self, rows: list[dict], local: list[Sample]) -> str | None:
        """Fill in the rewards of this process's samples; the error message instead of raising, so every
        process reaches the gather and stops together."""
        if not local:
            return None
        texts = self.tokenizer.batch_decode([s.completion_ids for s in local], skip_special_tokens=True)
        prompts = [rows[s.g]["prompt"] for s in local]
        completions = [t if isinstance(p, str) else [{"role": "assistant", "content": t}]
                       for t, p in zip(texts, prompts)]
        skip = {"prompt", "prompt_ids"}
        columns = {c: [rows[s.g][c] for s in local] for c in rows[0] if c not in skip}
        try:
            total, per_fn, errors = self.rewards(prompts, completions, [rows[s.g]["uid"] for s in local],
                                                 [s.length for s in local], columns)
        except TrainingError as err:
            return str(err)
        for j, s in enumerate(local):
            s.reward = float(total[j])
            s.per_fn = {name: float(v[j]) for name, v in per_fn.items()}
            s.per_fn.update({f"{name}/errors": float(n) / len(local) for name, n in errors.items() if n})
        return None

    def completions_table(self, rnd: Round, step: int) -> tuple[list[str], list[list]]:
        """The round's samples as table rows, canonical order: ``step``, the prompt and completion as text, the
        total reward, each reward function's, the advantage. A collective: each process decodes its own samples."""
        dec = self.tokenizer.decode
        texts = dict(gather_object([((s.g, s.k), dec(s.completion_ids, skip_special_tokens=True))
                                    for s in rnd.samples if s.completion_ids is not None]))
        prompts = {g: dec(rnd.rows[g]["prompt_ids"], skip_special_tokens=True) for g in {s.g for s in rnd.samples}}
        names = sorted({k for s in rnd.samples for k in s.per_fn if not k.endswith("/errors")})
        rows = [[step, prompts[s.g], texts.get((s.g, s.k), ""), s.reward, *(s.per_fn.get(n, 0.0) for n in names),
                 s.advantage] for s in rnd.samples]
        return ["step", "prompt", "completion", "reward", *names, "advantage"], rows

    # --- per-prompt estimates (GVM, the gradient-norm monitor) ------------------------------------

    def estimate(self, rows: list[dict], samples: list[Sample], index: int, prefix: str) -> dict[str, float]:
        """p_i and G_i of every prompt with samples (docs/methods.md §13.3), written to the prompt-stats store that GVM
        allocates from: p_i = accepted / generated; G_i = mean ‖∇ S_θ(y)‖ over the accepted samples on
        ``gvm_grad_params`` (0 with none accepted). Each process measures its own samples; gathered. The GVM
        estimation stage and the per-prompt gradient-norm monitor (``grad_norm_monitor_steps``) both call this;
        returns the ``<prefix>/*`` metrics."""
        accepted = [s for s in samples if s.completion_ids is not None and s.reward > self.args.accept_threshold]
        name = {"gvm": "GVM estimation: gradient norms", "grad_norm": "gradient-norm monitor"}.get(prefix, prefix)
        with progress.bar(f"{name} (round {index})", sum(s.reward > self.args.accept_threshold for s in samples),
                          "samples", show=self.show) as stage:  # ticked per sequence by sequence_grad_norms
            policy = self.policy()
            with gathered(policy):  # FSDP2: whole gradients against the gathered weights, any count per process
                params = [p for _, p in select_parameters(policy, self.args.gvm_grad_params)]
                norms = sequence_grad_norms(policy, [s.prompt_ids for s in accepted],
                                            [s.completion_ids for s in accepted], self.pad_id, params,
                                            block_size=self.args.logits_block_size)
            found = dict(gather_object([((s.g, s.k), n) for s, n in zip(accepted, norms)]))
            stage.finish()
        groups: dict[int, list[Sample]] = {}
        for s in samples:
            groups.setdefault(s.g, []).append(s)
        measured = []
        for g, group in sorted(groups.items()):
            ok = [found[(s.g, s.k)] for s in group if (s.g, s.k) in found]
            grad_norm = sum(ok) / len(ok) if ok else 0.0
            self.stats.update(rows[g]["uid"], index, accept_rate=len(ok) / len(group), grad_norm=grad_norm,
                              n_samples=len(group))
            if ok:
                measured.append(grad_norm)
        metrics: dict[str, float] = {}
        if measured:
            metrics.update({f"{prefix}/G_median": statistics.median(measured), f"{prefix}/G_min": min(measured),
                            f"{prefix}/G_mean": statistics.fmean(measured), f"{prefix}/G_max": max(measured)})
        metrics[f"{prefix}/prompts_measured"] = float(len(measured))
        return metrics

    # --- advantages, mini-batches, old / reference log-probs --------------------------------------

    def _assign(self, samples: list[Sample], index: int) -> None:
        """Advantages over the whole batch by group id, and each sample's mini-batch (same on every process)."""
        a = self.args
        adv = self.advantages([s.reward for s in samples], [s.g for s in samples])
        order = torch.randperm(len(samples), generator=torch.Generator().manual_seed(a.seed * 7919 + index)).tolist()
        for pos, j in enumerate(order):
            samples[j].minibatch = pos % a.num_minibatches
        for s, v in zip(samples, adv.tolist()):
            s.advantage = v

    @torch.no_grad()
    def _precompute_logps(self, local: list[Sample], index: int) -> None:
        """Old log-probs of the samples the policy moves under before their use, and reference log-probs
        (β > 0). With one iteration, mini-batch 0 is used on the very weights that generated it, so its old
        log-probs are the live ones detached (what a stored copy would hold, without the extra forward).
        Forwards run on micro-batches of at most ``max_tokens_per_micro_batch`` padded tokens and
        ``micro_batch_size`` samples, samples of similar length together
        (:func:`align.microbatch.token_budget_batches`)."""
        a = self.args
        policy = self.policy()
        old = [s for s in local if a.updates_per_round > 1 and (a.num_iterations > 1 or s.minibatch > 0)]
        passes = [(old, "old_logps", lambda *batch: token_logps(policy, *batch, **scoring(a)))]
        if a.beta:
            passes.append((local, "ref_logps", self._ref_logps))
        share = " (main process's share)" if self.accelerator.num_processes > 1 else ""  # no gather follows
        stage = progress.bar(f"old/reference log-probs (round {index}){share}", sum(len(p[0]) for p in passes),
                             "samples", show=self.show)
        was_training = policy.training
        policy.eval()
        reference = self.reference()[0] if a.beta else None
        try:
            with gathered(policy, None if reference is policy else reference):  # FSDP2: each process its own count
                for samples, attr, fn in passes:
                    sizes = [(len(s.prompt_ids), len(s.completion_ids)) for s in samples]
                    for batch in token_budget_batches(sizes, a.max_tokens_per_micro_batch,
                                                      max_items=a.micro_batch_size):
                        chunk = [samples[j] for j in batch]
                        ids, attn, _, width = pack([s.prompt_ids for s in chunk], [s.completion_ids for s in chunk],
                                                   self.pad_id, a.device)
                        for s, row in zip(chunk, fn(ids, attn, width)):
                            setattr(s, attr, row[: s.length].cpu())
                        stage.advance(len(batch))
        finally:
            policy.train(was_training)
            stage.close()

    def _ref_logps(self, ids, attn, width) -> torch.Tensor:
        model, context = self.reference()
        with context:
            return token_logps(model, ids, attn, width, **scoring(self.args))


def stage_name(tag: str) -> str:
    """The progress bar's name of a generation by its ``tag``: ``r3`` (round 3's rollouts), ``r3x1`` (dynamic
    sampling's first refill), ``e3`` (GVM's estimation samples), ``eval`` / ``evalsampled_`` (evaluation)."""
    if tag.startswith("eval"):
        return "evaluation (sampled)" if "sampled" in tag else "evaluation (greedy)"
    found = re.fullmatch(r"([re])(\d+)(?:x(\d+))?", tag)
    if found is None:
        return f"generation ({tag})"
    kind, index, refill = found.groups()
    name = "rollouts" if kind == "r" else "GVM estimation: samples"
    return f"{name} (round {index}{f', refill {refill}' if refill else ''})"


def round_metrics(counts: list[int], samples: list[Sample]) -> dict[str, float]:
    """The round's reward, length and allocation metrics (the same on every process)."""
    rewards = torch.tensor([s.reward for s in samples])
    groups: dict[int, list[float]] = {}
    for s in samples:
        groups.setdefault(s.g, []).append(s.reward)
    live = [n for n in counts if n > 0]
    out = {
        "reward": rewards.mean().item(), "reward_std": rewards.std().item() if len(samples) > 1 else 0.0,
        "frac_reward_zero_std": sum(max(v) - min(v) < 1e-12 for v in groups.values()) / max(len(groups), 1),
        "completions/mean_length": statistics.fmean(s.length for s in samples),
        "completions/clipped_ratio": sum(s.truncated for s in samples) / len(samples),
        "allocation/min": float(min(live)), "allocation/median": float(statistics.median(live)),
        "allocation/max": float(max(live)), "allocation/prompts_dropped": float(sum(n == 0 for n in counts)),
    }
    names = sorted({k for s in samples for k in s.per_fn})
    for name in names:
        vals = torch.tensor([s.per_fn.get(name, 0.0) for s in samples])
        if name.endswith("/errors"):
            out[f"rewards/{name}"] = vals.sum().item()
            continue
        out[f"rewards/{name}/mean"] = vals.mean().item()
        out[f"rewards/{name}/std"] = vals.std().item() if len(vals) > 1 else 0.0
    return out
