"""Online preference trainers (online DPO, XPO, EGPO) on the testbed: EGPO's extragradient step is exact, the
mixture sampler is exact at its ends, XPO's exploration term, bad input stops before generation."""

import copy
import json

import pytest
import torch

from align.config import load_config
from align.errors import ConfigError, DataError, TrainingError
from align.recipes.egpo import EGPORecipeConfig
from align.recipes.online_dpo import OnlineRecipeConfig, build_trainer
from align.recipes.xpo import XPORecipeConfig

SMALL = {"max_steps": 2, "per_device_train_batch_size": 4, "max_train_samples": 32, "dataset_test_split": None,
         "logging_steps": 1, "disable_tqdm": True, "overwrite_output_dir": True}
CLASSES = {"online_dpo": OnlineRecipeConfig, "xpo": XPORecipeConfig, "egpo": EGPORecipeConfig}
# the testbed configs' own training (80 prompt batches of 32, lr 5e-5), and each method's measured exact win
# rate against the initial policy less a margin: online DPO 0.5117, XPO 0.5169, EGPO 0.5056 (at lr 3e-5: XPO
# 0.512, EGPO 0.507; at lr 2e-4 XPO and EGPO fall below 0.5: 0.471, 0.462)
WINRATE = {"max_steps": 80, "per_device_train_batch_size": 32, "max_train_samples": 1024}
WINRATE_FLOOR = {"online_dpo": 0.506}


def cfg(repo, tmp_path, method="egpo", **kw):
    over = {"output_dir": str(tmp_path / method), **SMALL, **kw}
    return load_config(CLASSES[method], repo / f"configs/{method}/testbed.yaml", over)


class Recorder:
    """Wraps ``make_pairs`` to keep each step's pairs and the parameters the samples were drawn with."""

    def __init__(self, trainer):
        self.trainer, self.pairs, self.params = trainer, [], []
        inner = trainer.make_pairs

        def make_pairs(rows):
            self.params.append([p.detach().clone() for p in trainer._trainable()])
            out = inner(rows)
            self.pairs.append(out)
            return out

        trainer.make_pairs = make_pairs


@pytest.mark.slow
def test_egpo_full_step_is_one_step_from_theta_t_with_midpoint_samples(repo, tmp_path, testbed):
    trainer = build_trainer(cfg(repo, tmp_path, learning_rate=1e-3, max_steps=4, egpo_variant="oipo1"))
    fresh = copy.deepcopy(trainer.model)  # θ_0, before any step
    rec = Recorder(trainer)
    states = []
    trainer.add_callback(type("Snap", (__import__("transformers").TrainerCallback,), {
        "on_step_end": lambda self, args, state, control, **kw: states.append(
            ([p.detach().clone() for p in trainer._trainable()],
             copy.deepcopy(trainer.optimizer.optimizer.state_dict())))})())
    trainer.train()
    theta0 = [p.detach().clone() for p in fresh.parameters()]
    theta_half, theta1 = states[0][0], states[1][0]
    # the full step's samples were drawn at θ_{1/2}, which differs from θ_0
    assert all(torch.equal(a, b) for a, b in zip(rec.params[1], theta_half, strict=True))
    assert max((a - b).abs().max().item() for a, b in zip(theta_half, theta0, strict=True)) > 1e-4
    # the same prompts serve the half and the full step
    assert rec.pairs[0].prompts == rec.pairs[1].prompts and rec.pairs[2].prompts == rec.pairs[3].prompts

    # one AdamW step from θ_0 (fresh optimizer state) on the midpoint's pairs, gradient clipped as the Trainer does
    a = trainer.args
    opt = torch.optim.AdamW(fresh.parameters(), lr=a.learning_rate, betas=(a.adam_beta1, a.adam_beta2),
                            eps=a.adam_epsilon, weight_decay=a.weight_decay)
    fresh.train()
    loss, _ = trainer.pair_loss(fresh, rec.pairs[1])
    loss.backward()
    torch.nn.utils.clip_grad_norm_(fresh.parameters(), a.max_grad_norm)
    opt.step()
    gap = max((p - q).abs().max().item() for p, q in zip(fresh.parameters(), theta1, strict=True))
    assert gap < 1e-6, gap
    # optimizer state by parameter name (the Trainer orders its parameter groups differently)
    names = {id(p): n for n, p in trainer.model.named_parameters()}
    order = [names[id(p)] for g in trainer.optimizer.optimizer.param_groups for p in g["params"]]
    ours = {order[i]: s for i, s in states[1][1]["state"].items()}
    ref = {n: opt.state[p] for n, p in fresh.named_parameters()}
    assert ours.keys() == ref.keys()
    for k in ref:
        assert float(ours[k]["step"]) == 1.0  # the moments saw the full step only
        for m in ("exp_avg", "exp_avg_sq"):
            assert torch.allclose(ours[k][m], ref[k][m], atol=1e-10, rtol=1e-5), (k, m)
    # after two EG iterations (4 Trainer steps) Adam has taken exactly 2 steps; the scheduler advanced 4 times
    assert {float(s["step"]) for s in states[3][1]["state"].values()} == {2.0}
    assert trainer.state.global_step == 4 and trainer.lr_scheduler.last_epoch == 4


