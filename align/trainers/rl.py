"""RLTrainer: the RL loop with ragged groups (GRPO, Dr.GRPO, DAPO, RAFT / RAFT++, GVM, dynamic sampling).

One round, top to bottom (:meth:`RLTrainer._make_round`):

    prompts (the global batch: every process's prompts, gathered)
      -> allocator: n_i per prompt (uniform | gvm: estimate p_i, G_i, then METHODS §13.2 | dynamic)
      -> rollout engine (rollout: hf | vllm | vllm-server; weights pushed first when the engine holds a copy):
         n_i completions per prompt, each group on one process, work balanced
      -> rewards (on the process that generated them), gathered so every process sees all of them
      -> advantages by group id over the whole batch (ragged groups, never reshaped)
      -> old / reference log-probs -> mini-batches
then ``num_minibatches x num_iterations`` optimizer steps on that round (:meth:`RLTrainer._update`),
each one ``transformers.Trainer`` step, so checkpointing, resume, schedulers and logging are the
Trainer's. Every choice that must agree across processes (allocation, which process generates which
group, mini-batch membership, loss normalisers) is computed identically on every process from gathered
data, and each completion's random stream depends only on the seed, the round and the prompt, so N
processes reproduce one process with the same global batch.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os
import statistics
import time
from contextlib import nullcontext
from dataclasses import dataclass, field

import torch
from transformers import Trainer, TrainerCallback, TrainingArguments

from align.args import CPUSaneDefaults, world_size
from align.errors import TrainingError
from align.objectives.advantages import group_advantages, raft_advantages
from align.objectives.policy import policy_loss, truncated_is_weights
from align.rollout import SamplingParams, WeightSync, build_engine
from align.sampling import PromptStats, gvm_allocate, nonzero_variance_groups
from align.sampling.shard import assign_groups
from align.logps import pack, token_logps
from align.trainers.metric_log import MetricsMixin
from align.trainers.rl_args import RLArguments

logger = logging.getLogger(__name__)
STATE_FILE = "rl_state.json"


@dataclass
class RLConfig(RLArguments, CPUSaneDefaults, TrainingArguments):
    """Standalone config for :class:`RLTrainer` (recipes add model and data keys on top)."""

    def __post_init__(self):
        super().__post_init__()
        self.validate_rl(world_size())


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


class RepeatRoundSampler(torch.utils.data.Sampler):
    """Shuffled prompt indices, each global prompt batch repeated once per optimizer step of its round, so
    every process's dataloader hands it the same prompts for the whole round (incomplete batches dropped)."""

    def __init__(self, num_rows: int, global_batch: int, repeats: int, seed: int):
        self.num_rows, self.global_batch, self.repeats, self.seed, self.epoch = num_rows, global_batch, repeats, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return (self.num_rows // self.global_batch) * self.global_batch * self.repeats

    def __iter__(self):
        order = torch.randperm(self.num_rows, generator=torch.Generator().manual_seed(self.seed + self.epoch)).tolist()
        for s in range(0, self.num_rows - self.global_batch + 1, self.global_batch):
            for _ in range(self.repeats):
                yield from order[s : s + self.global_batch]


def _rows(batch: list[dict]) -> dict:
    return {"rows": batch}


class _SaveState(TrainerCallback):
    """Writes the trainer's own resume state (``trainer.save_rl_state``) into every checkpoint, as
    ``trainer.state_file``."""

    def __init__(self, trainer):
        self.trainer = trainer

    def on_save(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            path = os.path.join(args.output_dir, f"checkpoint-{state.global_step}", self.trainer.state_file)
            self.trainer.save_rl_state(path)


class RLTrainer(MetricsMixin, Trainer):
    state_file = STATE_FILE
    def __init__(self, model, args: RLArguments, train_dataset, eval_dataset=None, processing_class=None,
                 reward_set=None, ref_model=None, peft_config=None, callbacks=None, engine=None):
        from align.data.prompts import tokenize_prompts
        from align.rewards.registry import RewardSet

        if peft_config is not None:
            from peft import get_peft_model
            from transformers import set_seed

            set_seed(args.seed)
            model = get_peft_model(model, peft_config)
        tok = processing_class
        options = {"max_completion_length": args.max_completion_length,
                   "overlong_cache_length": args.overlong_cache_length}
        self.rewards = reward_set or RewardSet(args.reward_funcs, args.reward_weights, options, args.on_reward_error)
        self.rewards.check_columns(train_dataset.column_names, "train dataset")
        if "prompt_ids" not in train_dataset.column_names:
            train_dataset = tokenize_prompts(train_dataset, tok, args.max_prompt_length, "train")
        if eval_dataset is not None:
            self.rewards.check_columns(eval_dataset.column_names, "eval dataset")
            if "prompt_ids" not in eval_dataset.column_names:
                eval_dataset = tokenize_prompts(eval_dataset, tok, args.max_prompt_length, "eval")
        super().__init__(model=model, args=args, data_collator=_rows, train_dataset=train_dataset,
                         eval_dataset=eval_dataset, processing_class=tok, callbacks=callbacks)
        world = self.accelerator.num_processes
        if len(train_dataset) < args.per_device_train_batch_size * world:
            need = args.per_device_train_batch_size * world
            raise TrainingError(f"train dataset: {len(train_dataset)} prompts, fewer than one round needs "
                                f"(per_device_train_batch_size x processes = {need})")
        self.pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        self.is_peft = hasattr(model, "disable_adapter")
        self.engine = engine or build_engine(args, model, tok, is_main=self.accelerator.is_main_process)
        self.weight_sync = WeightSync(self.engine, args.rollout, args.vllm_sync_steps, self.accelerator)
        self.timing = {"generate": 0.0, "sync": 0.0}
        self._train_start: float | None = None
        self.grad_params = None
        if args.allocator == "gvm" or args.grad_norm_monitor_steps:
            from align.monitors.grad_norm import select_parameters

            self.grad_params = [p for _, p in select_parameters(model, args.gvm_grad_params)]
        if args.beta and ref_model is None and not self.is_peft:
            ref_model = copy.deepcopy(model)
        if ref_model is not None:
            ref_model.requires_grad_(False).eval().to(self.args.device)
        self.ref_model = ref_model
        self.stats = PromptStats()
        self.rollouts_total = 0
        self._round: Round | None = None
        self._init_metrics()
        self.add_callback(_SaveState(self))

    # --- data order -------------------------------------------------------------------------------

    def _get_train_sampler(self, train_dataset=None):
        ds = train_dataset if train_dataset is not None else self.train_dataset
        batch = self.args.per_device_train_batch_size * self.accelerator.num_processes
        seed = self.args.data_seed if self.args.data_seed is not None else self.args.seed
        return RepeatRoundSampler(len(ds), batch, self.args.updates_per_round, seed)

    def floating_point_ops(self, inputs) -> int:
        return 0

    # --- state kept across resume -----------------------------------------------------------------

    def save_rl_state(self, path: str) -> None:
        tmp = path + ".tmp"
        with open(tmp, "w", encoding="utf-8") as fh:
            json.dump({"rollouts_total": self.rollouts_total, "prompt_stats": self.stats.state_dict()}, fh)
        os.replace(tmp, path)

    def train(self, resume_from_checkpoint=None, **kwargs):
        if isinstance(resume_from_checkpoint, str):
            path = os.path.join(resume_from_checkpoint, STATE_FILE)
            if os.path.isfile(path):
                with open(path, encoding="utf-8") as fh:
                    state = json.load(fh)
                self.rollouts_total = state["rollouts_total"]
                self.stats.load_state_dict(state["prompt_stats"])
        self._train_start = time.perf_counter()
        return super().train(resume_from_checkpoint=resume_from_checkpoint, **kwargs)

    def close(self) -> None:
        """Release the rollout engine (a colocated vLLM's memory); the trainer cannot generate after this."""
        self.engine.close()

    # --- one round --------------------------------------------------------------------------------

    @property
    def _policy(self):
        return self.accelerator.unwrap_model(self.model)

    def _sampling(self, temperature: float | None = None, max_new_tokens: int | None = None) -> SamplingParams:
        a = self.args
        return SamplingParams(max_new_tokens=max_new_tokens or a.max_completion_length,
                              temperature=a.temperature if temperature is None else temperature,
                              top_p=a.top_p, top_k=a.top_k, seed=a.seed)

    def _generate_scored(self, rows: list[dict], counts: list[int], tag: str, sampling: SamplingParams | None = None,
                         k_offset: int = 0) -> list[Sample]:
        """``counts[i]`` scored completions of ``rows[i]``, generated where :func:`assign_groups` puts each
        group; returns every sample (metadata for all, tokens for this process's), canonical order."""
        from accelerate.utils import gather_object

        rank, world = self.accelerator.process_index, self.accelerator.num_processes
        costs = [n * (len(r["prompt_ids"]) + self.args.max_completion_length) for r, n in zip(rows, counts)]
        owners = assign_groups(costs, world)
        mine = [i for i, n in enumerate(counts) if n > 0 and owners[i] == rank]
        self.timing["sync"] += self.weight_sync(self._policy, self.state.global_step)
        start = time.perf_counter()
        out = self.engine.generate([rows[i]["prompt_ids"] for i in mine], [counts[i] for i in mine],
                                   sampling or self._sampling(), keys=[f"{tag}:{rows[i]['uid']}" for i in mine])
        if not tag.startswith("eval"):
            self.timing["generate"] += time.perf_counter() - start
        local = [Sample(mine[pi], k + k_offset, rank, 0.0, {}, len(c), fin == "length", rows[mine[pi]]["prompt_ids"],
                        c, lp)
                 for pi, k, c, fin, lp in zip(out.prompt_index, out.sample_index, out.completion_ids,
                                              out.finish_reason, out.sampling_logps)]
        error = self._score(rows, local)
        everything = gather_object([(error, [s.meta() for s in local])])
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
        tok = self.processing_class
        texts = tok.batch_decode([s.completion_ids for s in local], skip_special_tokens=True)
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

    def _make_round(self, local_rows: list[dict]) -> Round:
        from accelerate.utils import gather_object

        a = self.args
        rows = gather_object(local_rows)
        index = self.state.global_step // a.updates_per_round
        tag = f"r{index}"
        metrics: dict[str, float] = {}
        before = self.rollouts_total
        if a.allocator == "gvm":
            counts, reused = self._gvm_allocation(rows, index, metrics)
            have = [0] * len(rows)
            for s in reused:
                have[s.g] += 1
            samples = reused + self._generate_scored(rows, [max(n - h, 0) for n, h in zip(counts, have)], tag,
                                                     k_offset=a.gvm_samples)
            samples.sort(key=lambda s: (s.g, s.k))
        elif a.allocator == "dynamic":
            rows, counts, samples = self._dynamic(rows, index, metrics)
        else:
            counts = [a.num_generations] * len(rows)
            samples = self._generate_scored(rows, counts, tag)
        metrics.update(self._round_metrics(rows, counts, samples))
        if a.grad_norm_monitor_steps and index % a.grad_norm_monitor_steps == 0:
            self._estimate(rows, samples, index, metrics, "grad_norm")
        metrics["rollouts/round"] = float(self.rollouts_total - before)
        self._assign(samples, index)
        self._precompute_logps([s for s in samples if s.completion_ids is not None])
        return Round(rows, samples, metrics)

    def _gvm_allocation(self, rows: list[dict], index: int, metrics: dict) -> tuple[list[int], list[Sample]]:
        """Estimate (p_i, G_i) where stale, then allocate the round's budget (METHODS §13.2-13.3). Returns the
        counts and, with ``gvm_reuse_samples``, the estimation samples to train on."""
        a = self.args
        stale = [i for i, r in enumerate(rows) if self.stats.is_stale(r["uid"], index, a.gvm_interval)]
        est: list[Sample] = []
        if stale:
            stale_set = set(stale)
            counts = [a.gvm_samples if i in stale_set else 0 for i in range(len(rows))]
            est = self._generate_scored(rows, counts, f"e{index}")
            self._estimate(rows, est, index, metrics, "gvm")
            metrics["gvm/estimated_prompts"] = float(len(stale))
        p = [self.stats.get(r["uid"])["accept_rate"] for r in rows]
        g = [self.stats.get(r["uid"])["grad_norm"] for r in rows]
        counts = gvm_allocate(p, g, a.num_generations * len(rows), alpha=a.gvm_alpha, beta=a.gvm_beta,
                              filter_threshold=a.gvm_filter_threshold, filter_insufficient=a.gvm_filter_insufficient,
                              min_n=a.gvm_min_n, max_n=a.gvm_max_n)
        metrics["allocation/fallback"] = 0.0
        if sum(counts) == 0:
            logger.warning("GVM gave every prompt 0 rollouts (all unsolved or zero gradient): uniform this round")
            counts = [a.num_generations] * len(rows)
            metrics["allocation/fallback"] = 1.0
        metrics.update({"gvm/p_mean": statistics.fmean(p), "gvm/p_zero": sum(x == 0 for x in p) / len(p),
                        "gvm/p_one": sum(x == 1 for x in p) / len(p), "gvm/G_mean": statistics.fmean(g),
                        "gvm/G_max": max(g)})
        reused = []
        if a.gvm_reuse_samples and est:
            for i, n in enumerate(counts):
                reused += [s for s in est if s.g == i][:n]
        return counts, reused

    def _estimate(self, rows: list[dict], samples: list[Sample], index: int, metrics: dict, prefix: str) -> None:
        """p_i and G_i of every prompt with samples (METHODS §13.3), written to the prompt-stats store that GVM
        allocates from: p_i = accepted / generated; G_i = mean ‖∇ S_θ(y)‖ over the accepted samples on
        ``gvm_grad_params`` (0 with none accepted). Each process measures its own samples; gathered. The GVM
        estimation stage and the per-prompt gradient-norm monitor (``grad_norm_monitor_steps``) both call this."""
        from accelerate.utils import gather_object

        from align.monitors.grad_norm import sequence_grad_norms

        a = self.args
        accepted = [s for s in samples if s.completion_ids is not None and s.reward > a.accept_threshold]
        norms = sequence_grad_norms(self._policy, [s.prompt_ids for s in accepted],
                                    [s.completion_ids for s in accepted], self.pad_id, self.grad_params)
        found = dict(gather_object([((s.g, s.k), n) for s, n in zip(accepted, norms)]))
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
        if measured:
            metrics.update({f"{prefix}/G_median": statistics.median(measured), f"{prefix}/G_min": min(measured),
                            f"{prefix}/G_mean": statistics.fmean(measured), f"{prefix}/G_max": max(measured)})
        metrics[f"{prefix}/prompts_measured"] = float(len(measured))

    def _dynamic(self, rows: list[dict], index: int, metrics: dict):
        """DAPO dynamic sampling: keep groups whose rewards differ; replace the others with fresh prompts for up
        to ``dynamic_max_rounds`` extra rounds; with none kept at the end, train on everything (warned)."""
        a = self.args
        m = len(rows)
        samples = self._generate_scored(rows, [a.num_generations] * m, f"r{index}")
        kept = nonzero_variance_groups([s.reward for s in samples], [s.g for s in samples])
        extra = 0
        while len(kept) < m and extra < a.dynamic_max_rounds:
            extra += 1
            gen = torch.Generator().manual_seed(a.seed * 1_000_003 + index * 101 + extra)
            picks = torch.randint(len(self.train_dataset), (m - len(kept),), generator=gen).tolist()
            new_rows = [self.train_dataset[i] for i in picks]
            more = self._generate_scored(rows + new_rows, [0] * len(rows) + [a.num_generations] * len(new_rows),
                                         f"r{index}x{extra}")
            rows = rows + new_rows
            samples = samples + more
            kept = nonzero_variance_groups([s.reward for s in samples], [s.g for s in samples])
        metrics["dynamic/extra_rounds"] = float(extra)
        metrics["dynamic/all_zero_variance"] = float(not kept)
        if not kept:
            logger.warning("dynamic sampling: every group has identical rewards after %d extra rounds; training on "
                           "the unfiltered batch (zero advantages)", extra)
            kept = list(range(m))
        keep = set(kept[:m])
        counts = [a.num_generations if i in keep else 0 for i in range(len(rows))]
        return rows, counts, [s for s in samples if s.g in keep]

    def _round_metrics(self, rows, counts, samples: list[Sample]) -> dict[str, float]:
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

    def _assign(self, samples: list[Sample], index: int) -> None:
        """Advantages over the whole batch by group id, and each sample's mini-batch (same on every process)."""
        a = self.args
        rewards = [s.reward for s in samples]
        if a.advantage == "raft":
            adv = raft_advantages(rewards, a.accept_threshold)
        else:
            adv = group_advantages(rewards, [s.g for s in samples], a.scale_rewards)
        order = torch.randperm(len(samples), generator=torch.Generator().manual_seed(a.seed * 7919 + index)).tolist()
        for pos, j in enumerate(order):
            samples[j].minibatch = pos % a.num_minibatches
        for s, v in zip(samples, adv.tolist()):
            s.advantage = v

    @torch.no_grad()
    def _precompute_logps(self, local: list[Sample]) -> None:
        """Old log-probs of the samples the policy moves under before their use, and reference log-probs
        (β > 0). With one iteration, mini-batch 0 is used on the very weights that generated it, so its old
        log-probs are the live ones detached (what a stored copy would hold, without the extra forward)."""
        a = self.args
        old = [s for s in local if a.updates_per_round > 1 and (a.num_iterations > 1 or s.minibatch > 0)]
        passes = [(old, "old_logps", lambda *batch: token_logps(self._policy, *batch))]
        if a.beta:
            passes.append((local, "ref_logps", self._ref_logps))
        policy = self._policy
        was_training = policy.training
        policy.eval()
        try:
            for samples, attr, fn in passes:
                for s0 in range(0, len(samples), a.micro_batch_size):
                    chunk = samples[s0 : s0 + a.micro_batch_size]
                    ids, attn, _, width = pack([s.prompt_ids for s in chunk], [s.completion_ids for s in chunk],
                                               self.pad_id, self.args.device)
                    for s, row in zip(chunk, fn(ids, attn, width)):
                        setattr(s, attr, row[: s.length].cpu())
        finally:
            policy.train(was_training)

    def _ref_logps(self, ids, attn, width) -> torch.Tensor:
        if self.ref_model is not None:
            return token_logps(self.ref_model, ids, attn, width)
        with self._policy.disable_adapter():
            return token_logps(self._policy, ids, attn, width)

    # --- one optimizer step -----------------------------------------------------------------------

    def training_step(self, model, inputs, num_items_in_batch=None):
        position = self.state.global_step % self.args.updates_per_round
        if self._round is None or position == 0:
            self._round = self._make_round(inputs["rows"])
            self._record_global("train", self._round.metrics)
        loss = self._update(model, self._round, position % self.args.num_minibatches)
        if position == self.args.updates_per_round - 1:
            self._round = None
        return loss

    def _update(self, model, rnd: Round, minibatch: int) -> torch.Tensor:
        """Forward/backward of one mini-batch in micro-batches; every process runs the same number of
        micro-batches (padding with zero-weight ones), so DDP, FSDP and ZeRO-3 collectives line up."""
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
        if a.loss_type == "bnpo":  # a mean per micro-batch, averaged over every micro-batch of the step
            scale /= max(sum(micro_counts), 1)
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
                self.accelerator.backward(loss * (scale * weight))
            if weight:
                total += loss.detach() * (scale / world)
                tokens += n_tok
                for k, v in metrics.items():
                    sums[k] = sums.get(k, 0.0) + float(v) * n_tok
        packed = torch.tensor([tokens, *(sums.get(k, 0.0) for k in self._step_keys())], device=a.device)
        packed = self.accelerator.reduce(packed, reduction="sum")
        total = self.accelerator.reduce(total, reduction="sum")
        if not torch.isfinite(total):
            raise TrainingError(f"non-finite loss ({total.item()}) at step {self.state.global_step + 1}; stopped "
                                f"before the update, checkpoints already in {a.output_dir!r} are kept")
        n = max(packed[0].item(), 1.0)
        self._record_global("train", {k: v / n for k, v in zip(self._step_keys(), packed[1:].tolist())})
        return total

    def _step_keys(self) -> tuple[str, ...]:
        keys = ["entropy"]
        if self.args.policy_loss == "clip":
            keys += ["clip_ratio/low", "clip_ratio/high", "clip_ratio/region"]
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
        logps, entropy = token_logps(model, ids, attn, width, with_entropy=True)
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
                                    loss_type=a.loss_type, is_weights=is_weights, **norm)
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
                for k, v in self.timing.items():
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
        runs = [("", 1, self._sampling(temperature=0.0, max_new_tokens=self.args.eval_max_new_tokens))]
        if self.args.eval_num_samples:
            runs.append(("sampled_", self.args.eval_num_samples,
                         self._sampling(max_new_tokens=self.args.eval_max_new_tokens)))
        for name, k, sampling in runs:
            samples = self._generate_scored(rows, [k] * len(rows), f"eval{name}", sampling)
            metrics[f"{p}_{name}reward"] = statistics.fmean(s.reward for s in samples)
            metrics[f"{p}_{name}completion_length"] = statistics.fmean(s.length for s in samples)
            for fn in sorted({key for s in samples for key in s.per_fn if not key.endswith("/errors")}):
                metrics[f"{p}_{name}rewards/{fn}"] = statistics.fmean(s.per_fn[fn] for s in samples)
        self.rollouts_total = saved  # evaluation rollouts are not training rollouts
        self.log(metrics)
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
        return metrics
