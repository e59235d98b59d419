"""Testbed spec 3 (issue 19): multi-digit arithmetic with a worked scratchpad, its split, tokenizer, reward and
build. The spec-2 testbed stays the default and its cache folder does not move."""

import pytest

from align.config import load_config
from align.errors import ConfigError
from align.rewards.math import accuracy_reward, is_correct
from align.testbed import arith
from align.testbed.build import spec_hash


@pytest.mark.parametrize(
    "task, a, b, solution, difficulty",
    [
        # Hand-worked: right to left, carry (borrow) in as the last term, a borrow shows as a two-digit top.
        ("add4d", 4738, 2965, "8+5+0=13 3+6+1=10 7+9+1=17 4+2+1=7 Answer: 7703", 4 + 3),
        ("add2d", 12, 34, "2+4+0=6 1+3+0=4 Answer: 46", 2),
        ("add2d", 99, 99, "9+9+0=18 9+9+1=19 Answer: 198", 2 + 1),  # the last column's carry is no step's input
        ("sub4d", 5302, 2865, "12-5-0=7 10-6-1=3 13-8-1=4 5-2-1=2 Answer: 2437", 4 + 3),
        ("sub4d", 5302, 5299, "12-9-0=3 10-9-1=0 3-2-1=0 5-5-0=0 Answer: 3", 4 + 2),  # leading zeros dropped
        ("sub3d", 987, 123, "7-3-0=4 8-2-0=6 9-1-0=8 Answer: 864", 3),
        ("mul4d", 4738, 7, "8*7+0=56 3*7+5=26 7*7+2=51 4*7+5=33 Answer: 33166", 4 + 3),
        ("mul2d", 11, 3, "1*3+0=3 1*3+0=3 Answer: 33", 2),
    ],
)
def test_worked_solutions_by_hand(task, a, b, solution, difficulty):
    p = arith.make_problem(task, a, b)
    assert p.question == f"What is {a}{arith.OPS[task[:3]]}{b}?"
    assert p.solution() == solution
    assert p.difficulty == difficulty
    assert is_correct(p.solution(), eval(f"{a}{arith.OPS[task[:3]]}{b}"))  # noqa: S307


@pytest.mark.parametrize("name", list(arith.TASKS))
def test_every_task_is_exact_and_graded(name):
    task = arith.get_task(name)
    for p in arith.problems((name,), n=40, split="train", seed=5):
        lhs = p.question.removeprefix("What is ").removesuffix("?")
        a = int(lhs.replace("+", " ").replace("-", " ").replace("*", " ").split()[0])
        assert eval(lhs) == p.answer >= 0 and len(str(a)) == task.digits  # noqa: S307
        assert len(p.steps) == task.digits and task.digits <= p.difficulty <= 2 * task.digits - 1
        assert is_correct(p.solution(), p.answer) and not is_correct(p.solution(p.answer + 1), p.answer)


def test_train_and_held_out_never_overlap():
    names = ("add2d", "sub2d", "mul2d", "mul3d", "add5d")
    held = {p.question for p in arith.problems(names, n=None, split="test")}
    assert all(arith.is_held_out(q) for q in held)
    train = {p.question for s in (0, 1) for p in arith.problems(names, n=5000, split="train", seed=s)}
    assert not held & train and len(train) > 4000
    # mul2d has 720 problems, so its held-out pool is every held-out one of them; the others fill TEST_POOL.
    sizes = {n: len(arith.test_pool(n)) for n in names}
    assert sizes["mul2d"] == sum(arith.is_held_out(f"What is {a}*{b}?") for a in range(10, 100) for b in range(2, 10))
    assert 40 < sizes["mul2d"] < 110 and sizes["add2d"] == sizes["mul3d"] == arith.TEST_POOL
    # Deterministic, and the seed changes the train draw.
    assert arith.problems(names, n=10, seed=1) == arith.problems(names, n=10, seed=1)
    assert arith.problems(names, n=10, seed=1) != arith.problems(names, n=10, seed=2)


