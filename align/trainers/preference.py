"""PreferenceTrainer: offline preference optimisation (DPO family, RPO, H-DPO, LR-DPO) on ``Trainer``.

Data path: TRL-format rows -> tokenise (chat template) -> [chosen; rejected] batch -> one forward of
the policy -> summed completion log-probs -> reference log-probs (precomputed once, or live) ->
``objective(batch)`` -> backward. The objective is any name in :mod:`align.objectives`.

Reference log-probs come from, in order: the precomputed cache (default; computed once before training
from the reference, kept in memory and in ``output_dir`` so a resumed run reuses it; the file is keyed by the
reference's weights and the data, never by a path), a frozen
``ref_model``, the base model with the LoRA adapter disabled, or a frozen copy of the initial policy.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import json
import os
from dataclasses import dataclass

import torch
from transformers import TrainingArguments

from align import fsdp2, progress
from align.args import CPUSaneDefaults, ObjectiveArguments, option
from align.data.preference import PreferenceCollator, tokenize_preferences
from align.errors import ConfigError
from align.io import atomic_save
from align.logps import scoring, sequence_logps
from align.microbatch import token_budget_batches
from align.modeling import pad_token_id
from align.monitors.entanglement import ACTIONS, SUBSETS
from align.objectives import build, registry
from align.rollout.collective import has_shards
from align.sharding import full_weights
from align.trainers.base import AlignTrainer, wrap_peft


@dataclass
class PreferenceArguments(ObjectiveArguments):
    """The preference part (lengths, reference, entanglement monitor), with the objective part it trains."""

    part = "preference"

    max_length: int = option(512, "Max prompt + completion tokens; longer completions are cut, longer prompts "
                                  "rejected.")
    ref_model_name_or_path: str | None = option(None, "Frozen reference model; default: the initial policy.")
    precompute_ref_logps: bool = option(True, "Compute reference log-probs once before training (frees the reference).")
    remove_unused_columns: bool = option(False, "Keep the tokenised columns the preference collator needs.")
    # --- gradient entanglement (docs/methods.md §12; align/monitors/entanglement.py) ---
    entanglement_steps: int | None = option(None, "Entanglement monitor: check the probe pairs before the first step "
                                                  "and every this many optimizer steps (e.g. 50); None: off.")
    entanglement_params: list[str] = option(["lm_head"], f"Parameter subset of the pair gradients, any of {SUBSETS} or "
                                                         "parameter-name substrings.")
    entanglement_probe: str | None = option(None, "Probe pairs: a .json/.jsonl file of prompt/chosen/rejected rows; "
                                                  "default: the eval set, else the train set.")
    entanglement_probe_size: int = option(64, "Probe pairs used (the first rows).")
    entanglement_action: str = option("none", f"On each training batch, one of {ACTIONS}: log the batch's cases, or "
                                              "downweight, drop or replace (by the batch's other pairs) the pairs "
                                              "predicted 'both down' (chosen and rejected log-probs both falling).")
    entanglement_weight: float = option(0.5, "Loss weight of a 'both down' pair with entanglement_action=downweight.")

    def validate(self) -> None:
        online_only = [n for n in registry()[self.objective].needs if n != "grad_norms"]
        if online_only:
            raise ConfigError(f"objective: {self.objective!r} needs {online_only[0]!r}, which only the online trainers "
                              "supply (align train egpo)")
        if self.entanglement_steps is not None and self.entanglement_steps < 1:
            raise ConfigError(f"entanglement_steps: must be >= 1 (None turns the monitor off), got "
                              f"{self.entanglement_steps}")
        if self.entanglement_action not in ACTIONS:
            raise ConfigError(f"entanglement_action: must be one of {ACTIONS}, got {self.entanglement_action!r}")
        if not 0 <= self.entanglement_weight <= 1:
            raise ConfigError(f"entanglement_weight: must be in [0, 1], got {self.entanglement_weight}")
        batch_grads = self.entanglement_action != "none" or "grad_norms" in registry()[self.objective].needs
        specs = [self.entanglement_params] if isinstance(self.entanglement_params, str) else self.entanglement_params
        frozen = [spec for spec in specs if "lora" not in spec]
        if batch_grads and getattr(self, "use_peft", False) and frozen:  # only the adapter trains under LoRA
            raise ConfigError(f"entanglement_params: {frozen[0]!r} selects weights a use_peft run does not train; the "
                              "training pairs' gradients (entanglement_action, pairnorm) are taken over trained "
                              "ones: use [lora]")
        if self.entanglement_probe_size < 1:
            raise ConfigError(f"entanglement_probe_size: must be >= 1, got {self.entanglement_probe_size}")
        probe = self.entanglement_probe
        if probe is not None and not (os.path.isfile(probe) and probe.endswith((".json", ".jsonl"))):
            raise ConfigError(f"entanglement_probe: {probe!r} is not a .json/.jsonl file")
        if self.max_length < 2:
            raise ConfigError(f"max_length: must be >= 2, got {self.max_length}")
        if self.remove_unused_columns:
            raise ConfigError("remove_unused_columns: must be false for preference training")
        if self.ref_model_name_or_path:
            from align.modeling import check_model_path

            check_model_path(self.ref_model_name_or_path, "ref_model_name_or_path")


@dataclass
class PreferenceConfig(PreferenceArguments, CPUSaneDefaults, TrainingArguments):
    """Standalone config for :class:`PreferenceTrainer`: the preference parts with the trainer part (recipes add
    model and data keys on top)."""


def weights_fingerprint(model, skip_lora: bool = False) -> str:
    """SHA-256 of what makes ``model`` compute what it computes: its config (less its path and version) and every
    parameter and buffer held by this process (name, dtype, size, bytes; a sharded tensor's local part).
    ``skip_lora``: leave out LoRA adapter tensors (for the base model under a disabled adapter)."""
    config = getattr(model, "config", None)
    config = {k: v for k, v in config.to_dict().items() if not k.startswith("_") and k != "transformers_version"} \
        if config is not None else {}
    digest = hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode())
    for name, t in itertools.chain(model.named_parameters(), model.named_buffers()):
        if skip_lora and "lora_" in name:
            continue
        t = getattr(t, "ds_tensor", t)  # ZeRO-3: this process's partition
        t = t.to_local() if hasattr(t, "to_local") else t  # FSDP2 DTensor: this process's shard
        t = t.detach().contiguous().reshape(-1)
        digest.update(f"{name}:{t.dtype}:{t.numel()};".encode())
        digest.update(t.view(torch.uint8).cpu().numpy())
    return digest.hexdigest()


def pair_sizes(ds, rows) -> list[tuple[int]]:
    """Each of ``rows``' padded size segment for :func:`align.microbatch.token_budget_batches`: its longer
    sequence (prompt + chosen or prompt + rejected), as :class:`PreferenceCollator` pads them."""
    sub = ds.select(rows).select_columns(["prompt_ids", "chosen_ids", "rejected_ids"])
    return [(len(p) + max(len(c), len(r)),) for p, c, r in zip(sub["prompt_ids"], sub["chosen_ids"],
                                                                 sub["rejected_ids"], strict=True)]


class PreferenceTrainer(AlignTrainer):
    fsdp2_supported = True  # align/fsdp2.py

    def wants_reference_copy(self, args) -> bool:
        return not args.precompute_ref_logps  # the live reference: a frozen copy (of the sharded policy's start)
    def __init__(self, model, args: PreferenceArguments, train_dataset=None, eval_dataset=None,
                 processing_class=None, ref_model=None, peft_config=None, callbacks=None):
        model = wrap_peft(model, peft_config, args.seed)
        self.loss_fn = build(args.objective, **args.objective_params())
        tok = processing_class
        if train_dataset is not None and "prompt_ids" not in train_dataset.column_names:
            train_dataset = tokenize_preferences(train_dataset, tok, args.max_length, "train")
        if eval_dataset is not None and "prompt_ids" not in eval_dataset.column_names:
            eval_dataset = tokenize_preferences(eval_dataset, tok, args.max_length, "eval")
        pad = pad_token_id(tok)
        super().__init__(model, args, data_collator=PreferenceCollator(pad), train_dataset=train_dataset,
                         eval_dataset=eval_dataset, processing_class=tok, callbacks=callbacks)
        self.model_accepts_loss_kwargs = False  # our loss is a batch mean: let Trainer scale it for accumulation
        self.setup_reference(ref_model, needed=not args.precompute_ref_logps)  # live: a frozen copy of the policy
        self._setup_entanglement(train_dataset, eval_dataset)

    # --- gradient entanglement --------------------------------------------------------------------

    def _setup_entanglement(self, train_dataset, eval_dataset) -> None:
        """The probe monitor (``entanglement_steps``) and the per-batch pair statistics that
        ``entanglement_action`` and objectives needing gradient norms (``pairnorm``) read."""
        from align.monitors.entanglement import EntanglementMonitor, select_subset

        a = self.args
        self._needs_norms = "grad_norms" in self.loss_fn.spec.needs
        self._ent_params = None  # set when each training batch needs its pairs' gradients
        if a.entanglement_action != "none" or self._needs_norms:
            named = select_subset(self.policy, a.entanglement_params)
            frozen = [n for n, p in named if not p.requires_grad]
            if frozen:  # the live graph has no gradient for them (and the update does not move them)
                what = "entanglement_action" if a.entanglement_action != "none" else f"objective {a.objective!r}"
                more = f" and {len(frozen) - 1} more" if len(frozen) > 1 else ""
                raise ConfigError(f"entanglement_params: {list(a.entanglement_params)} selects parameters this run "
                                  f"does not train ({frozen[0]}{more}); {what} takes the training pairs' gradients "
                                  f"over trained ones{': with use_peft use [lora]' if self.is_peft else ''}")
            self._ent_params = [p for _, p in named]
        if a.entanglement_steps:
            if a.entanglement_probe:
                import datasets

                probe = datasets.load_dataset("json", data_files=a.entanglement_probe, split="train")
                probe = tokenize_preferences(probe, self.processing_class, a.max_length, "entanglement_probe")
            else:
                probe = eval_dataset if eval_dataset is not None else train_dataset
            probe = probe.select(range(min(a.entanglement_probe_size, len(probe))))
            self.add_callback(EntanglementMonitor(self, probe, a.entanglement_params, a.entanglement_steps))

    def _sharded_pair_stats(self, inputs) -> list[dict] | None:
        """Under FSDP2 or ZeRO-3 in training, the batch's per-pair gradient statistics from their own pass, before
        the training forward; else None (the live graph gives them, :meth:`_batch_entanglement`). The live graph's
        gradients would run through FSDP2's and DeepSpeed's backward hooks into the shards, so this pass runs on
        weights gathered whole in every process (:func:`align.fsdp2.gathered`, one collective per micro-batch, each
        process its own pairs), in eval mode (no dropout: the gradient of the sequence's log-prob itself), over the
        same rows and the same log-prob function as the training forward."""
        from align.monitors.entanglement import batch_pair_stats, select_subset
        from align.monitors.gradients import only_trainable

        policy = self.policy
        if self._ent_params is None or not torch.is_grad_enabled() or not has_shards(policy):
            return None
        was_training = policy.training
        policy.eval()
        try:
            with fsdp2.gathered(policy):  # named_parameters() gives the gathered weights while open
                params = [p for _, p in select_subset(policy, self.args.entanglement_params)]
                with only_trainable(policy, params):
                    logps, _, _ = self._sequence_logps(policy, inputs)
                    return batch_pair_stats(logps, params)
        finally:
            policy.train(was_training)

    def _batch_entanglement(self, logps: torch.Tensor, batch: dict, stats: list[dict] | None) -> torch.Tensor | None:
        """Per-pair loss weights from this batch's entanglement (or None for weight 1), and the gradient norms
        the objective reads; recorded: the shares of the batch's pairs in each case (``entanglement/batch_*``).
        ``stats``: the pairs' statistics when a sharded policy took them first (:meth:`_sharded_pair_stats`), else
        they come from the live graph."""
        from align.monitors.entanglement import CASES, batch_pair_stats

        a = self.args
        half = logps.shape[0] // 2
        if stats is None and (not torch.is_grad_enabled() or not logps.requires_grad):  # evaluation: no gradients
            if self._needs_norms:
                batch["chosen_grad_norms"] = batch["rejected_grad_norms"] = torch.ones(half, device=logps.device)
            return None
        stats = stats if stats is not None else batch_pair_stats(logps, self._ent_params)
        if self._needs_norms:
            batch["chosen_grad_norms"] = torch.tensor([r["norm_chosen"] for r in stats], device=logps.device)
            batch["rejected_grad_norms"] = torch.tensor([r["norm_rejected"] for r in stats], device=logps.device)
        cases = [r["case"] for r in stats]
        self._batch_metrics = {f"entanglement/batch_{c}": torch.tensor(cases.count(c) / half) for c in CASES}
        down = torch.tensor([c == "both_down" for c in cases], device=logps.device)
        if a.entanglement_action in ("none", "monitor"):
            return None
        low = a.entanglement_weight if a.entanglement_action == "downweight" else 0.0
        weights = torch.where(down, torch.full_like(logps[:half], low), torch.ones_like(logps[:half]))
        if a.entanglement_action == "replace" and bool((~down).any()):
            weights = weights * half / (~down).sum()
        return weights

    # --- reference log-probs ----------------------------------------------------------------------

    def _sequence_logps(self, model, inputs):
        """One forward of [chosen; rejected]; only the positions from the first completion token on go through
        the lm head (none of the prompt part shared by every row), ``logits_block_size`` tokens at a time
        (``padding_free``: the rows packed into one, :func:`align.logps.last_logps`)."""
        return sequence_logps(model, inputs["input_ids"], inputs["attention_mask"], inputs["completion_mask"],
                              **scoring(self.args))

    @torch.no_grad()
    def reference_logps(self, inputs) -> tuple[torch.Tensor, torch.Tensor]:
        """Reference log-probs (chosen, rejected) of a collated batch, computed live."""
        model, ctx = self.reference()
        with ctx, full_weights(model, self.args.device):  # before prepare: ZeRO-3 slices gathered, FSDP's CPU copy
            logps, _, _ = self._sequence_logps(model, inputs)
        half = inputs["row_id"].shape[0]
        return logps[:half], logps[half:]

    def reference_fingerprint(self) -> str:
        """:func:`weights_fingerprint` of the reference as it is now, every process's part (a collective)."""
        from accelerate.utils import gather_object

        model, _ = self.reference()
        lora_off = self.ref_model is None and self.is_peft  # the policy with its adapter off: the base weights
        return "|".join(gather_object([weights_fingerprint(model, lora_off)]))

    def _cache_path(self, ds, fingerprint) -> str:
        """The reference cache of ``ds``, keyed by content: the reference's weights (``fingerprint()``, see
        :meth:`reference_fingerprint`), the rows' token ids in order, max_length, the chat template and mixed
        precision; a changed model at the same path, or changed data, never reads a stale cache."""
        digest = hashlib.sha256(fingerprint().encode())
        for key in ("prompt_ids", "chosen_ids", "rejected_ids"):
            for ids in ds[key]:
                digest.update(bytes(str(ids), "ascii"))
        a, tok = self.args, self.processing_class
        digest.update(json.dumps([a.max_length, getattr(tok, "chat_template", None), a.bf16, a.fp16]).encode())
        return os.path.join(self.args.output_dir, f"ref_logps-{digest.hexdigest()[:16]}.pt")

    def precompute_reference(self, ds, desc: str = "reference log-probs", fingerprint=None):
        """``ds`` with ``ref_chosen_logps``/``ref_rejected_logps`` columns, computed once (sharded across
        processes, gathered) and cached in ``output_dir``. The forwards run on micro-batches of at most
        ``max_tokens_per_micro_batch`` padded tokens, pairs of similar length together
        (:func:`align.microbatch.token_budget_batches`). ``fingerprint``: a callable giving the reference's
        fingerprint when the caller shares one between passes (default :meth:`reference_fingerprint`)."""
        from accelerate.utils import gather_object

        if ds is None or "ref_chosen_logps" in ds.column_names:
            return ds
        path = self._cache_path(ds, fingerprint or self.reference_fingerprint)
        if os.path.isfile(path):
            table = torch.load(path, weights_only=True)
        else:
            rank, world = self.accelerator.process_index, self.accelerator.num_processes
            mine = list(range(rank, len(ds), world))
            batches = [[mine[j] for j in b] for b in token_budget_batches(pair_sizes(ds, mine),
                                                                          self.args.max_tokens_per_micro_batch, 2)]
            # every process runs as many forwards (sharded weights gather in each): the short ones redo one row
            extra = max(gather_object([len(batches)])) - len(batches) if world > 1 else 0
            collate = self.data_collator
            local = []
            was_training = self.model.training
            self.model.eval()
            runs = batches + [None] * extra
            show = progress.shown(self.args, self.is_world_process_zero())
            with progress.bar(desc, len(ds), "rows", show=show) as bar:
                for idx in runs:
                    batch = {k: v.to(self.args.device) for k, v in collate([ds[i] for i in (idx or [0])]).items()}
                    c, r = self.reference_logps(batch)
                    if idx is not None:
                        local.extend(zip(idx, c.tolist(), r.tolist(), strict=True))
                        bar.advance(len(idx))  # this process's rows; the others' come in with the gather
                self.model.train(was_training)
                table = torch.zeros(len(ds), 2, dtype=torch.float64)
                for i, c, r in gather_object(local):
                    table[i, 0], table[i, 1] = c, r
                bar.finish()
            if self.is_world_process_zero():
                atomic_save(path, lambda fh: torch.save(table, fh))
        ds = ds.add_column("ref_chosen_logps", table[:, 0].tolist())
        return ds.add_column("ref_rejected_logps", table[:, 1].tolist())

    def _prepare_reference(self):
        if self.args.precompute_ref_logps:  # one fingerprint (a hash of every weight) for both passes
            fingerprint = functools.cache(self.reference_fingerprint)
            self.train_dataset = self.precompute_reference(self.train_dataset, fingerprint=fingerprint)
            self.eval_dataset = self.precompute_reference(self.eval_dataset, "reference log-probs (eval)",
                                                          fingerprint=fingerprint)

    def train(self, *args, **kwargs):
        self._prepare_reference()
        return super().train(*args, **kwargs)

    def evaluate(self, *args, **kwargs):
        if self.args.precompute_ref_logps:
            self.eval_dataset = self.precompute_reference(self.eval_dataset, "reference log-probs (eval)")
        return super().evaluate(*args, **kwargs)

    # --- loss -------------------------------------------------------------------------------------

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        mode = "train" if model.training else "eval"
        stats = self._sharded_pair_stats(inputs)  # FSDP2 / ZeRO-3: taken before the training forward
        logps, lengths, entropy = self._sequence_logps(model, inputs)
        half = inputs["row_id"].shape[0]
        if "ref_chosen_logps" in inputs:
            ref_c, ref_r = inputs["ref_chosen_logps"].to(logps.dtype), inputs["ref_rejected_logps"].to(logps.dtype)
        else:
            ref_c, ref_r = self.reference_logps(inputs)
        batch = {
            "policy_chosen_logps": logps[:half], "policy_rejected_logps": logps[half:],
            "ref_chosen_logps": ref_c, "ref_rejected_logps": ref_r,
            "chosen_lengths": lengths[:half], "rejected_lengths": lengths[half:],
        }
        self._batch_metrics = {}
        weights = self._batch_entanglement(logps, batch, stats) if self._ent_params is not None else None
        out = self.loss_fn(batch)
        loss = out.losses.mean() if weights is None else (out.losses * weights).mean()
        self.check_finite(loss, f"{mode} loss", f", batch rows {inputs['row_id'].tolist()}")
        self._record(mode, {**out.metrics, "entropy": entropy, **self._batch_metrics})
        return (loss, out) if return_outputs else loss

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad():
            loss = self.compute_loss(model, inputs)
        return loss.detach(), None, None
