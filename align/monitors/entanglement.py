"""Gradient entanglement of preference pairs (docs/methods.md §12): why chosen log-probs fall while the margin grows.

Yuan et al., "A Common Pitfall of Margin-based Language Model Alignment: Gradient Entanglement"
(arXiv:2410.13828). For a pair (x, y_w, y_l) write g_w = ∇_φ S_θ(y_w|x) and g_l = ∇_φ S_θ(y_l|x), the
gradients of the summed completion log-probs over a parameter subset φ. One gradient step on a margin loss
−m(d_w·S_w − d_l·S_l) moves, to first order (C > 0),

    Δ log π(y_w) ≈ C·(d_w·‖g_w‖² − d_l·⟨g_w, g_l⟩)        Δ log π(y_l) ≈ C·(d_w·⟨g_w, g_l⟩ − d_l·‖g_l‖²)

so with equal slopes (DPO, IPO on sums, hinge, robust, RPO's DPO part) the chosen log-prob rises iff
⟨g_w, g_l⟩ < ‖g_w‖² and the rejected one falls iff ⟨g_w, g_l⟩ < ‖g_l‖². The four cases:

* ``ideal``     chosen ↑, rejected ↓ (⟨g_w, g_l⟩ < min(‖g_w‖², ‖g_l‖²));
* ``both_down`` chosen ↓, rejected ↓ (‖g_w‖² < ⟨g_w, g_l⟩ < ‖g_l‖²: the common failure);
* ``both_up``   chosen ↑, rejected ↑ (‖g_l‖² < ⟨g_w, g_l⟩ < ‖g_w‖²);
* ``inverted``  chosen ↓, rejected ↑ (impossible with equal slopes: the margin always grows).

``ratio`` = ⟨g_w, g_l⟩ / min(‖g_w‖², ‖g_l‖²) (the official code's condition takes min(‖g_w‖², ‖g_w‖²), a bug
that docs/methods.md notes; this uses both norms). Everything here is exact autograd on the subset, one sequence at
a time (:func:`align.monitors.gradients.sequence_grads`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers import TrainerCallback

from align.errors import ConfigError
from align.fsdp2 import gathered
from align.modeling import pad_token_id
from align.monitors.gradients import flat_grad, select_parameters, sequence_grads

CASES = ("ideal", "both_down", "both_up", "inverted")
SUBSETS = ("all", "lora", "embeddings", "lm_head", "last_block")
# What training does with its batch's pairs predicted 'both down': nothing ("none": no batch gradients at all),
# only log the batch's case fractions ("monitor"), weigh them by entanglement_weight ("downweight"), weigh
# them 0 ("drop": a smaller step), or replace them by the batch's other pairs ("replace": the loss averaged
# over the kept pairs, so the step keeps a full batch's size).
ACTIONS = ("none", "monitor", "downweight", "drop", "replace")


def select_subset(model, spec: Sequence[str] | str,
                  key: str = "entanglement_params") -> list[tuple[str, torch.nn.Parameter]]:
    """Named parameters of a subset: ``all``, ``lora`` (adapter weights), ``embeddings`` (input embedding
    matrix), ``lm_head`` (output projection), ``last_block`` (the last decoder layer), or any substrings of
    parameter names. A spec that matches nothing is a one-line :class:`ConfigError` naming ``key``."""
    names = [spec] if isinstance(spec, str) else list(spec)
    if not names:
        raise ConfigError(f"{key}: empty parameter subset")
    named = list(model.named_parameters())
    by_id = {id(p): n for n, p in named}
    chosen: dict[str, torch.nn.Parameter] = {}
    for name in names:
        if name == "all":
            found = named
        elif name == "lora":
            found = [(n, p) for n, p in named if "lora_" in n]
        elif name in ("embeddings", "lm_head"):
            layer = model.get_input_embeddings() if name == "embeddings" else model.get_output_embeddings()
            found = [(by_id[id(layer.weight)], layer.weight)] if layer is not None and id(layer.weight) in by_id else []
        elif name == "last_block":
            blocks = sorted({int(n.split(".layers.")[1].split(".")[0]) for n, _ in named if ".layers." in n})
            found = [(n, p) for n, p in named if blocks and f".layers.{blocks[-1]}." in n]
        else:
            found = select_parameters(model, [name], key)
        if not found:
            raise ConfigError(f"{key}: subset {name!r} matches no parameter of the model")
        chosen.update(dict(found))
    return list(chosen.items())


def pair_stats(g_w: torch.Tensor, g_l: torch.Tensor, slope_ratio: float = 1.0) -> dict[str, float]:
    """The entanglement quantities of one pair from its two flattened gradients. ``slope_ratio`` = d_w/d_l
    (1 for losses on summed log-probs; |y_l|/|y_w| for per-token-averaged ones)."""
    g_w, g_l = g_w.double(), g_l.double()  # float32 dot products over millions of entries drift by ~1e-4
    dot = float(g_w @ g_l)
    sq_w, sq_l = float(g_w @ g_w), float(g_l @ g_l)
    chosen_up = dot < slope_ratio * sq_w
    rejected_down = dot < sq_l / slope_ratio
    return {"dot": dot, "norm_chosen": sq_w ** 0.5, "norm_rejected": sq_l ** 0.5,
            "cos": dot / max((sq_w * sq_l) ** 0.5, 1e-30), "ratio": dot / max(min(sq_w, sq_l), 1e-30),
            "pred_chosen": 1 if chosen_up else -1, "pred_rejected": -1 if rejected_down else 1,
            "case": case_of(chosen_up, rejected_down)}


def case_of(chosen_up: bool, rejected_down: bool) -> str:
    if chosen_up:
        return "ideal" if rejected_down else "both_up"
    return "both_down" if rejected_down else "inverted"


def batch_pair_stats(logps: torch.Tensor, params: Sequence[torch.nn.Parameter]) -> list[dict]:
    """:func:`pair_stats` of every pair of a training batch, from its live graph: ``logps`` is
    [chosen; rejected] summed log-probs ([2B], still attached). The graph is kept for the loss's backward."""
    half = logps.shape[0] // 2
    return [pair_stats(flat_grad(logps[i], params), flat_grad(logps[half + i], params)) for i in range(half)]


