"""The plots (align/plots.py, align/plot_data.py) on hand-made run folders: each figure's data equals the numbers
in the files, figures without data are not drawn (and stale ones removed), PNG sizes follow the panel count,
`align plot` on a folder without metrics is one line and status 2; allocation.jsonl's records and its cut on resume
(align/sampling/allocation_log.py)."""

import json
from types import SimpleNamespace

import pytest
from PIL import Image

from align.cli import main
from align.io import read_records
from align.plot_data import figures, metric_series
from align.plots import figure_pixels, plot_metrics, write_plots
from align.sampling import PromptStats
from align.sampling.allocation_log import AllocationLog, allocation_record


def write_jsonl(path, records, tail=""):
    path.write_text("".join(json.dumps(r) + "\n" for r in records) + tail)


def by_name(out):
    return {f.name: f for f in figures(str(out))}


def panel(fig, title):
    (p,) = [p for p in fig.panels if p.title == title]
    return p


DPO = [
    {"step": 1, "epoch": 0.1, "loss": 0.69, "grad_norm": 1.5, "logps/chosen": -3.0, "logps/rejected": -4.0,
     "rewards/chosen": 0.0, "rewards/rejected": 0.0, "rewards/margins": 0.0, "rewards/accuracies": 0.0,
     "entropy": 0.4, "learning_rate": 5e-4},
    {"step": 2, "epoch": 0.2, "loss": 0.60, "grad_norm": 2.5, "logps/chosen": -2.5, "logps/rejected": -5.0,
     "rewards/chosen": 0.05, "rewards/rejected": -0.1, "rewards/margins": 0.15, "rewards/accuracies": 0.75,
     "entropy": 0.3, "learning_rate": 5e-4},
    {"step": 2, "epoch": 0.2, "eval_loss": 0.65, "eval_rewards/accuracies": 0.5, "eval_rewards/margins": 0.1},
    {"step": 2, "epoch": 0.2, "train_runtime": 1.0, "train_loss": 0.645, "total_flos": 3.0},
    {"step": 2, "epoch": 0.2, "eval_loss": 0.64, "eval_rewards/accuracies": 0.5, "eval_rewards/margins": 0.1},
]


def test_preference_run_figures_hold_the_logged_numbers(tmp_path):
    write_jsonl(tmp_path / "metrics.jsonl", DPO)
    figs = by_name(tmp_path)
    assert list(figs) == ["curves.png", "preference.png", "policy.png"]  # no RL, allocation or iteration data
    curves = figs["curves.png"]
    assert [p.title for p in curves.panels] == ["Loss", "Preference accuracy", "Gradient norm"]
    # the final evaluation repeats step 2: the last value is kept; the closing summary (train_loss) is no curve
    assert panel(curves, "Loss").lines == {"train": ([1, 2], [0.69, 0.60]), "eval": ([2], [0.64])}
    assert panel(curves, "Preference accuracy").lines == {"train": ([1, 2], [0.0, 0.75]), "eval": ([2], [0.5])}
    pref = figs["preference.png"]
    assert panel(pref, "Log-probs of chosen and rejected").lines == {
        "chosen, train": ([1, 2], [-3.0, -2.5]), "rejected, train": ([1, 2], [-4.0, -5.0])}
    assert panel(pref, "Reward margin (chosen - rejected)").lines == {"train": ([1, 2], [0.0, 0.15]),
                                                                      "eval": ([2], [0.1])}
    assert [p.title for p in figs["policy.png"].panels] == ["Entropy"]  # no clip ratios, KL or lengths logged
    paths = write_plots(str(tmp_path))
    assert [p.rsplit("/", 1)[1] for p in paths] == ["curves.png", "preference.png", "policy.png"]
    sizes = [Image.open(p).size for p in paths]
    assert sizes == [(1280, 890), (1280, 890), (640, 470)]  # 2 a row of 6.4 x 4.2 in, + 0.5 in of title, 100 dpi
    assert [figure_pixels(n) for n in (1, 2, 3, 5)] == [(640, 470), (1280, 470), (1280, 890), (1280, 1310)]