def test_rows_and_reward():
    rows = arith.dataset("rl", ("add3d", "mul4d"), n=4, split="test")
    assert rows.column_names == ["prompt", "task", "difficulty", "answer", "solution"]
    assert rows["task"] == ["add3d", "mul4d"] * 2
    assert accuracy_reward(rows["solution"], answer=rows["answer"]) == [1.0] * 4
    p = arith.make_problem("add4d", 4738, 2965)
    cut = "8+5+0=13 3+6+1=10 7+9+1=17 4+2+1=7"  # the scratchpad alone states no answer
    wrong = "8+5+0=13 3+6+1=10 7+9+1=17 4+2+1=7 Answer: 7603"
    assert accuracy_reward([p.solution(), cut, wrong, "Answer: 7703"], answer=[7703] * 4) == [1.0, 0, 0, 1.0]
    pairs = arith.dataset("preference", ("sub5d",), n=6, fmt="standard")
    for r in pairs:
        assert is_correct(r["chosen"], r["answer"]) and not is_correct(r["rejected"], r["answer"])
        assert r["chosen"].rsplit("Answer", 1)[0] == r["rejected"].rsplit("Answer", 1)[0]  # same columns
    with pytest.raises(ValueError, match="unknown testbed task 'add6d'"):
        arith.problems(("add6d",), n=1)