def test_egpo_targets(repo, tmp_path, testbed):
    for variant in ("oipo1", "oipo2"):
        trainer = build_trainer(cfg(repo, tmp_path, egpo_variant=variant, max_steps=1, egpo_extragradient=False))
        rows = [trainer.train_dataset[i] for i in range(8)]
        pairs = trainer.make_pairs(rows)
        gap = pairs.extra["preference_gap"]
        allowed = {-1.0, -0.5, 0.0, 0.5, 1.0} if variant == "oipo1" else {-0.5, 0.0, 0.5}
        assert set(gap.tolist()) <= allowed
        if variant == "oipo2":  # P(y ≻ y′) − ½ from the verifier: right vs wrong answers
            p = trainer.judge(rows, pairs.first, pairs.second)
            assert torch.equal(gap, p - 0.5)
        assert trainer.oracle.calls == 16  # oipo1: 2 x 8 judgements; oipo2: 8, and 8 more in this test


def test_mixture_sampler_is_exact_at_its_ends(testbed):
    from align.modeling import load_model, load_tokenizer
    from align.rollout import HFEngine, SamplingParams
    from align.rollout.mixture import MixtureEngine

    tok = load_tokenizer(str(testbed.policy))
    policy, ref = load_model(str(testbed.policy)), load_model(str(testbed.base))
    texts = ["<|im_start|>user\nWhat is 3+4?<|im_end|>\n<|im_start|>assistant\n",
             "<|im_start|>user\nWhat is 12*3? Quick<|im_end|>\n<|im_start|>assistant\n"]
    prompts = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
    sp = SamplingParams(max_new_tokens=12, temperature=1.0, seed=3)
    plain, base = HFEngine(policy, tok).generate(prompts, [3, 3], sp), HFEngine(ref, tok).generate(prompts, [3, 3], sp)
    at0 = MixtureEngine(policy, ref, tok, 0.0).generate(prompts, [3, 3], sp)
    at1 = MixtureEngine(policy, ref, tok, 1.0).generate(prompts, [3, 3], sp)
    half = MixtureEngine(policy, ref, tok, 0.5).generate(prompts, [3, 3], sp)
    assert at0.completion_ids == plain.completion_ids and at1.completion_ids == base.completion_ids
    for x, y in ((at0, plain), (at1, base)):
        assert max(abs(u - v) for s, t in zip(x.sampling_logps, y.sampling_logps) for u, v in zip(s, t)) < 1e-5
    assert half.completion_ids not in (plain.completion_ids, base.completion_ids)


