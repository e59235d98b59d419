"""The numbers behind a run's plots: what :mod:`align.plots` draws, read from the files the run wrote.

:func:`figures` reads ``output_dir`` (``metrics.jsonl`` or the config's ``metrics_file``; ``allocation.jsonl``
of RL runs; ``iterations.jsonl`` of iterative runs; ``entanglement.jsonl`` of the entanglement monitor) and returns
each figure as panels of plain series, so a test can check a plot's data against the run's numbers. A panel
without data is left out, and a figure without panels too. Files may be read while the run writes them: a line
cut short is skipped.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field

from align.io import read_records
from align.sampling.allocation_log import FILE as ALLOCATION_FILE

Points = tuple[list[float], list[float]]  # xs, ys (sorted by x)


@dataclass
class Panel:
    title: str
    ylabel: str
    xlabel: str = "optimizer step"
    lines: dict[str, Points] = field(default_factory=dict)  # legend label -> points
    boxes: dict[int, list[float]] = field(default_factory=dict)  # x -> the values whose distribution is drawn
    scatter: tuple[list[float], list[float], list[float]] | None = None  # x, y, colour
    clabel: str = ""  # the colour bar's label (scatter)
    hline: float | None = None  # a dashed reference line (e.g. a 0.5 win rate)

    def empty(self) -> bool:
        return not (any(xs for xs, _ in self.lines.values()) or self.boxes or (self.scatter and self.scatter[0]))


@dataclass
class Figure:
    name: str  # file name under <output_dir>/plots/
    title: str
    panels: list[Panel]


def metrics_path(output_dir: str) -> str:
    """``metrics.jsonl`` of the run in ``output_dir``, or the ``metrics_file`` its saved config names."""
    name = "metrics.jsonl"
    config = os.path.join(output_dir, "align_config.yaml")
    if os.path.isfile(config):
        import yaml

        with open(config, encoding="utf-8") as fh:
            saved = yaml.safe_load(fh)
        if isinstance(saved, dict) and isinstance(saved.get("metrics_file"), str):
            name = saved["metrics_file"]
    return os.path.join(output_dir, name)


def number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def metric_series(records: list[dict]) -> dict[str, Points]:
    """Every numeric metric against the optimizer step. Steps that restart (the iterative driver's rounds each
    count from 1) continue after the last one, so the x axis is the run's steps in order; a metric logged twice at
    one step (the final evaluation after the last periodic one) keeps its last value; the run's closing summary
    (``train_runtime``, ``train_loss``) is not a curve."""
    found: dict[str, dict[float, float]] = {}
    offset, last = 0, None
    for r in records:
        step = r.get("step")
        if not number(step):
            continue
        if last is not None and step < last:
            offset += last
        last = step
        if "train_runtime" in r:
            continue
        for k, v in r.items():
            if k not in ("step", "epoch") and number(v):
                found.setdefault(k, {})[offset + step] = float(v)
    return {k: (sorted(pts), [pts[x] for x in sorted(pts)]) for k, pts in found.items()}


def _panel(series: dict[str, Points], title: str, ylabel: str, keys: list[tuple[str, str]], **kw) -> Panel:
    return Panel(title, ylabel, lines={label: series[k] for k, label in keys if k in series}, **kw)


def training_figures(series: dict[str, Points]) -> list[Figure]:
    """The curves of ``metrics.jsonl``: training curves, preference pairs, policy diagnostics, entanglement."""
    fns = sorted(k[len("rewards/"):-len("/mean")] for k in series if k.startswith("rewards/") and k.endswith("/mean"))
    curves = [
        _panel(series, "Loss", "loss", [("loss", "train"), ("eval_loss", "eval")]),
        _panel(series, "Reward", "mean reward per completion", [("reward", "train rollouts"),
               ("eval_reward", "eval, greedy"), ("eval_sampled_reward", "eval, sampled")]),
        _panel(series, "Reward functions", "mean reward per completion",
               [(f"rewards/{f}/mean", f) for f in fns] if len(fns) > 1 else []),
        _panel(series, "Preference accuracy", "fraction of pairs, chosen reward > rejected",
               [("rewards/accuracies", "train"), ("eval_rewards/accuracies", "eval")]),
        _panel(series, "Gradient norm", "L2 norm (before clipping)", [("grad_norm", "train")]),
    ]
    pairs = [
        _panel(series, "Log-probs of chosen and rejected", "log-prob of the response (nats, summed)",
               [("logps/chosen", "chosen, train"), ("logps/rejected", "rejected, train"),
                ("eval_logps/chosen", "chosen, eval"), ("eval_logps/rejected", "rejected, eval")]),
        _panel(series, "Implicit rewards", r"$\beta \cdot \log\,\pi / \pi_{ref}$ (summed over the response)",
               [("rewards/chosen", "chosen, train"), ("rewards/rejected", "rejected, train"),
                ("eval_rewards/chosen", "chosen, eval"), ("eval_rewards/rejected", "rejected, eval")]),
        _panel(series, "Reward margin (chosen - rejected)", r"$\beta \cdot$ (log-ratio of chosen - of rejected)",
               [("rewards/margins", "train"), ("eval_rewards/margins", "eval")]),
    ]
    policy = [
        _panel(series, "Clipped tokens", "fraction of completion tokens",
               [("clip_ratio/low", "low (ratio < 1-eps, A < 0)"), ("clip_ratio/high", "high (ratio > 1+eps, A > 0)"),
                ("clip_ratio/region", "either"), ("rollout/is_clipped", "IS weight capped")]),
        _panel(series, "KL to the reference", "KL (nats per token)", [("kl", "train")]),
        _panel(series, "Entropy", "entropy (nats per token)", [("entropy", "train"), ("eval_entropy", "eval")]),
        _panel(series, "Completion length", "tokens",
               [("completions/mean_length", "train, mean"), ("eval_completion_length", "eval, greedy"),
                ("eval_sampled_completion_length", "eval, sampled")]),
        _panel(series, "Truncated completions", "fraction at max_completion_length",
               [("completions/clipped_ratio", "train")]),
    ]
    cases = [(c, c.replace("_", " ")) for c in entanglement_cases(series)]
    entangled = [
        _panel(series, "Probe pairs", "fraction of probe pairs", [(f"entanglement/{c}", label) for c, label in cases]),
        _panel(series, "Training batches", "fraction of the batch's pairs",
               [(f"entanglement/batch_{c}", label) for c, label in cases]),
    ]
    return [Figure("curves.png", "Training curves", curves),
            Figure("preference.png", "Preference pairs: log-probs and implicit rewards", pairs),
            Figure("policy.png", "Policy: clipping, KL, entropy, completion lengths", policy),
            Figure("entanglement.png", "Gradient entanglement: predicted case of each pair", entangled)]


def entanglement_cases(series: dict[str, Points]) -> tuple[str, ...]:
    """The entanglement monitor's four cases, for a run that logged them (torch is loaded only then)."""
    if not any(k.startswith("entanglement/") for k in series):
        return ()
    from align.monitors.entanglement import CASES

    return CASES