def test_steps_that_restart_continue_the_axis_and_bad_lines_are_skipped(tmp_path):
    # the iterative driver's rounds each count from 1; a crash cuts the last line short
    path = tmp_path / "metrics.jsonl"
    write_jsonl(path, [{"step": 1, "loss": 1.0}, {"step": 2, "loss": 0.5, "ok": True, "name": "x"},
                       {"step": 1, "loss": 0.9}, {"step": 2, "loss": 0.4}, {"step": 3, "loss": float("nan")}],
                tail='{"step": 3, "loss": 0.')
    records = read_records(str(path))
    assert len(records) == 5
    assert metric_series(records) == {"loss": ([1, 2, 3, 4], [1.0, 0.5, 0.9, 0.4])}  # no bool, str or NaN


def rounds_file(path, rounds, cut=False):
    write_jsonl(path, rounds, tail='{"round": 9, "step": 19, "n": [1' if cut else "")


GVM_ROUNDS = [
    {"round": 0, "step": 1, "budget": 16, "generated": 32, "uid": [4, 7, 1, 2], "n": [8, 0, 5, 3],
     "p": [0.25, 0.0, 0.5, 0.75], "G": [4.0, 0.0, 2.0, 1.0], "reward": [0.25, None, 0.6, 0.67]},
    {"round": 1, "step": 3, "budget": 16, "generated": 16, "uid": [3, 9, 5, 6], "n": [4, 4, 6, 2],
     "p": [0.5, None, 0.25, 1.0], "G": [2.0, None, 3.0, 0.5], "reward": [0.5, 0.25, 0.33, 1.0]},
]


def test_allocation_figures_hold_allocation_jsonl(tmp_path):
    write_jsonl(tmp_path / "metrics.jsonl", [{"step": 1, "loss": 0.1, "reward": 0.4, "kl": 0.01, "entropy": 0.3,
                                              "clip_ratio/low": 0.0, "clip_ratio/high": 0.1, "clip_ratio/region": 0.1,
                                              "completions/mean_length": 5.5, "completions/clipped_ratio": 0.0}])
    rounds_file(tmp_path / "allocation.jsonl", GVM_ROUNDS, cut=True)
    figs = by_name(tmp_path)
    assert list(figs) == ["curves.png", "policy.png", "allocation.png", "allocation_last_round.png"]
    assert [p.title for p in figs["policy.png"].panels] == ["Clipped tokens", "KL to the reference", "Entropy",
                                                            "Completion length", "Truncated completions"]
    alloc = figs["allocation.png"]
    assert panel(alloc, "Rollouts per prompt").boxes == {0: [8, 0, 5, 3], 1: [4, 4, 6, 2]}
    assert panel(alloc, "Prompts dropped").lines == {"dropped": ([0, 1], [0.25, 0.0])}
    assert panel(alloc, "Rollouts per round").lines == {"budget": ([0, 1], [16, 16]),
                                                        "allocated ($\\sum n_i$)": ([0, 1], [16, 16]),
                                                        "generated (estimation included)": ([0, 1], [32, 16])}
    last = figs["allocation_last_round.png"]
    assert last.title == "Allocation of round 1 (step 3)"
    (scatter,) = last.panels
    assert scatter.scatter == ([0.5, 0.25, 1.0], [2.0, 3.0, 0.5], [4.0, 6.0, 2.0])  # uid 9 was never estimated
    assert (scatter.xlabel, scatter.ylabel, scatter.clabel) == ("estimated solve rate $p_i$",
                                                                "gradient size $G_i$ (L2 norm)", "rollouts $n_i$")
    sizes = {p.rsplit("/", 1)[1]: Image.open(p).size for p in write_plots(str(tmp_path))}
    assert sizes == {"curves.png": (1280, 470), "policy.png": (1280, 1310), "allocation.png": (1280, 890),
                     "allocation_last_round.png": (640, 470)}