def test_xpo_pairs_policy_and_reference_samples(repo, tmp_path, testbed):
    trainer = build_trainer(cfg(repo, tmp_path, "xpo", xpo_alpha=[0.5, 0.25]))
    rows = [trainer.train_dataset[i] for i in range(4)]
    pairs = trainer.make_pairs(rows)
    ref_samples = trainer.sample(rows, "reference", reference=True)
    got = [pairs.first[i] if e == 0 else pairs.second[i] for i, e in enumerate(pairs.explore.tolist())]
    assert got == ref_samples
    loss_terms = {}
    trainer.state.epoch = 1.0  # second epoch: α = 0.25
    extra, metrics = trainer.extra_loss({"policy_chosen_logps": torch.tensor([-1.0, -2.0]),
                                         "policy_rejected_logps": torch.tensor([-3.0, -4.0])},
                                        type(pairs)([], [], [], torch.ones(2), {}, torch.tensor([0, 1])))
    loss_terms["alpha"] = metrics["xpo/alpha"].item()
    assert loss_terms["alpha"] == 0.25 and extra.item() == pytest.approx(0.25 * (-1.0 - 4.0) / 2)


@pytest.mark.parametrize("method, overrides, match", [
    ("egpo", {"objective": "dpo"}, "objective: EGPO trains on online_ipo"),
    ("online_dpo", {"objective": "online_ipo"}, "objective: must be one of"),
    ("online_dpo", {"mixture_coef": 0.5}, "mixture_coef: only EGPO"),
    ("egpo", {"mixture_coef": 1.5}, "mixture_coef: must be in"),
    ("egpo", {"egpo_variant": "oipo3"}, "egpo_variant"),
    ("egpo", {"save_strategy": "steps", "save_steps": 3}, "save_steps: must be even"),
    ("xpo", {"xpo_alpha": [-1.0]}, "xpo_alpha"),
    ("xpo", {"ref_model_name_or_path": "/no/such/reference"}, "ref_model_name_or_path"),
    ("online_dpo", {"gradient_accumulation_steps": 2}, "gradient_accumulation_steps: must be 1"),
    ("online_dpo", {"oracle": "judge-o-matic"}, "oracle: unknown oracle"),
])
def test_bad_options_fail_before_any_work(repo, tmp_path, method, overrides, match):
    with pytest.raises(ConfigError, match=match):
        build_trainer(cfg(repo, tmp_path, method, **overrides))


def test_egpo_runs_under_every_sharding(repo, tmp_path, monkeypatch):
    """EGPO's extragradient restores each process's own part of the parameters and optimizer state under align's
    FSDP2 and under DeepSpeed ZeRO-1/2/3 (tests/distributed/test_fsdp2.py): accepted under all of them."""
    import align.sharding

    monkeypatch.setattr(align.sharding, "runs_on_cpu", lambda args: False)
    for where in ("align.args", "align.sharding"):  # as on GPUs: no gloo engine to set up here
        monkeypatch.setattr(f"{where}.deepspeed_on_cpu", lambda: False)
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    assert cfg(repo, tmp_path, "egpo").egpo_extragradient  # align's FSDP2
    monkeypatch.delenv("ACCELERATE_USE_FSDP")
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    for stage in ("1", "2", "3"):
        monkeypatch.setenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", stage)
        assert cfg(repo, tmp_path, "egpo").egpo_extragradient


def test_oracle_column_and_bad_probabilities(repo, tmp_path, testbed):
    spec = f"verifier:{__name__}:_needs_rubric"
    with pytest.raises(DataError, match=f"train dataset: column 'rubric' needed by oracle '{spec}'"):
        build_trainer(cfg(repo, tmp_path, "online_dpo", oracle=spec))
    c = cfg(repo, tmp_path, "online_dpo", oracle=f"{__name__}:_nan_oracle")
    with pytest.raises(TrainingError, match=rf"oracle '{__name__}:_nan_oracle' returned nan for pair 0"):
        build_trainer(c).train()
    assert not list((tmp_path / "online_dpo").glob("checkpoint-*"))


def _needs_rubric(completions, rubric, **_):
    return [1.0] * len(completions)


def _nan_oracle(prompts, a, b, **_):
    return [float("nan")] * len(a)


def test_logged_metrics(repo, tmp_path, testbed):
    out = build_trainer(cfg(repo, tmp_path, "online_dpo"))
    out.train()
    logs = [json.loads(x) for x in open(tmp_path / "online_dpo" / "metrics.jsonl")]
    steps = [r for r in logs if "loss" in r]
    assert [r["oracle/calls"] for r in steps] == [4, 8]  # 4 prompts a step, one judged pair each
    for key in ("rewards/margins", "logps/chosen", "pairs/labelled", "completions/mean_length"):
        assert key in steps[0]