def with_probe_baseline(series: dict[str, Points], rows: list[dict]) -> dict[str, Points]:
    """``series`` plus the entanglement monitor's check before the first step (step 0, in ``entanglement.jsonl``
    only) when ``metrics.jsonl`` lacks it."""
    first = [r for r in rows if r.get("step") == 0]
    cases = entanglement_cases(series)
    if not first or not cases or f"entanglement/{cases[0]}" not in series or 0 in series[f"entanglement/{cases[0]}"][0]:
        return series
    out = dict(series)
    for c in cases:
        xs, ys = series.get(f"entanglement/{c}", ([], []))
        out[f"entanglement/{c}"] = ([0.0, *xs], [sum(r.get("case") == c for r in first) / len(first), *ys])
    return out


def allocation_figures(rounds: list[dict]) -> list[Figure]:
    """From ``allocation.jsonl``: the distribution of n_i per round, what each round cost, and the last round's
    prompts by (p_i, G_i) coloured by n_i."""
    rounds = [r for r in rounds if all(k in r for k in ("round", "step", "budget", "generated", "n", "p", "G"))]
    if not rounds:
        return []
    idx = [r["round"] for r in rounds]
    spread = Panel("Rollouts per prompt", "rollouts $n_i$ of a prompt", "round",
                   boxes={r["round"]: [float(n) for n in r["n"]] for r in rounds})
    dropped = Panel("Prompts dropped", "fraction of prompts with $n_i = 0$", "round",
                    lines={"dropped": (idx, [sum(n == 0 for n in r["n"]) / max(len(r["n"]), 1) for r in rounds])})
    cost = Panel("Rollouts per round", "rollouts", "round",
                 lines={"budget": (idx, [float(r["budget"]) for r in rounds]),
                        "allocated ($\\sum n_i$)": (idx, [float(sum(r["n"])) for r in rounds]),
                        "generated (estimation included)": (idx, [float(r["generated"]) for r in rounds])})
    figures = [Figure("allocation.png", "Rollout allocation per round", [spread, dropped, cost])]
    last = rounds[-1]
    known = [(p, g, n) for p, g, n in zip(last["p"], last["G"], last["n"]) if number(p) and number(g)]
    if known:
        ps, gs, ns = (list(map(float, col)) for col in zip(*known))
        panel = Panel("Prompts by estimated solve rate and gradient size", "gradient size $G_i$ (L2 norm)",
                      "estimated solve rate $p_i$", scatter=(ps, gs, ns), clabel="rollouts $n_i$")
        figures.append(Figure("allocation_last_round.png",
                              f"Allocation of round {last['round']} (step {last['step']})", [panel]))
    return figures