def test_uniform_allocation_has_no_scatter_and_many_rounds_draw_bands(tmp_path):
    uniform = [{"round": r, "step": r + 1, "budget": 8, "generated": 8, "uid": [0, 1], "n": [4, 4],
                "p": [None, None], "G": [None, None], "reward": [0.5, 0.0]} for r in range(60)]
    rounds_file(tmp_path / "allocation.jsonl", uniform)
    write_jsonl(tmp_path / "metrics.jsonl", [])
    figs = by_name(tmp_path)
    assert list(figs) == ["allocation.png"]  # no p_i, G_i: no scatter; no metrics: no curves
    assert len(panel(figs["allocation.png"], "Rollouts per prompt").boxes) == 60  # > 40 rounds: percentile bands
    (path,) = write_plots(str(tmp_path))
    assert Image.open(path).size == (1280, 890)


def test_iterations_and_entanglement(tmp_path):
    write_jsonl(tmp_path / "iterations.jsonl", [
        {"iteration": 0, "pairs": 11, "ties_skipped": 5, "train/loss": 0.68, "eval/win_rate": 0.45,
         "eval/policy_length": 5.0, "eval/baseline_length": 5.0, "samples/mean_length": 5.5},
        {"iteration": 1, "pairs": 13, "ties_skipped": 3, "train/loss": 0.47, "eval/win_rate": 0.51,
         "eval/policy_length": 6.0, "eval/baseline_length": 5.0, "samples/mean_length": 5.7}])
    ent = {f"entanglement/{c}": v for c, v in zip(("ideal", "both_down", "both_up", "inverted"), (0.5, 0.5, 0, 0))}
    batch = {f"entanglement/batch_{c}": v for c, v in zip(("ideal", "both_down", "both_up", "inverted"),
                                                          (0.25, 0.75, 0, 0))}
    write_jsonl(tmp_path / "metrics.jsonl", [{"step": 2, "loss": 0.6, **ent, **batch}])
    # the monitor's check before step 1 is only in entanglement.jsonl (one row per probe pair)
    write_jsonl(tmp_path / "entanglement.jsonl", [{"step": 0, "pair": i, "case": c} for i, c in
                                                  enumerate(["ideal", "ideal", "ideal", "both_up"])]
                + [{"step": 2, "pair": i, "case": "ideal"} for i in range(4)])
    figs = by_name(tmp_path)
    assert list(figs) == ["curves.png", "entanglement.png", "iterations.png"]
    it = figs["iterations.png"]
    assert panel(it, "Win rate against the baseline").lines == {"policy": ([0, 1], [0.45, 0.51])}
    assert panel(it, "Win rate against the baseline").hline == 0.5
    assert panel(it, "Length").lines["policy (eval)"] == ([0, 1], [5.0, 6.0])
    assert panel(it, "Pairs").lines == {"trained on": ([0, 1], [11, 13]), "ties skipped": ([0, 1], [5, 3])}
    assert {p.xlabel for p in it.panels} == {"iteration"}
    probe = panel(figs["entanglement.png"], "Probe pairs").lines
    assert probe["ideal"] == ([0, 2], [0.75, 0.5]) and probe["both up"] == ([0, 2], [0.25, 0.0])
    assert panel(figs["entanglement.png"], "Training batches").lines["both down"] == ([2], [0.75])