@pytest.mark.slow
def test_egpo_resume_continues_the_same_run(repo, tmp_path, testbed):
    """Stop after one EG iteration (a checkpoint at step 2), resume: steps 3-4 repeat the uninterrupted run."""
    from align.recipes.online_dpo import run

    kw = {"max_steps": 4, "save_strategy": "steps", "save_steps": 2, "learning_rate": 5e-4}
    run(cfg(repo, tmp_path / "a", **kw))
    full = [json.loads(x) for x in open(tmp_path / "a" / "egpo" / "metrics.jsonl") if '"loss"' in x]
    run(cfg(repo, tmp_path / "b", **{**kw, "max_steps": 2}))
    state = json.loads((tmp_path / "b" / "egpo" / "checkpoint-2" / "online_state.json").read_text())
    assert state["oracle_calls"] == full[1]["oracle/calls"] == 16
    run(cfg(repo, tmp_path / "b", **{**kw, "resume_from_checkpoint": "true", "overwrite_output_dir": False}))
    resumed = [json.loads(x) for x in open(tmp_path / "b" / "egpo" / "metrics.jsonl") if '"loss"' in x]
    assert [r["step"] for r in resumed] == [1, 2, 3, 4]
    for key in ("loss", "online_ipo/target", "logps/chosen", "oracle/calls"):
        assert [r[key] for r in resumed[2:]] == pytest.approx([r[key] for r in full[2:]], abs=1e-6), key


# XPO's and EGPO's win rates (0.507 and 0.503 on 2026-11-24, margins of a few thousandths over 80 steps) are
# measured by scripts/bench_online.py, not here: each run is ~3 CPU-minutes (see docs/benchmarks.md).
@pytest.mark.parametrize("method, overrides", [("online_dpo", {})])
@pytest.mark.slow
def test_online_trainers_raise_the_win_rate_against_the_initial_policy(repo, tmp_path, testbed, method, overrides):
    """Under the verifier oracle the win rate of π against π₀ (independent samples, ties ½) is exactly
    ½ + ½·(p − p₀), p the mean probability of the canonical correct answer over all 219 held-out facts: a
    measure without sampling noise. Each trainer runs its testbed config (80 prompt batches of 32)."""
    from align.evaluation import answer_probability
    from align.testbed.tasks import rl_rows

    trainer = build_trainer(cfg(repo, tmp_path, method, **{**WINRATE, **overrides}))
    trainer.train()
    facts = rl_rows(("add1", "sub1", "mul1"), n=None, split="test")
    p, p0 = (answer_probability(m, trainer.processing_class, facts)["answer_probability"]
             for m in (trainer.policy, trainer.ref_model))
    win = 0.5 + 0.5 * (p - p0)
    print(f"{method}: exact win rate vs the initial policy {win:.4f} (p {p0:.4f} -> {p:.4f})")
    assert win > WINRATE_FLOOR[method]


def test_online_objective_takes_its_hyperparameters(repo, tmp_path, testbed):
    """Online DPO with H-DPO: ``alpha`` reaches the loss the trainer builds; a hyperparameter the objective does not
    take is a one-line error naming it, at config time."""
    trainer = build_trainer(cfg(repo, tmp_path, "online_dpo", objective="hdpo", alpha=0.8))
    assert trainer.loss_fn.spec.name == "hdpo" and trainer.loss_fn.params == {"beta": 0.1, "alpha": 0.8}
    with pytest.raises(ConfigError, match="^objective 'hdpo' does not take 'gamma'") as err:
        cfg(repo, tmp_path, "online_dpo", objective="hdpo", objective_kwargs={"gamma": 1.0})
    assert "\n" not in str(err.value)
    with pytest.raises(ConfigError, match="^alpha: objective 'dpo' does not take it"):
        cfg(repo, tmp_path, "online_dpo", alpha=0.8)
    with pytest.raises(ConfigError, match="^objective: must be one of .* for online_dpo, got 'pairnorm'"):
        cfg(repo, tmp_path, "online_dpo", objective="pairnorm")  # needs gradient norms: not a pair-only objective
