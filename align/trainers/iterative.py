"""Iterative preference training: iterative DPO, iLR-DPO (docs/methods.md §7) and APO (docs/methods.md §8).

:class:`IterativeDPO` is a driver, not a ``Trainer``: each iteration t = 0 .. T−1 runs one
:class:`~align.trainers.preference.PreferenceTrainer` round.

1. The iteration's start policy π_t (the initial model for t = 0, else ``iter-{t-1}/``) samples K =
   ``samples_per_prompt`` responses to each of the iteration's prompts with the engine ``rollout`` names
   (:func:`~align.rollout.build_engine`: HF generate on π_t, rebuilt each iteration; a colocated vLLM or
   ``align serve`` built once, at the first iteration that samples, and pushed π_t's weights at the start of
   every iteration, the only time the policy changes, so ``vllm_sync_steps`` stays 1). Completion k of prompt
   ``uid`` is seeded by (seed, ``"{t}:{uid}"``, k), so the draws change with t and do not depend on batching or
   on the process. The win rate (5.) samples with HF generate.
2. The oracle (:mod:`rewards.preference`) ranks them (``best_worst``); best is ``chosen``, worst ``rejected``;
   a prompt whose best and worst tie gives no pair. The pairs go to ``iter-t/pairs.jsonl`` with their token
   ids, and train as sampled (no re-tokenisation).
3. Reference log-probs, precomputed into ``ref_chosen_logps``/``ref_rejected_logps``: S_{π_t} (the
   iteration's start policy). APO (``apo_alpha`` = α set, t ≥ 1): the extrapolated reference
   (1+α)·S_{π_t} − α·S_{π_{t−1}} (:func:`extrapolated_reference`), π_{t−1} being the previous iteration's
   start; log Z(x) cancels in every pairwise loss, so this is the exact log-space extrapolation π̂_t.
4. One round of any registered objective (``dpo``, ``lrdpo`` for iLR-DPO, ...) for ``max_steps`` (or
   ``num_train_epochs``), checkpoints in ``iter-t/train/``.
5. ``iter-t/`` receives the model and tokenizer (π_{t+1}; a LoRA adapter is merged first), ``metrics.json``
   and, last, the ``done`` marker; ``iterations.jsonl`` in ``output_dir`` is rewritten from every finished
   iteration's metrics: oracle calls, pairs, mean sample length, win rate of π_{t+1} against the initial
   policy on the held-out prompts (:func:`align.evaluation.win_rate`), train loss; the same go to the console (one
   line) and to the ``report_to`` trackers (``iteration/*``), whose one run holds every round on one step axis.

[recon] APO: which policy samples the next round is not pinned by the paper (docs/methods.md §8 pitfalls). We take
option (a): π_{t+1}, the trained network, samples; the extrapolated π̂ exists only as reference
log-probs inside the loss. α = 0 is plain iterative DPO exactly (``apo_alpha: null`` skips the extra
scoring pass; 0.0 runs it and gives the same numbers).

Resume (``resume_from_checkpoint=true``): iterations with a ``done`` marker are skipped, the unfinished
iteration reuses its saved pairs and resumes its round from the last ``iter-t/train/checkpoint-*``.

Processes: every model the driver uses outside a round's Trainer (sampling, reference scoring, win rate)
is loaded from disk, unwrapped, on every process. Sampling and oracle scoring are sharded by prompt
(prompt i on process i mod N) and gathered in prompt order; the per-completion seeds make the pairs
those of one process. Reference scoring is sharded by the PreferenceTrainer; the win rate is computed whole on
every process (``win_rate`` seeds by row position, so shards would sample differently). Only process 0 writes.
"""

from __future__ import annotations

import copy
import json
import os

import torch

from align import fsdp2, progress
from align.errors import ConfigError
from align.hub import push_iteration
from align.io import atomic_write_text
from align.rollout.collective import has_shards
from align.rollout.vllm_engine import mergeable_layers, merged_weights
from align.stopping import RESUME, after_train, stop_point
from align.tracking import TrackingCallback, attach

DONE = "done"