def test_stale_figures_are_removed_and_metrics_file_is_followed(tmp_path):
    (tmp_path / "align_config.yaml").write_text("metrics_file: logs.jsonl\nseed: 0\n")
    write_jsonl(tmp_path / "logs.jsonl", [{"step": 1, "loss": 0.5}])
    rounds_file(tmp_path / "allocation.jsonl", GVM_ROUNDS)
    plots = tmp_path / "plots"
    plots.mkdir()
    (plots / "mine.png").write_bytes(b"not ours")
    assert len(write_plots(str(tmp_path))) == 3
    (tmp_path / "allocation.jsonl").unlink()  # e.g. overwrite_output_dir with a DPO run after an RL one
    assert [p.rsplit("/", 1)[1] for p in write_plots(str(tmp_path))] == ["curves.png"]
    assert sorted(p.name for p in plots.iterdir()) == ["curves.png", "mine.png"]


def test_align_plot_command(tmp_path, capsys):
    assert main(["plot", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err == f"error: align plot: {str(tmp_path)!r} holds no metrics.jsonl (not a run's output_dir, or the run " \
                  "has logged nothing yet)\n"
    write_jsonl(tmp_path / "metrics.jsonl", [{"step": 1, "loss": 0.5, "entropy": 0.3}])
    assert main(["plot", str(tmp_path)]) == 0
    assert capsys.readouterr().out == f"2 plot(s) in {tmp_path / 'plots'}: curves.png, policy.png\n"
    assert Image.open(tmp_path / "plots" / "curves.png").size == (640, 470)


def test_plot_metrics_draws_each_key_with_two_points(tmp_path):
    records = [{"step": 1, "loss": 1.0, "acc": 0.1, "once": 3.0}, {"step": 2, "loss": 0.5, "acc": 0.2}]
    path = tmp_path / "curves.png"
    assert plot_metrics(records, str(path), keys=["loss", "once", "missing"], title="t") == ["loss"]
    assert plot_metrics(records, str(path)) == ["acc", "loss"]
    assert Image.open(path).size == (1280, 470)  # two panels, three a row
    assert plot_metrics(records[:1], str(tmp_path / "none.png")) == [] and not (tmp_path / "none.png").exists()


# --- allocation.jsonl ------------------------------------------------------------------------------------------


def test_allocation_record_reads_the_estimates_and_rewards():
    stats = PromptStats()
    stats.update(10, 0, accept_rate=0.5, grad_norm=2.0, n_samples=4)
    stats.update(12, 1, accept_rate=0.25, grad_norm=3.5, n_samples=4)
    rows = [{"uid": 10}, {"uid": 11}, {"uid": 12}]
    samples = [SimpleNamespace(g=0, reward=1.0), SimpleNamespace(g=0, reward=0.0), SimpleNamespace(g=0, reward=1.0),
               SimpleNamespace(g=2, reward=0.5)]
    rec = allocation_record(1, 3, 12, 20, rows, [3, 0, 1], samples, stats)
    assert rec == {"round": 1, "step": 3, "budget": 12, "generated": 20, "uid": [10, 11, 12], "n": [3, 0, 1],
                   "p": [0.5, None, 0.25], "G": [2.0, None, 3.5], "reward": [pytest.approx(2 / 3), None, 0.5]}


def test_allocation_log_is_cut_back_on_resume_and_reset_on_a_fresh_run(tmp_path):
    path = tmp_path / "allocation.jsonl"
    # rounds of 2 optimizer steps: steps 1, 3, 5; a kill cut the next line short
    rounds_file(path, [{"round": r, "step": 2 * r + 1} for r in range(3)], cut=True)
    log = AllocationLog(str(tmp_path))  # resumed from checkpoint-4: round 2 (step 5) is made again
    log.append({"round": 2, "step": 5, "again": True})
    log.append({"round": 3, "step": 7})
    assert [(r["round"], r.get("again", False)) for r in read_records(str(path))] == [(0, False), (1, False),
                                                                                   (2, True), (3, False)]
    fresh = AllocationLog(str(tmp_path))  # a new run into the folder: its first round is step 1
    fresh.append({"round": 0, "step": 1, "new": True})
    assert read_records(str(path)) == [{"round": 0, "step": 1, "new": True}]
