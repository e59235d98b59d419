"""The plots at the end of real runs (`align train` in process, then `align plot`): a tiny DPO run with the
entanglement monitor and a tiny GRPO (GVM) run resumed from a checkpoint. The PNGs exist at their sizes, and the data
behind each figure is the run's own numbers: metrics.jsonl's curves, and allocation.jsonl's per-round n_i (summing to
the round's budget, agreeing with the round's allocation/* and gvm/* metrics, cut back on resume)."""

import json
import statistics

import pytest
from PIL import Image

from align.cli import main as cli
from align.plot_data import figures
from align.plots import figure_pixels, write_plots
from align.recipe import get_recipe, main

TINY = ["logging_steps=1", "max_train_samples=64", "disable_tqdm=true"]


def train(recipe, config, out, *overrides):
    assert main(get_recipe(recipe), ["--config", config, f"output_dir={out}", *TINY, *overrides]) == 0


def records(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def curve(rows, key):
    pts = [(r["step"], r[key]) for r in rows if key in r and "train_runtime" not in r]
    return [x for x, _ in pts], [y for _, y in pts]


def panel(fig, title):
    (p,) = [p for p in fig.panels if p.title == title]
    return p


def check_pngs(out, expected):
    """plots/ holds exactly ``expected`` (name -> panel count), each a PNG of its size; `align plot` redraws the
    same files."""
    figs = {f.name: f for f in figures(str(out))}
    assert {name: len(f.panels) for name, f in figs.items()} == expected
    assert sorted(p.name for p in (out / "plots").iterdir()) == sorted(expected)  # written at the end of the run
    for name, panels in expected.items():
        with Image.open(out / "plots" / name) as png:
            assert png.format == "PNG" and png.size == figure_pixels(panels)
    assert cli(["plot", str(out)]) == 0
    assert sorted(p.rsplit("/", 1)[1] for p in write_plots(str(out))) == sorted(expected)
    return figs


@pytest.fixture(scope="module")
def dpo_run(repo, testbed, tmp_path_factory):
    out = tmp_path_factory.mktemp("plots") / "dpo"
    train("dpo", str(repo / "configs/dpo/testbed.yaml"), out, "max_steps=4", "per_device_train_batch_size=8",
          "max_eval_samples=16", "eval_strategy=steps", "eval_steps=2", "entanglement_steps=2",
          "entanglement_probe_size=8", "entanglement_params=[lm_head]")
    return out


@pytest.mark.slow
def test_dpo_run_plots_its_curves_pairs_and_entanglement(dpo_run):
    out = dpo_run
    figs = check_pngs(out, {"curves.png": 3, "preference.png": 3, "policy.png": 1, "entanglement.png": 1})
    assert figure_pixels(3) == (1280, 890) and figure_pixels(1) == (640, 470)
    rows = records(out / "metrics.jsonl")
    curves = figs["curves.png"]
    assert [p.title for p in curves.panels] == ["Loss", "Preference accuracy", "Gradient norm"]
    assert panel(curves, "Loss").lines["train"] == curve(rows, "loss")
    assert panel(curves, "Loss").lines["train"][0] == [1, 2, 3, 4]
    evals = [r for r in rows if "eval_loss" in r]
    assert [r["step"] for r in evals] == [2, 4, 4]  # periodic evaluations, then the final one
    assert panel(curves, "Loss").lines["eval"] == ([2, 4], [evals[0]["eval_loss"], evals[2]["eval_loss"]])
    pairs = figs["preference.png"]
    for key, label in (("logps/chosen", "chosen, train"), ("logps/rejected", "rejected, train"),
                       ("rewards/chosen", "chosen, train")):
        title = "Log-probs of chosen and rejected" if key.startswith("logps") else "Implicit rewards"
        assert panel(pairs, title).lines[label] == curve(rows, key)
    assert panel(pairs, "Reward margin (chosen - rejected)").lines["eval"][0] == [2, 4]
    # the probe's case fractions: the check before step 1 as entanglement.jsonl has it, the later ones as logged
    (probe,) = figs["entanglement.png"].panels
    table = records(out / "entanglement.jsonl")
    assert [sum(t["step"] == s for t in table) for s in (0, 2, 4)] == [8, 8, 8]
    for case, label in (("ideal", "ideal"), ("both_down", "both down")):
        xs, ys = probe.lines[label]
        assert xs == [0, 2, 4]
        assert ys[0] == sum(t["case"] == case for t in table if t["step"] == 0) / 8
        logged = dict(zip(*curve(rows, f"entanglement/{case}")))  # (the step-0 check is logged too, or not)
        assert ys[1:] == [logged[2], logged[4]]
    assert sum(probe.lines[label][1][0] for label in ("ideal", "both down", "both up", "inverted")) == 1.0


@pytest.fixture(scope="module")
def grpo_run(repo, testbed, tmp_path_factory):
    """GVM for one round (2 steps, checkpoint-2), then a crash's leftovers in allocation.jsonl (a whole line of the
    next round and a cut one), then resumed to 3 rounds."""
    out = tmp_path_factory.mktemp("plots") / "grpo"
    args = (str(repo / "configs/grpo/testbed.yaml"), out, "allocator=gvm", "per_device_train_batch_size=4",
            "num_generations=4", "num_minibatches=2", "beta=0.04", "max_eval_samples=8", "eval_num_samples=0",
            "save_strategy=steps", "save_steps=2")
    train("grpo", *args, "max_steps=2")
    first = records(out / "allocation.jsonl")
    assert [r["round"] for r in first] == [0]
    with open(out / "allocation.jsonl", "a") as fh:
        fh.write(json.dumps({**first[0], "round": 1, "step": 3, "n": [16, 0, 0, 0]}) + "\n" + '{"round": 2, "st')
    train("grpo", *args, "max_steps=6", "resume_from_checkpoint=true")
    return out


@pytest.mark.slow
def test_grpo_gvm_run_plots_allocation_from_its_rounds(grpo_run):
    out = grpo_run
    figs = check_pngs(out, {"curves.png": 3, "policy.png": 5, "allocation.png": 3, "allocation_last_round.png": 1})
    rows = records(out / "metrics.jsonl")
    rounds = records(out / "allocation.jsonl")  # every line whole: the crash's leftovers were cut on resume
    assert [(r["round"], r["step"]) for r in rounds] == [(0, 1), (1, 3), (2, 5)]
    for r in rounds:
        assert r["budget"] == 16 and sum(r["n"]) == 16 and len(r["n"]) == len(r["p"]) == len(r["G"]) == 4
        logged = next(m for m in rows if m["step"] == r["step"] and "allocation/max" in m)  # the round's metrics
        live = [n for n in r["n"] if n > 0]
        assert logged["allocation/max"] == max(r["n"]) and logged["allocation/min"] == min(live)
        assert logged["allocation/median"] == statistics.median(live)
        assert logged["allocation/prompts_dropped"] == r["n"].count(0)
        assert logged["rollouts/round"] == r["generated"]
        assert logged["gvm/p_mean"] == pytest.approx(statistics.fmean(r["p"]))
        assert logged["gvm/G_max"] == pytest.approx(max(r["G"]))
        for n, reward in zip(r["n"], r["reward"]):
            assert (reward is None) == (n == 0) and (reward is None or 0.0 <= reward <= 1.0)
    alloc = figs["allocation.png"]
    assert panel(alloc, "Rollouts per prompt").boxes == {r["round"]: r["n"] for r in rounds}
    assert panel(alloc, "Rollouts per round").lines["budget"] == ([0, 1, 2], [16.0, 16.0, 16.0])
    (scatter,) = figs["allocation_last_round.png"].panels
    assert scatter.scatter == (rounds[2]["p"], rounds[2]["G"], rounds[2]["n"])
    assert figs["allocation_last_round.png"].title == "Allocation of round 2 (step 5)"
    curves, policy = figs["curves.png"], figs["policy.png"]
    assert panel(curves, "Reward").lines["train rollouts"] == ([1, 3, 5], curve(rows, "reward")[1])
    assert panel(curves, "Reward").lines["eval, greedy"] == curve(rows, "eval_reward")
    assert panel(policy, "KL to the reference").lines["train"] == curve(rows, "kl")
    assert panel(policy, "Clipped tokens").lines["high (ratio > 1+eps, A > 0)"] == curve(rows, "clip_ratio/high")
    assert panel(policy, "Completion length").lines["train, mean"][0] == [1, 3, 5]