def iteration_figures(records: list[dict]) -> list[Figure]:
    """From ``iterations.jsonl``: win rate, lengths, pairs and loss per iteration."""
    records = [r for r in records if number(r.get("iteration"))]
    series = {k: ([float(r["iteration"]) for r in records if number(r.get(k))],
                  [float(r[k]) for r in records if number(r.get(k))]) for k in {k for r in records for k in r}}
    series = {k: v for k, v in series.items() if v[0]}
    panels = [
        _panel(series, "Win rate against the baseline", "win rate", [("eval/win_rate", "policy")],
               xlabel="iteration", hline=0.5),
        _panel(series, "Length", "mean tokens per response",
               [("eval/policy_length", "policy (eval)"), ("eval/baseline_length", "baseline (eval)"),
                ("samples/mean_length", "sampled for pairs"), ("pairs/chosen_length", "chosen"),
                ("pairs/rejected_length", "rejected")], xlabel="iteration"),
        _panel(series, "Pairs", "pairs", [("pairs", "trained on"), ("ties_skipped", "ties skipped")],
               xlabel="iteration"),
        _panel(series, "Training loss", "mean loss of the iteration", [("train/loss", "train")], xlabel="iteration"),
    ]
    return [Figure("iterations.png", "Iterations", panels)]


def figures(output_dir: str) -> list[Figure]:
    """Every figure of the run in ``output_dir`` that has data, each without its empty panels."""
    series = metric_series(read_records(metrics_path(output_dir)))
    series = with_probe_baseline(series, read_records(os.path.join(output_dir, "entanglement.jsonl")))
    out = (training_figures(series) + allocation_figures(read_records(os.path.join(output_dir, ALLOCATION_FILE)))
           + iteration_figures(read_records(os.path.join(output_dir, "iterations.jsonl"))))
    for fig in out:
        fig.panels = [p for p in fig.panels if not p.empty()]
    return [fig for fig in out if fig.panels]