def test_tokenizer_one_token_per_digit():
    from align.testbed.spec3 import train_tokenizer

    tok = train_tokenizer()
    p = arith.make_problem("sub5d", 50302, 12865)
    ids = tok(p.solution(), add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == p.solution()
    digits = [t for t in tok.convert_ids_to_tokens(ids) if any(c.isdigit() for c in t)]
    assert all(len(t.lstrip("Ġ")) == 1 for t in digits) and len(digits) == sum(c.isdigit() for c in p.solution())


def test_spec3_beside_spec2(tmp_path, monkeypatch):
    from align.args import DataArguments
    from align.testbed.build import default_dir, ensure_testbed

    monkeypatch.delenv("ALIGN_TESTBED_DIR", raising=False)
    monkeypatch.delenv("ALIGN_TESTBED_V3_DIR", raising=False)
    assert default_dir().name == f"testbed-v2-{spec_hash()}" and default_dir(3).name == f"testbed-v3-{spec_hash(3)}"
    assert spec_hash(2) != spec_hash(3)
    with pytest.raises(ConfigError, match="testbed spec 4: unknown"):
        ensure_testbed(tmp_path / "x", spec=4)
    with pytest.raises(ConfigError, match="mixes spec-2 and spec-3 tasks"):
        DataArguments(dataset_name="testbed:rl", testbed_tasks=["add1", "add2d"]).validate()
    DataArguments(dataset_name="testbed:rl", testbed_tasks=["add2d", "mul5d"]).validate()


@pytest.mark.slow
def test_short_spec3_build(tmp_path, monkeypatch):
    """The spec-3 build, with a 4-step warm-up: folders, info, and the warm-up's eval on the RL mix."""
    from align.testbed import build, spec3

    monkeypatch.setitem(spec3.WARMUP, "max_steps", 4)
    monkeypatch.setitem(spec3.WARMUP, "max_train_samples", 64)
    monkeypatch.setattr(spec3, "EVAL_PER_TASK", 2)
    build.build(tmp_path, progress=False, spec=3)
    info = build.Testbed(tmp_path).info
    assert info["spec_version"] == 3 and info["warmup"]["max_steps"] == 4
    assert info["parameters"] == sum(p.numel() for p in spec3.build_model(spec3.train_tokenizer()).parameters())
    after = info["held_out_accuracy"]["policy"]
    assert set(after) >= {"accuracy", "format"} | {f"accuracy/{t}" for t in spec3.WARMUP["testbed_tasks"]}
    assert (tmp_path / "policy" / "config.json").is_file() and (tmp_path / "base" / "tokenizer.json").is_file()


@pytest.mark.slow
@pytest.mark.xdist_group("testbed_v3")  # one worker builds the spec-3 cache, the other goes on
def test_grpo_raises_held_out_accuracy_on_spec3(tmp_path, repo):
    """Issue 19's qualitative facts on the built spec-3 testbed, on problems no training split serves: the warm-up
    leaves partial competence on the RL mix (per-prompt solve rates spread inside (0, 1)), and 80 steps of the
    shipped GRPO config raise mean@8 with margin without lowering greedy accuracy (the spec-2 testbed's greedy
    accuracy fell under GRPO). The measured runs: scripts/testbed_v3_grpo.py and scripts/bench_gvm.py, 3 seeds of
    240-360 steps (docs/benchmarks.md); at step 80 of those mean@8 had risen by 6-8 points, greedy by 2-4."""
    from align.evaluation import held_out
    from align.recipes.grpo import GRPORecipeConfig, build_trainer
    from align.testbed.spec3 import MAX_NEW_TOKENS

    cfg = load_config(GRPORecipeConfig, str(repo / "configs/grpo/testbed-v3.yaml"),
                      {"output_dir": str(tmp_path), "max_steps": 80, "disable_tqdm": True, "report_to": "none"})
    trainer = build_trainer(cfg)
    rows = arith.rl_rows(tuple(cfg.testbed_tasks), n=64 * len(cfg.testbed_tasks), split="test")
    before = held_out(trainer.model, trainer.processing_class, rows, 8, MAX_NEW_TOKENS)
    assert 0.3 <= before["greedy"] <= 0.65, before["greedy"]
    assert sum(0 < s < 1 for s in before["solve_rates"]) >= len(rows) // 3, before["solve_rates"]
    trainer.train()
    after = held_out(trainer.accelerator.unwrap_model(trainer.model), trainer.processing_class, rows, 8,
                     MAX_NEW_TOKENS)
    assert after["mean_at_k"] - before["mean_at_k"] >= 0.04, (before["mean_at_k"], after["mean_at_k"])
    assert after["greedy"] >= before["greedy"], (before["greedy"], after["greedy"])


@pytest.mark.slow
@pytest.mark.xdist_group("testbed_v3")  # one worker builds the spec-3 cache, the other goes on
def test_rpo_keeps_chosen_logps_where_dpo_lowers_them_on_spec3(tmp_path, repo):
    """docs/methods.md §3 on spec 3, with scripts/bench_rpo.py's pairs and settings (the policy's own right and wrong
    samples of sub2d + mul2d prompts; 120 steps of 16, lr 2e-5, β 0.1; RPO η 1, sft_norm mean), seed 0. Measured on
    held-out pairs (3 seeds, 2026-12-02): DPO moves the chosen log-prob by −1.17 nats (spread 0.07), RPO by −0.11 and
    ends 1.04–1.09 above DPO."""
    from align.modeling import load_model, load_tokenizer
    from align.quickstart import write_verifier_pairs
    from align.recipes.dpo import DPORecipeConfig, build_trainer
    from align.testbed.build import ensure_testbed

    policy, tasks = str(ensure_testbed(spec=3, progress=False).policy), ("sub2d", "mul2d")
    tok, model = load_tokenizer(policy), load_model(policy)
    write_verifier_pairs(model, tok, tmp_path / "train.jsonl", spec=3, tasks=tasks, reference=False)
    write_verifier_pairs(model, tok, tmp_path / "held.jsonl", spec=3, tasks=tasks, split="test", prompts=None,
                         reference=False)
    chosen = {}
    for objective, extra in (("dpo", {}), ("rpo", {"eta": 1.0, "sft_norm": "mean"})):
        trainer = build_trainer(load_config(DPORecipeConfig, repo / "configs/dpo/testbed.yaml", {
            "output_dir": str(tmp_path / objective), "model_name_or_path": "testbed:v3-policy",
            "testbed_tasks": list(tasks), "max_length": 128, "dataset_name": str(tmp_path / "train.jsonl"),
            "dataset_test_split": "test", "eval_dataset_name": str(tmp_path / "held.jsonl"),
            "max_eval_samples": None, "max_train_samples": None, "max_steps": 120, "learning_rate": 2e-5,
            "beta": 0.1, "seed": 0, "disable_tqdm": True, "report_to": "none", "objective": objective, **extra}))
        if "before" not in chosen:  # the same policy and pairs for both objectives: measured once
            chosen["before"] = trainer.evaluate()["eval_logps/chosen"]
        trainer.train()
        chosen[objective] = trainer.evaluate()["eval_logps/chosen"]
    assert chosen["dpo"] < chosen["before"] - 0.5, chosen
    assert chosen["rpo"] > chosen["dpo"] + 0.5, chosen