def extrapolated_reference(current: torch.Tensor, previous: torch.Tensor | None, alpha: float | None) -> torch.Tensor:
    """APO's reference log-probs (1+α)·S_{π_t} − α·S_{π_{t−1}} (log Z cancels in pairwise losses); the plain
    ``current`` when there is no previous policy or no α."""
    if previous is None or alpha is None:
        return current
    return (1 + alpha) * current - alpha * previous


def _jsonl(rows) -> str:
    return "".join(json.dumps(r) + "\n" for r in rows)


class IterativeDPO:
    """The iterative driver. ``config`` is the ``iterative_dpo`` recipe's config (IterativeArguments +
    RecipeArguments + PreferenceConfig); ``train``/``evaluation`` are prompt datasets already passed through
    :func:`align.data.prompts.tokenize_prompts`; ``oracle`` a :class:`rewards.preference.PreferenceOracle`.
    ``callbacks`` are added to every round's Trainer; ``engine``, a vLLM engine to sample with instead of building
    one (left open at the end; one the driver builds is closed)."""

    def __init__(self, config, train, evaluation, tokenizer, oracle, callbacks=None, engine=None):
        from accelerate import PartialState

        self.config, self.train, self.evaluation = config, train, evaluation
        self.tokenizer, self.oracle = tokenizer, oracle
        self.callbacks = list(callbacks or [])
        self.state = PartialState()
        self.resume = str(config.resume_from_checkpoint or "").lower() in ("true", "last", "latest")
        self.engine, self.own_engine = engine, engine is None  # a vLLM engine, built at the first sampling
        self.weight_sync = None
        self.show = progress.shown(config, self.state.is_main_process)  # progress bars (main process only)
        self.tracking = TrackingCallback(config)  # one tracker run; round t's steps follow the earlier rounds'

    # --- paths ------------------------------------------------------------------------------------

    def iter_dir(self, t: int) -> str:
        return os.path.join(self.config.output_dir, f"iter-{t}")

    def start_path(self, t: int) -> str:
        """Where π_t, the start policy of iteration t, lives."""
        return self.config.model_name_or_path if t == 0 else self.iter_dir(t - 1)

    def is_done(self, t: int) -> bool:
        return os.path.isfile(os.path.join(self.iter_dir(t), DONE))

    def _load(self, path: str):
        from align.modeling import load_model
        from align.precision import weights_dtype

        c = self.config
        model = load_model(path, torch_dtype=weights_dtype(c), attn_implementation=c.attn_implementation,
                           trust_remote_code=c.trust_remote_code)
        return model.to(self.state.device)

    # --- the loop ---------------------------------------------------------------------------------

    def run(self) -> list[dict]:
        if not self.resume and self.state.is_main_process:  # overwrite_output_dir: no stale pairs, caches, markers
            import shutil

            for name in os.listdir(self.config.output_dir) if os.path.isdir(self.config.output_dir) else ():
                if name.startswith("iter-"):
                    shutil.rmtree(os.path.join(self.config.output_dir, name))
        self.state.wait_for_everyone()
        records = []
        try:
            for t in range(self.config.iterations):
                if not self.is_done(t):
                    self.iteration(t)
                    push_iteration(self.config, t)  # push_every_iteration: in the background
                with open(os.path.join(self.iter_dir(t), "metrics.json"), encoding="utf-8") as fh:
                    records.append(json.load(fh))
                self.tracking.step_offset += records[-1]["train/steps"]
                if self.state.is_main_process:
                    atomic_write_text(os.path.join(self.config.output_dir, "iterations.jsonl"), _jsonl(records))
        finally:
            self.tracking.close()
            if self.engine is not None and self.own_engine:  # a colocated vLLM's memory
                self.engine.close()
                self.engine = None
        return records

    def iteration(self, t: int) -> dict:
        c = self.config
        folder = self.iter_dir(t)
        pairs, stats = self.load_pairs(t) if self.resume else (None, None)
        if pairs is None:
            pairs, stats = self.make_pairs(t)
        if not pairs:
            raise ConfigError(f"iteration {t}: every prompt's {c.samples_per_prompt} samples tie under the oracle, "
                              "no pair to train on (raise samples_per_prompt or temperature)")
        trainer, output = self.train_round(t, pairs)
        after_train(trainer)  # stopped by a signal inside the round: its checkpoint resumes it
        losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]  # a resumed round's too
        loss = sum(losses) / len(losses) if losses else output.training_loss  # no log within the round
        metrics = {"iteration": t, **stats, "train/loss": loss, "train/steps": trainer.state.global_step}
        if trainer.is_peft:  # the next iteration starts from a plain model: merge the adapter
            self.save_merged(trainer.policy, folder)
        else:
            trainer.save_model(folder)
        self.state.wait_for_everyone()
        del trainer
        metrics.update(self.evaluate(t))
        if self.state.is_main_process:
            atomic_write_text(os.path.join(folder, "metrics.json"), json.dumps(metrics, indent=1))
            atomic_write_text(os.path.join(folder, DONE), "")
            self.report(t, metrics)
        self.state.wait_for_everyone()
        # A signal after the round's last stop point stops here, the iteration complete (a resume samples the next).
        stop_point(f"after iteration {t}, complete in {folder}; {RESUME}", self.state.device,
                   self.state.is_main_process)
        return metrics

    # --- 1-2. sample and judge --------------------------------------------------------------------

    def prompts(self, t: int):
        """Iteration t's prompt rows: a chunk of ``prompts_per_iteration`` (wrapping around), or all of them."""
        n = len(self.train)
        size = self.config.prompts_per_iteration or n
        return self.train.select([(t * size + i) % n for i in range(size)])

    def rollout_engine(self, policy, t: int):
        """The engine that samples iteration t, holding π_t (``policy``): HF generate on it, or the vLLM engine
        (built on the first call, then kept) pushed π_t's weights, once per iteration (only the main process pushes
        to a server; every process waits for it)."""
        from align.rollout import HFEngine, WeightSync, build_engine

        c = self.config
        if c.rollout == "hf":
            return HFEngine(policy, self.tokenizer, c.generation_batch_size)
        if self.engine is None:
            self.engine = build_engine(c, policy, self.tokenizer, is_main=self.state.is_main_process,
                                       max_len=c.max_prompt_length + c.max_completion_length)
        if self.weight_sync is None:
            self.weight_sync = WeightSync(self.engine, c.rollout, 1, self.state, show=self.show)
        self.weight_sync(policy, t)
        return self.engine

    def make_pairs(self, t: int) -> tuple[list[dict], dict]:
        from accelerate.utils import gather_object

        from align.data.sampled_pairs import as_completion
        from align.rollout import SamplingParams

        c = self.config
        rows = self.prompts(t)
        rank, world = self.state.process_index, self.state.num_processes
        mine = [rows[i] for i in range(rank, len(rows), world)]
        policy = self._load(self.start_path(t))
        sampling = SamplingParams(max_new_tokens=c.max_completion_length, temperature=c.temperature, top_p=c.top_p,
                                  top_k=c.top_k, seed=c.seed)
        k = c.samples_per_prompt
        engine = self.rollout_engine(policy, t)
        share = " (main process's share)" if world > 1 else ""  # no gather until the judging's
        with progress.bar(f"iteration {t}: sampling{share}", k * len(mine), "completions", show=self.show,
                          groups=[k] * len(mine)) as stage:  # the HF engine ticks it per batch
            with fsdp2.gathered(policy):  # ZeRO-3: whole weights for this process's own generations (align/zero3.py)
                out = engine.generate([r["prompt_ids"] for r in mine], [k] * len(mine), sampling,
                                      keys=[f"{t}:{r['uid']}" for r in mine])
            stage.finish()
        del policy, engine
        calls = self.oracle.calls
        local, lengths = [], []
        judging = progress.bar(f"iteration {t}: oracle {self.oracle.name!r}", len(rows), "prompts", show=self.show)
        with judging:  # this process's prompts one by one, the others' with the gather
            for j, row in enumerate(mine):
                judging.reach(j)
                ids = out.completion_ids[j * k : (j + 1) * k]
                lengths.extend(len(x) for x in ids)
                texts = self.tokenizer.batch_decode(ids, skip_special_tokens=True)
                columns = {key: v for key, v in row.items() if key not in ("prompt", "prompt_ids")}
                best, worst, scores = self.oracle.best_worst(row["prompt"], texts, columns)
                if scores[best] == scores[worst] or ids[best] == ids[worst]:
                    local.append((row["uid"], None))
                    continue
                local.append((row["uid"], {
                    "uid": row["uid"], "prompt": row["prompt"], "chosen": as_completion(row["prompt"], texts[best]),
                    "rejected": as_completion(row["prompt"], texts[worst]), "chosen_score": scores[best],
                    "rejected_score": scores[worst], "prompt_ids": row["prompt_ids"], "chosen_ids": ids[best],
                    "rejected_ids": ids[worst]}))
            judging.reach(len(mine))
            gathered = gather_object([(local, sum(lengths), len(lengths), self.oracle.calls - calls)])
            judging.finish()
        pairs = sorted((p for loc, *_ in gathered for p in loc), key=lambda p: p[0])
        n_samples = sum(g[2] for g in gathered)
        stats = {
            "prompts": len(rows), "pairs": sum(p is not None for _, p in pairs),
            "ties_skipped": sum(p is None for _, p in pairs), "oracle_calls": sum(g[3] for g in gathered),
            "samples/mean_length": sum(g[1] for g in gathered) / max(n_samples, 1),
        }
        pairs = [p for _, p in pairs if p is not None]
        for key in ("chosen", "rejected"):
            stats[f"pairs/{key}_length"] = sum(len(p[f"{key}_ids"]) for p in pairs) / max(len(pairs), 1)
        if self.state.is_main_process:
            os.makedirs(self.iter_dir(t), exist_ok=True)
            atomic_write_text(os.path.join(self.iter_dir(t), "sampling.json"), json.dumps(stats, indent=1))
            atomic_write_text(os.path.join(self.iter_dir(t), "pairs.jsonl"), _jsonl(pairs))  # written last
        self.state.wait_for_everyone()
        return pairs, stats

    def load_pairs(self, t: int) -> tuple[list[dict] | None, dict | None]:
        """The saved pairs and sampling statistics of an interrupted iteration, if it got that far."""
        from align.metrics import read_jsonl

        folder = self.iter_dir(t)
        if not os.path.isfile(os.path.join(folder, "pairs.jsonl")):
            return None, None
        with open(os.path.join(folder, "sampling.json"), encoding="utf-8") as fh:
            return read_jsonl(os.path.join(folder, "pairs.jsonl")), json.load(fh)

    # --- 3-4. reference and round -----------------------------------------------------------------

    def round_config(self, t: int, subdir: str = "train"):
        args = copy.copy(self.config)
        args.output_dir = os.path.join(self.iter_dir(t), subdir)
        args.resume_from_checkpoint = None
        return args

    def train_dataset(self, pairs: list[dict]):
        """The pairs as tokenised preference rows (the sampled token ids, completions cut to ``max_length``)."""
        from datasets import Dataset

        rows = {"row_id": [], "prompt_ids": [], "chosen_ids": [], "rejected_ids": []}
        for i, p in enumerate(pairs):
            room = self.config.max_length - len(p["prompt_ids"])
            if room < 1:
                raise ConfigError(f"max_length: {self.config.max_length} leaves no room for a response after a "
                                  f"{len(p['prompt_ids'])}-token prompt (uid {p['uid']})")
            rows["row_id"].append(i)
            rows["prompt_ids"].append(p["prompt_ids"])
            rows["chosen_ids"].append(p["chosen_ids"][:room])
            rows["rejected_ids"].append(p["rejected_ids"][:room])
        return Dataset.from_dict(rows)

    def save_merged(self, policy, folder: str) -> None:
        """π_{t+1} with its LoRA adapter merged, as a plain model in ``folder``. A sharded policy (FSDP2, ZeRO-3) is
        merged weight by weight as every process gathers it (:func:`align.rollout.vllm_engine.merged_weights`), the
        main process writing the file; PEFT's own merge would write into shards."""
        if not has_shards(policy):
            if self.state.is_main_process:
                policy.merge_and_unload().save_pretrained(folder)
                self.tokenizer.save_pretrained(folder)
            return
        from safetensors.torch import save_file

        main = self.state.is_main_process
        weights = {name: t.cpu().clone() for name, t in merged_weights(policy) if main}  # clone: untie
        if main:
            os.makedirs(folder, exist_ok=True)
            base = policy.get_base_model()
            base.config.save_pretrained(folder)
            if getattr(base, "generation_config", None) is not None:
                base.generation_config.save_pretrained(folder)
            save_file(weights, os.path.join(folder, "model.safetensors"), metadata={"format": "pt"})
            self.tokenizer.save_pretrained(folder)

    def _trainer(self, model, args, callbacks=(), peft=True):
        from align.modeling import lora_config
        from align.trainers.preference import PreferenceTrainer

        trainer = PreferenceTrainer(model, args, None, None, self.tokenizer, callbacks=list(callbacks),
                                    peft_config=lora_config(args) if peft else None)
        attach(trainer, self.tracking)  # the run's trackers, not a tracker run per round
        return trainer

    def reference_logps(self, t: int, trainer, ds):
        """``ds`` with the iteration's reference columns: S_{π_t} from the round's untrained policy; for APO
        (t ≥ 1) extrapolated with S_{π_{t−1}}, scored by a throwaway PreferenceTrainer over π_{t−1}."""
        ds = trainer.precompute_reference(ds, f"reference log-probs (iteration {t})")
        if t == 0 or self.config.apo_alpha is None:
            return ds
        args = self.round_config(t, "previous")
        args.entanglement_steps, args.entanglement_action = None, "none"  # a scorer only
        previous = self._trainer(self._load(self.start_path(t - 1)), args, peft=False)
        prev = previous.precompute_reference(ds.remove_columns(["ref_chosen_logps", "ref_rejected_logps"]),
                                             f"previous-policy log-probs (iteration {t})")
        del previous
        cols = {}
        for key in ("ref_chosen_logps", "ref_rejected_logps"):
            cur = torch.tensor(ds[key], dtype=torch.float64)
            cols[key] = extrapolated_reference(cur, torch.tensor(prev[key], dtype=torch.float64),
                                               self.config.apo_alpha).tolist()
        ds = ds.remove_columns(list(cols))
        for key, values in cols.items():
            ds = ds.add_column(key, values)
        return ds

    def train_round(self, t: int, pairs: list[dict]):
        from align.checkpoints import newest_complete, resolve_resume

        args = self.round_config(t)
        trainer = self._trainer(self._load(self.start_path(t)), args, self.callbacks)
        if trainer.is_peft and has_shards(trainer.policy):  # saved merged after the round (save_merged): checked now
            mergeable_layers(trainer.policy)
        trainer.train_dataset = self.reference_logps(t, trainer, self.train_dataset(pairs))
        last = None  # the round restarts when it has no complete checkpoint yet
        if self.resume and newest_complete(args.output_dir)[0] is not None:
            last = resolve_resume(args.output_dir, announce=self.state.is_main_process)
        return trainer, trainer.train(resume_from_checkpoint=last)

    # --- 5. evaluation ----------------------------------------------------------------------------

    def evaluate(self, t: int) -> dict:
        """Win rate of π_{t+1} (just saved in ``iter-t/``) against the initial policy on the held-out prompts,
        under the oracle. Every process judges every row: ``win_rate`` seeds a completion by the row's position,
        so sharded rows would draw other samples than one process does."""
        from align.evaluation import win_rate

        c = self.config
        if self.evaluation is None or not c.eval_num_samples:
            return {}
        policy, baseline = self._load(self.iter_dir(t)), self._load(c.model_name_or_path)
        with fsdp2.gathered(policy, baseline):  # ZeRO-3: each process samples on whole weights
            out = win_rate(policy, baseline, self.tokenizer, list(self.evaluation), self.oracle, c.eval_num_samples,
                           c.max_completion_length, c.temperature, c.seed, c.generation_batch_size, progress=self.show)
        return {f"eval/{k}": v for k, v in out.items()}

    def report(self, t: int, metrics: dict) -> None:
        """Iteration t's metrics on the console (one line) and to the trackers as ``iteration/<key>``, at the last
        step of its round on the run's continuous step axis (main process)."""
        shown = {k: v for k, v in metrics.items() if k != "iteration"}
        print(f"iteration {t} ({t + 1}/{self.config.iterations}): " + ", ".join(
            f"{k} {v if isinstance(v, int) else format(v, '.4g')}" for k, v in shown.items()), flush=True)
        step = self.tracking.step_offset + shown["train/steps"]
        self.tracking.log({f"iteration/{k}": v for k, v in shown.items()}, step)