def entanglement(model, prompts: Sequence[Sequence[int]], chosen: Sequence[Sequence[int]],
                 rejected: Sequence[Sequence[int]], pad_id: int, params: Sequence[torch.nn.Parameter],
                 slope_ratios: Sequence[float] | None = None, chunk: int = 8,
                 block_size: int | str = "auto") -> list[dict]:
    """Per pair: :func:`pair_stats` plus ``logp_chosen`` / ``logp_rejected`` (S_θ, for the observed change).
    ``chunk``: sequences per forward (even; see :func:`align.monitors.gradients.sequence_grads`); ``block_size``:
    the run's ``logits_block_size``."""
    from contextlib import closing

    # Chosen and rejected of a pair in one chunk: [p0 w, p0 l, p1 w, p1 l, ...].
    ps = [p for p in prompts for _ in range(2)]
    cs = [c for pair in zip(chosen, rejected, strict=True) for c in pair]
    out = []
    with closing(sequence_grads(model, ps, cs, pad_id, params, 2 * max(chunk // 2, 1), block_size)) as grads:
        for i in range(len(prompts)):
            (g_w, s_w), (g_l, s_l) = next(grads), next(grads)
            row = pair_stats(g_w, g_l, 1.0 if slope_ratios is None else slope_ratios[i])
            row.update(logp_chosen=s_w, logp_rejected=s_l)
            out.append(row)
    return out


def summarize(rows: Sequence[dict], previous: Sequence[dict] | None = None) -> dict[str, float]:
    """Logged metrics of one check: the four-case fractions, median cos and ratio, mean log-probs; with the
    previous check's rows (same probe pairs, same order), the observed changes since then and how often the
    previous check's predicted signs came true."""
    import statistics

    n = max(len(rows), 1)
    out = {f"entanglement/{c}": sum(r["case"] == c for r in rows) / n for c in CASES}
    out["entanglement/cos_median"] = statistics.median(r["cos"] for r in rows)
    out["entanglement/ratio_median"] = statistics.median(r["ratio"] for r in rows)
    out["entanglement/logps_chosen"] = statistics.fmean(r["logp_chosen"] for r in rows)
    out["entanglement/logps_rejected"] = statistics.fmean(r["logp_rejected"] for r in rows)
    if previous:
        dw = [r["logp_chosen"] - q["logp_chosen"] for r, q in zip(rows, previous, strict=True)]
        dl = [r["logp_rejected"] - q["logp_rejected"] for r, q in zip(rows, previous, strict=True)]
        out["entanglement/observed_chosen_up"] = sum(d > 0 for d in dw) / n
        out["entanglement/observed_rejected_down"] = sum(d < 0 for d in dl) / n
        hits = sum((d > 0) == (q["pred_chosen"] > 0) for d, q in zip(dw, previous, strict=True))
        hits += sum((d < 0) == (q["pred_rejected"] < 0) for d, q in zip(dl, previous, strict=True))
        out["entanglement/sign_agreement"] = hits / (2 * n)
    return out


class EntanglementMonitor(TrainerCallback):
    """A ``transformers`` callback: before the first step and every ``every`` optimizer steps, the
    entanglement of a fixed probe set of pairs (rows with ``prompt_ids``, ``chosen_ids``, ``rejected_ids``).
    The probe pairs are split across processes and gathered, so every process logs the same numbers; the
    per-pair table goes to ``<output_dir>/entanglement.jsonl`` (one line per pair per check, from the main
    process) and the summary of each check into the trainer's logs (``entanglement/*``): the check before the first
    step, the baseline of the observed changes, as its own record at step 0, the later ones averaged into the next
    log."""

    FILE = "entanglement.jsonl"

    def __init__(self, trainer, probe, params: Sequence[str], every: int):
        if every < 1:
            raise ConfigError(f"entanglement_steps: must be >= 1, got {every}")
        missing = [c for c in ("prompt_ids", "chosen_ids", "rejected_ids") if c not in probe.column_names]
        if missing:
            raise ConfigError(f"entanglement_probe: rows are not tokenised pairs (missing {', '.join(missing)})")
        self.trainer, self.every = trainer, every
        self.probe = [probe[i] for i in range(len(probe))]
        self.spec = params
        select_subset(trainer.accelerator.unwrap_model(trainer.model), params)  # a spec matching nothing: now
        tok = trainer.processing_class
        self.pad_id = pad_token_id(tok)
        self.previous: list[dict] | None = None
        self.history: list[tuple[int, dict[str, float]]] = []

    def check(self, step: int) -> dict[str, float]:
        import json
        import os

        from accelerate.utils import gather_object

        t = self.trainer
        rank, world = t.accelerator.process_index, t.accelerator.num_processes
        mine = list(range(rank, len(self.probe), world))
        model = t.accelerator.unwrap_model(t.model)
        with gathered(model):  # FSDP2 / ZeRO-3: whole weights and whole gradients, each process its own pairs
            params = [p for _, p in select_subset(model, self.spec)]  # the gathered parameters while open
            rows = entanglement(model, [self.probe[i]["prompt_ids"] for i in mine],
                                [self.probe[i]["chosen_ids"] for i in mine],
                                [self.probe[i]["rejected_ids"] for i in mine], self.pad_id, params,
                                block_size=t.args.logits_block_size)
        for i, row in zip(mine, rows, strict=True):
            row["pair"] = i
        rows = sorted(gather_object(rows), key=lambda r: r["pair"])
        metrics = summarize(rows, self.previous)
        self.previous = rows
        self.history.append((step, metrics))
        if t.accelerator.is_main_process:
            os.makedirs(t.args.output_dir, exist_ok=True)
            with open(os.path.join(t.args.output_dir, self.FILE), "a", encoding="utf-8") as fh:
                fh.writelines(json.dumps({"step": step, **r}) + "\n" for r in rows)
        return metrics

    def on_train_begin(self, args, state, control, **kwargs):
        if self.previous is None:
            baseline = self.check(state.global_step)
            if state.global_step == 0:  # logged as step 0 (a resumed run's check only rebases the observed changes)
                self.trainer.log_now(baseline)

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step % self.every == 0:
            self.trainer.record_global("train", self.check(state.global_step))

    def on_train_end(self, args, state, control, **kwargs):
        if self.trainer.accelerator.is_main_process and self.history:
            import os

            plot_history(self.history, os.path.join(args.output_dir, "entanglement.png"))


def plot_history(history: Sequence[tuple[int, dict[str, float]]], path: str) -> None:
    """Two panels over the monitor's checks: the four-case fractions, and the probe pairs' mean chosen and
    rejected log-probs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [s for s, _ in history]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for case in CASES:
        left.plot(steps, [m[f"entanglement/{case}"] for _, m in history], marker="o", label=case.replace("_", " "))
    left.set(xlabel="step", ylabel="fraction of probe pairs", title="predicted gradient-entanglement case",
             ylim=(-0.02, 1.02))
    left.legend()
    for key, label in (("logps_chosen", "chosen"), ("logps_rejected", "rejected")):
        right.plot(steps, [m[f"entanglement/{key}"] for _, m in history], marker="o", label=label)
    right.set(xlabel="step", ylabel="mean summed log-prob", title="probe pairs' log-probs")
    right.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
