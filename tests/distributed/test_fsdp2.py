"""FSDP2 on two CPU processes (gloo), driven by align (align/fsdp2.py: accelerate 1.15 runs no FSDP on the CPU):
FSDP is really in effect (an FSDP module, DTensor parameters, half the testbed embedding's rows per process), and
DPO (preference trainer) and GRPO with the GVM allocator under ``configs/accelerate/fsdp2.yaml`` adapted to the CPU
give the 1-process numbers with the same global batch: the same losses at every step (1e-5), the same allocations
and G_i, final saved weights (full, the 1-process files) within 1e-4 of the update's norm; a run resumed from a
sharded checkpoint equals the uninterrupted one. Every run has a timeout: a gathered pass that needed a collective
(generation, per-sequence gradients with a different amount of work per process) would hang and fail."""

import json
import math
import shutil
import sys

import pytest
import torch
from launch_configs import cpu_variant
from ports import free_port
from safetensors.torch import load_file
from test_sharded_configs import run_group

from align.sharding import FSDP2_NOTE, cpu_fallback_warning

DPO = ["--config", "configs/dpo/testbed.yaml", "max_steps=4", "logging_steps=1", "max_train_samples=64",
       "dataset_test_split=null", "disable_tqdm=true", "overwrite_output_dir=true"]
GRPO = ["--config", "configs/grpo/testbed.yaml", "max_steps=4", "logging_steps=1", "num_generations=8",
        "num_minibatches=2", "micro_batch_size=16", "max_train_samples=128", "dataset_test_split=null",
        "disable_tqdm=true", "overwrite_output_dir=true", "learning_rate=1e-4", "allocator=gvm",
        "beta=0.04"]  # the KL term: a frozen reference copy, sharded like the policy
# The entanglement monitor (probe pairs) and the training batch's own pairs' gradients (downweighting those predicted
# 'both down'): each taken on gathered weights, each process its own pairs (align/trainers/preference.py).
PROBE = ["entanglement_steps=2", "entanglement_probe_size=8", "entanglement_action=downweight",
         "entanglement_params=[lm_head,last_block]"]
BATCH_CASES = [f"entanglement/batch_{c}" for c in ("ideal", "both_down", "both_up", "inverted")]
SAVE = ["save_strategy=steps", "save_steps=2"]
NO_SAVE = ["save_strategy=no"]
GRPO_KEYS = ("loss", "grad_norm", "reward", "reward_std", "rollouts/total", "allocation/min", "allocation/median",
             "allocation/max", "allocation/prompts_dropped", "gvm/p_mean", "gvm/G_mean", "entropy", "kl",
             "rewards/reward_model/mean", "rewards/reward_model/std")  # the reward model's scores (grpo_runs)
SHARD_LINE = "FSDP2 (process {r} of 2): fully_shard on 5 modules, DTensor parameters; model.embed_tokens.weight: " \
             "192 x 256 here of 384 x 256"


def launch(repo, out, recipe, args, config=None):
    """The recipe on 1 process (``config`` None) or 2 under ``config``; the process and its step records."""
    if config is None:
        cmd = [sys.executable, "-m", f"align.recipes.{recipe}"]
    else:
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", config, "--num_processes", "2",
               "--main_process_port", str(free_port()), "-m", f"align.recipes.{recipe}"]
    proc = run_group([*cmd, *args, f"output_dir={out}"], repo, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    steps = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return proc, [r for r in steps if "loss" in r]


def runs(repo, tmp, recipe, args, per_device_one, resume: bool):
    """1 process (no checkpoints), 2 under FSDP2 (checkpoints every 2 steps), and (``resume``) 2 under FSDP2 resumed
    from a copy of the sharded run's checkpoint-2 in a fresh folder."""
    config = cpu_variant(repo, tmp, "fsdp2")
    one = launch(repo, tmp / "one", recipe, [*args, *NO_SAVE, f"per_device_train_batch_size={per_device_one}"])
    two = launch(repo, tmp / "two", recipe, [*args, *SAVE, f"per_device_train_batch_size={per_device_one // 2}"],
                 config)
    resumed = None
    if resume:
        shutil.copytree(tmp / "two" / "checkpoint-2", tmp / "copy" / "checkpoint-2")
        resumed = launch(repo, tmp / "resumed", recipe, [*args, *SAVE,
                                                         f"per_device_train_batch_size={per_device_one // 2}",
                                                         f"resume_from_checkpoint={tmp / 'copy' / 'checkpoint-2'}"],
                         config)
    return {"one": one, "two": two, "resumed": resumed, "tmp": tmp}


@pytest.fixture(scope="module")
def dpo_runs(repo, testbed, tmp_path_factory):
    return runs(repo, tmp_path_factory.mktemp("fsdp2-dpo"), "dpo", [*DPO, *PROBE], 16, resume=True)


@pytest.fixture(scope="module")
def grpo_runs(repo, testbed, tiny_classifier, tmp_path_factory):
    """Resumed from the sharded checkpoint-2 (a round boundary: two updates per round) too. A reward model beside the
    verifier: loaded whole in every process (rank 0's weights under FSDP2's rank-0 loading, align.zero3.loading_whole
    under ZeRO-3)."""
    args = [*GRPO, f"reward_funcs=[accuracy,model:{tiny_classifier}]", "reward_weights=[1.0,0.1]"]
    return {**runs(repo, tmp_path_factory.mktemp("fsdp2-grpo"), "grpo", args, 8, resume=True), "args": args}


def assert_sharded(proc):
    """The run said it sharded (each process its half of the embedding) and did not fall back to DDP."""
    assert proc.stderr.count(FSDP2_NOTE) == 1
    assert cpu_fallback_warning("FSDP") not in proc.stderr
    for r in (0, 1):
        assert SHARD_LINE.format(r=r) in proc.stdout


def weight_gap(testbed, one, two) -> tuple[float, float]:
    w0 = load_file(str(testbed.policy / "model.safetensors"))
    w1, w2 = load_file(str(one / "model.safetensors")), load_file(str(two / "model.safetensors"))
    assert w1.keys() == w2.keys()
    assert all(w1[k].shape == w2[k].shape and w1[k].dtype == w2[k].dtype for k in w1)  # full weights, 1-process files
    gap = sum(((w1[k] - w2[k]) ** 2).sum().item() for k in w1) ** 0.5
    update = sum(((w1[k] - w0[k]) ** 2).sum().item() for k in w1) ** 0.5
    print(f"||w1 - w2|| / ||update|| = {gap / update:.2e} (update {update:.3g})")
    return gap, update


def assert_resume_exact(runs_):
    """The steps after 2 of the run resumed from checkpoint-2, and its final weights, are the uninterrupted sharded
    run's."""
    tmp = runs_["tmp"]
    two, resumed = runs_["two"][1], runs_["resumed"][1]
    assert [r["step"] for r in resumed] == [r["step"] for r in two[2:]] and len(resumed) >= 1
    for a, b in zip(two[2:], resumed, strict=True):
        assert b["loss"] == pytest.approx(a["loss"], abs=1e-6)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-5)
    w, v = load_file(str(tmp / "two" / "model.safetensors")), load_file(str(tmp / "resumed" / "model.safetensors"))
    diff = max((w[k] - v[k]).abs().max().item() for k in w)
    print(f"resumed vs uninterrupted: max |w - w'| = {diff:.2e}")
    assert diff <= 1e-6


def assert_checkpoint_format(folder, one_folder):
    """A sharded run's checkpoint holds the full weights and the optimizer state in the 1-process format."""
    weights = load_file(str(folder / "model.safetensors"))
    final_one = load_file(str(one_folder / "model.safetensors"))
    assert {k: v.shape for k, v in weights.items()} == {k: v.shape for k, v in final_one.items()}
    opt = torch.load(folder / "optimizer.pt", weights_only=True)
    n = sum(len(g["params"]) for g in opt["param_groups"])
    assert sorted(opt["state"]) == list(range(n)) == sorted(i for g in opt["param_groups"] for i in g["params"])
    assert n == len(weights)
    for s in opt["state"].values():
        assert type(s["exp_avg"]) is torch.Tensor and s["exp_avg"].shape == s["exp_avg_sq"].shape  # plain, whole


@pytest.mark.slow
def test_fully_shard_and_gathered_passes(repo, testbed, tmp_path):
    """align.fsdp2 on its own (fsdp2_check.py): sharding, a training step equal to the unsharded one, gathered
    generation and per-sequence gradient norms with a different amount of work per process, state round trips."""
    script = repo / "tests" / "distributed" / "fsdp2_check.py"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           str(script), str(tmp_path)]
    proc = run_group(cmd, repo, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r0, r1 = (json.loads((tmp_path / f"rank-{r}.json").read_text()) for r in (0, 1))
    for r in (r0, r1):
        assert r["fsdp_module"] and r["all_dtensor"] and r["units"] == 5  # 4 decoder layers + the model
        assert r["emb_global"] == [384, 256] and r["emb_local"] == [192, 256]
        assert r["grad_norm"] == pytest.approx(r["ref_grad_norm"], rel=1e-5)  # global norm: partial sums all-reduced
        assert r["gathered_param_types"] == ["Parameter"]  # whole tensors inside gathered()
        assert r["norms"] == pytest.approx(r["ref_norms"], rel=1e-5)
        assert r["sharded_after"] and r["reload_exact"]
        assert r["egpo_half_step_moved"] and r["egpo_restore_exact"]  # each process restores its own shards
    assert (len(r0["norms"]), len(r1["norms"])) == (1, 3)  # different work per process, no hang
    assert (r0["generated"], r1["generated"]) == (6, 11)  # 2 and 7 new tokens: 2 forwards, 2 x 7 forwards
    assert r0["step_max_diff"] < 1e-6 and r0["full_keys_equal"]
    assert r0["opt_format"] == [True, True] and r0["opt_max_diff"] < 1e-8


@pytest.mark.slow
@pytest.mark.xdist_group("fsdp2-dpo")  # one worker builds the shared runs
def test_dpo_under_fsdp2_matches_one_process(dpo_runs, testbed):
    (proc1, one), (proc2, two) = dpo_runs["one"], dpo_runs["two"]
    assert_sharded(proc2)
    assert "x processes 2 = 16 sequences" in proc2.stdout and "x processes 1 = 16 sequences" in proc1.stdout
    assert len(one) == len(two) == 4
    assert two[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)  # the reference is the initial policy
    assert [r["loss"] for r in two] == pytest.approx([r["loss"] for r in one], abs=1e-5)
    assert [r["grad_norm"] for r in two] == pytest.approx([r["grad_norm"] for r in one], rel=1e-5)
    assert one[-1]["loss"] != pytest.approx(one[0]["loss"], abs=1e-3)  # the run moved
    for key in BATCH_CASES:  # the training batches' pairs, by case: their gradients taken on gathered weights
        assert [r[key] for r in two] == [r[key] for r in one], key
    assert max(r["entanglement/batch_both_down"] for r in one) > 0  # some pairs were downweighted
    gap, update = weight_gap(testbed, dpo_runs["tmp"] / "one", dpo_runs["tmp"] / "two")
    assert update > 1e-2 and gap / update < 1e-4  # 3.0e-6 measured
    assert_checkpoint_format(dpo_runs["tmp"] / "two" / "checkpoint-4", dpo_runs["tmp"] / "one")
    assert_same_probe(dpo_runs["tmp"] / "one", dpo_runs["tmp"] / "two")


def assert_same_probe(one, two):
    """The entanglement monitor's per-pair table (checks at steps 0, 2, 4; 8 probe pairs) equals the 1-process one:
    gradients taken on the gathered weights, each process its own pairs."""
    rows = [[json.loads(x) for x in (d / "entanglement.jsonl").read_text().splitlines()] for d in (one, two)]
    assert len(rows[0]) == len(rows[1]) == 24 and {r["step"] for r in rows[1]} == {0, 2, 4}
    for a, b in zip(*rows, strict=True):
        assert (a["step"], a["pair"], a["case"]) == (b["step"], b["pair"], b["case"])
        for key in ("dot", "norm_chosen", "norm_rejected", "cos", "logp_chosen"):
            assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-6), key


@pytest.mark.slow
@pytest.mark.xdist_group("fsdp2-dpo")  # one worker builds the shared runs
def test_dpo_resumed_from_a_sharded_checkpoint(repo, dpo_runs):
    assert_sharded(dpo_runs["resumed"][0])
    assert_resume_exact(dpo_runs)
    # the checkpoint is a 1-process one (full weights, torch's optimizer format): one process resumes it too, and with
    # the same global batch continues as the 2 sharded processes did
    tmp = dpo_runs["tmp"]
    _, single = launch(repo, tmp / "resumed-one", "dpo", [*DPO, *PROBE, *SAVE, "per_device_train_batch_size=16",
                                                         f"resume_from_checkpoint={tmp / 'copy' / 'checkpoint-2'}"])
    assert [r["step"] for r in single] == [3, 4]
    assert [r["loss"] for r in single] == pytest.approx([r["loss"] for r in dpo_runs["two"][1][2:]], abs=1e-5)


@pytest.mark.slow
@pytest.mark.xdist_group("fsdp2-grpo")  # one worker builds the shared runs
def test_grpo_gvm_under_fsdp2_matches_one_process(grpo_runs, testbed):
    (proc1, one), (proc2, two) = grpo_runs["one"], grpo_runs["two"]
    assert_sharded(proc2)
    assert "x processes 2 = 8 prompts" in proc2.stdout and "x processes 1 = 8 prompts" in proc1.stdout
    assert len(one) == len(two) == 4
    for key in GRPO_KEYS:
        first, second = [r.get(key) for r in one], [r.get(key) for r in two]
        assert first[0] is not None, key
        assert [x is None for x in second] == [x is None for x in first], key
        assert [x for x in second if x is not None] == pytest.approx([x for x in first if x is not None], rel=1e-5,
                                                                     abs=1e-5), key
    assert any(r["allocation/max"] > r["allocation/min"] for r in one if "allocation/max" in r)  # ragged groups
    rounds = [[json.loads(x) for x in (grpo_runs["tmp"] / n / "allocation.jsonl").read_text().splitlines()]
              for n in ("one", "two")]
    assert len(rounds[0]) == len(rounds[1]) == 2
    for a, b in zip(*rounds, strict=True):  # every prompt's n_i, p_i and G_i (GVM's per-sequence gradient norms)
        assert (a["uid"], a["n"], a["p"]) == (b["uid"], b["n"], b["p"])
        assert b["G"] == pytest.approx(a["G"], rel=1e-5)
    gap, update = weight_gap(testbed, grpo_runs["tmp"] / "one", grpo_runs["tmp"] / "two")
    assert update > 1e-2 and gap / update < 1e-4  # 3.0e-6 measured
    assert_checkpoint_format(grpo_runs["tmp"] / "two" / "checkpoint-4", grpo_runs["tmp"] / "one")
    assert two[-1]["kl"] > 0  # the policy moved away from its sharded frozen reference
    assert_sharded(grpo_runs["resumed"][0])
    assert_resume_exact(grpo_runs)  # the policy, its optimizer state and the RL state (rollouts, p_i, G_i) restored
    resumed = grpo_runs["resumed"][1]
    for key in GRPO_KEYS:
        first, second = [r.get(key) for r in two[2:]], [r.get(key) for r in resumed]
        assert [x is None for x in second] == [x is None for x in first], key
        assert [x for x in second if x is not None] == pytest.approx([x for x in first if x is not None], rel=1e-6,
                                                                     abs=1e-7), key


@pytest.mark.slow
@pytest.mark.xdist_group("fsdp2-dpo")  # one worker builds the shared runs
def test_dpo_gradient_accumulation_under_fsdp2(repo, dpo_runs):
    """2 processes x 4 sequences x 2 accumulation steps = the 1-process run's 16 per step: FSDP2 reduce-scatters
    after each micro-batch's backward, the Trainer scales the loss for the accumulation."""
    tmp = dpo_runs["tmp"]
    proc, steps = launch(repo, tmp / "accumulated", "dpo", [*DPO, *PROBE, *NO_SAVE, "per_device_train_batch_size=4",
                                                             "gradient_accumulation_steps=2"],
                         cpu_variant(repo, tmp, "fsdp2"))
    assert_sharded(proc)
    one = dpo_runs["one"][1]
    assert [r["loss"] for r in steps] == pytest.approx([r["loss"] for r in one], abs=1e-5)
    assert [r["grad_norm"] for r in steps] == pytest.approx([r["grad_norm"] for r in one], rel=1e-5)


def adapter_gap(one, two) -> tuple[float, float]:
    """‖B₂ − B₁‖ and ‖B₁‖ over the LoRA B matrices of two saved adapters (B starts at zero: its norm is the update's);
    both hold the 56 tensors of the testbed's adapter (A and B of 7 projections x 4 layers)."""
    w1, w2 = (load_file(str(d / "adapter_model.safetensors")) for d in (one, two))
    assert w1.keys() == w2.keys() and len(w1) == 56
    b = [k for k in w1 if "lora_B" in k]
    gap = sum(((w1[k] - w2[k]) ** 2).sum().item() for k in b) ** 0.5
    return gap, sum((w1[k] ** 2).sum().item() for k in b) ** 0.5


LORA = ["use_peft=true", "lora_r=4", "lora_dropout=0", "learning_rate=1e-3"]
LORA_ZERO3 = ("DeepSpeed ZeRO-3 (process 1 of 2): DeepSpeedEngine, optimizer DeepSpeedZeroOptimizer_Stage3; "
              "base_model.model.model.embed_tokens.weight: 49152 of 98304 elements here")
LORA_FSDP2 = ("FSDP2 (process 1 of 2): fully_shard on 5 modules, DTensor parameters; "
              "base_model.model.model.embed_tokens.weight: 192 x 256 here of 384 x 256")


@pytest.mark.slow
def test_dpo_with_lora_under_fsdp2_and_zero3_and_resumed(repo, tmp_path):
    """LoRA under align's FSDP2 (the adapters sharded with their layers, rank 0's initial adapter broadcast first)
    and under ZeRO-3 (adapter and base partitioned), the reference being the adapter switched off: the 1-process
    losses and grad norms at every step, and the saved adapter (adapter files only, gathered) is the 1-process one up
    to float rounding of the update. Under FSDP2 a run resumed from a copy of its checkpoint-2 (the adapter file and
    the optimizer state: the adapter loaded into the shards) repeats step 3 and ends on the same adapter."""
    args = [*DPO, "max_steps=3", *LORA]
    _, one = launch(repo, tmp_path / "one", "dpo", [*args, *NO_SAVE, "per_device_train_batch_size=16"])
    for config, line in (("fsdp2", LORA_FSDP2), ("zero3", LORA_ZERO3)):
        proc, two = launch(repo, tmp_path / config, "dpo",
                           [*args, *(SAVE if config == "fsdp2" else NO_SAVE), "per_device_train_batch_size=8"],
                           cpu_variant(repo, tmp_path, config))
        assert line in proc.stdout and proc.stderr.count(FSDP2_NOTE) == (config == "fsdp2")
        assert len(one) == len(two) == 3
        if config == "fsdp2":
            two_fsdp2 = two
        for key in ("loss", "grad_norm", "logps/chosen"):
            assert [r[key] for r in two] == pytest.approx([r[key] for r in one], rel=1e-5, abs=1e-6), (config, key)
        assert not (tmp_path / config / "model.safetensors").exists()
        gap, update = adapter_gap(tmp_path / "one", tmp_path / config)
        assert update > 1e-2 and gap / update < 1e-4, config  # 8e-6 (FSDP2), 7e-6 (ZeRO-3) measured
    files = {f.name for f in (tmp_path / "fsdp2" / "checkpoint-2").iterdir()}
    assert {"adapter_model.safetensors", "optimizer.pt"} <= files and "model.safetensors" not in files
    shutil.copytree(tmp_path / "fsdp2" / "checkpoint-2", tmp_path / "copy" / "checkpoint-2")
    resume = f"resume_from_checkpoint={tmp_path / 'copy' / 'checkpoint-2'}"
    _, resumed = launch(repo, tmp_path / "resumed", "dpo", [*args, *SAVE, "per_device_train_batch_size=8", resume],
                        cpu_variant(repo, tmp_path, "fsdp2"))
    assert [r["step"] for r in resumed] == [3]
    assert resumed[0]["loss"] == pytest.approx(two_fsdp2[2]["loss"], rel=1e-6, abs=1e-7)
    gap, update = adapter_gap(tmp_path / "fsdp2", tmp_path / "resumed")
    assert gap / update < 1e-5


@pytest.mark.slow
def test_grpo_and_egpo_with_lora_under_fsdp2_and_zero3(repo, tmp_path):
    """LoRA beyond DPO: GRPO with GVM and a KL term (the reference is the adapter off; HF generation, the
    old / reference log-probs and GVM's G_i on gathered weights: a LoRA model's generate is registered with FSDP2 as
    a forward, else its first pass would skip the root) under FSDP2 and ZeRO-3, and EGPO's extragradient (each
    process restores its own part of the adapter's optimizer state) under FSDP2: the 1-process numbers at every step
    and the 1-process adapter."""
    grpo = [*GRPO, *NO_SAVE, *LORA, "max_steps=2"]
    _, one = launch(repo, tmp_path / "grpo-one", "grpo", [*grpo, "per_device_train_batch_size=8"])
    runs = {}
    for config, line in (("fsdp2", LORA_FSDP2), ("zero3", LORA_ZERO3)):
        proc, runs[config] = launch(repo, tmp_path / f"grpo-{config}", "grpo", [*grpo, "per_device_train_batch_size=4"],
                                    cpu_variant(repo, tmp_path, config))
        assert line in proc.stdout
    egpo = ["--config", "configs/egpo/testbed.yaml", *ONLINE, *LORA, "max_steps=4"]
    _, egpo_one = launch(repo, tmp_path / "egpo-one", "egpo", [*egpo, "per_device_train_batch_size=8"])
    proc, runs["egpo"] = launch(repo, tmp_path / "egpo-fsdp2", "egpo", [*egpo, "per_device_train_batch_size=4"],
                                cpu_variant(repo, tmp_path, "fsdp2"))
    assert LORA_FSDP2 in proc.stdout
    for name, two in runs.items():
        first = egpo_one if name == "egpo" else one
        keys = ("loss", "grad_norm") if name == "egpo" else ("loss", "grad_norm", "kl", "reward", "gvm/G_mean")
        assert len(two) == len(first) == (4 if name == "egpo" else 2)
        for key in keys:
            a, b = [r.get(key) for r in first], [r.get(key) for r in two]
            assert a[0] is not None, (name, key)
            assert [x is None for x in b] == [x is None for x in a], (name, key)
            assert [x for x in b if x is not None] == pytest.approx([x for x in a if x is not None], rel=1e-5,
                                                                    abs=1e-6), (name, key)
        base = tmp_path / ("egpo-one" if name == "egpo" else "grpo-one")
        gap, update = adapter_gap(base, tmp_path / (f"grpo-{name}" if name != "egpo" else "egpo-fsdp2"))
        assert update > 1e-2 and gap / update < 1e-4, name
    assert one[1]["kl"] > 1e-4  # the adapter-off reference differs from the policy after a step


ONLINE = ["logging_steps=1", "save_strategy=no", "max_train_samples=64", "dataset_test_split=null",
          "disable_tqdm=true", "overwrite_output_dir=true"]


EGPO = ["max_steps=4", "mixture_coef=0.5"]


@pytest.fixture(scope="module")
def egpo_one(repo, testbed, tmp_path_factory):
    """EGPO on 1 process (the geometric mixture, two extragradient pairs), compared with FSDP2 and ZeRO-2/3."""
    out = tmp_path_factory.mktemp("egpo-one")
    args = ["--config", "configs/egpo/testbed.yaml", *ONLINE, *EGPO, "per_device_train_batch_size=8"]
    return out, launch(repo, out, "egpo", args)[1]


@pytest.fixture(scope="module")
def online_dpo_one(repo, testbed, tmp_path_factory):
    """Online DPO on 1 process, 3 steps, compared with FSDP2 and ZeRO-3."""
    out = tmp_path_factory.mktemp("online-dpo-one")
    args = ["--config", "configs/online_dpo/testbed.yaml", *ONLINE, "max_steps=3", "per_device_train_batch_size=8"]
    return out, launch(repo, out, "online_dpo", args)[1]


@pytest.mark.slow
@pytest.mark.xdist_group("fsdp2-online")
@pytest.mark.parametrize("recipe, extra", [("online_dpo", ["max_steps=3"]), ("egpo", EGPO)])
def test_online_trainers_under_fsdp2_match_one_process(repo, testbed, tmp_path, request, recipe, extra):
    """Online DPO and EGPO (extragradient: each process restores its own parameter and Adam-moment shards before the
    full step; the geometric mixture samples from the gathered policy and reference): the policy and its frozen
    reference copy both sharded, the same losses at every step as one process with the same global batch; resumed
    from the sharded checkpoint-2, the uninterrupted run's later steps and final weights."""
    args = ["--config", f"configs/{recipe}/testbed.yaml", *ONLINE, *extra, *SAVE, "per_device_train_batch_size=4"]
    one_dir, one = request.getfixturevalue(f"{recipe}_one")
    config = cpu_variant(repo, tmp_path, "fsdp2")
    proc, two = launch(repo, tmp_path / "two", recipe, args, config)
    assert_sharded(proc)
    shutil.copytree(tmp_path / "two" / "checkpoint-2", tmp_path / "copy" / "checkpoint-2")
    resumed = launch(repo, tmp_path / "resumed", recipe,
                     [*args, f"resume_from_checkpoint={tmp_path / 'copy' / 'checkpoint-2'}"], config)
    assert_sharded(resumed[0])
    assert_resume_exact({"two": (proc, two), "resumed": resumed, "tmp": tmp_path})
    assert len(one) == len(two) == int(extra[0].split("=")[1])
    for key in ("loss", "grad_norm", "logps/chosen", "logps/rejected"):
        assert [r[key] for r in two] == pytest.approx([r[key] for r in one], rel=1e-5, abs=1e-5), key
    gap, update = weight_gap(testbed, one_dir, tmp_path / "two")
    assert update > 1e-3 and gap / update < 1e-4


RAFT = ["--config", "configs/raft/testbed.yaml", "max_steps=4", "logging_steps=1", "num_generations=8",
        "micro_batch_size=16", "max_train_samples=128", "dataset_test_split=null", "disable_tqdm=true",
        "overwrite_output_dir=true"]


@pytest.mark.slow
@pytest.mark.parametrize("recipe, args, per_device", [
    ("raft", [*RAFT, "beta=0.04", "num_minibatches=1", "allocator=dynamic"], 8)],
    ids=["raft-dynamic-kl"])  # GRPO's KL reference: grpo_runs; DPO's live reference: test_dpo_live_reference_*
def test_frozen_reference_copy_under_fsdp2(repo, testbed, tmp_path, recipe, args, per_device):
    """A frozen copy of the initial policy (the RL loop's KL term), copied before the policy is sharded and sharded
    the same way: the 1-process numbers at every step (RAFT with dynamic sampling: the RL trainer's other allocator
    and advantage)."""
    _, one = launch(repo, tmp_path / "one", recipe, [*args, *NO_SAVE, f"per_device_train_batch_size={per_device}"])
    proc, two = launch(repo, tmp_path / "two", recipe, [*args, *NO_SAVE,
                                                        f"per_device_train_batch_size={per_device // 2}"],
                       cpu_variant(repo, tmp_path, "fsdp2"))
    assert_sharded(proc)
    keys = ("loss", "grad_norm", "kl", "reward")
    assert len(one) == len(two) >= 3
    for key in keys:
        first = [r.get(key) for r in one]
        assert first[0] is not None, key
        assert [r.get(key) for r in two] == pytest.approx(first, rel=1e-5, abs=1e-5), key
    assert two[-1]["kl"] > 0  # the policy moved away from the sharded reference


# --- DeepSpeed ZeRO-3 on the CPU, against the same 1-process runs ----------------------------------------------------
# A DeepSpeed launch without a GPU runs DeepSpeed's engine on its CPU accelerator (align sets use_cpu false and
# ddp_backend gloo): ZeRO-3 partitions every weight (half the testbed embedding's elements per process), and the
# passes where processes do different work run on gathered weights with the engine's hooks off (align/zero3.py).

ZERO3_LINE = ("DeepSpeed ZeRO-3 (process {r} of 2): DeepSpeedEngine, optimizer DeepSpeedZeroOptimizer_Stage3; "
              "model.embed_tokens.weight: 49152 of 98304 elements here")


def assert_zero3(proc):
    """DeepSpeed's ZeRO-3 engine ran in each process (its partition said), not a DDP fallback."""
    for r in (0, 1):
        assert ZERO3_LINE.format(r=r) in proc.stdout
    assert "DeepSpeed" not in "".join(x for x in proc.stderr.splitlines() if x.startswith("warning: distributed_type"))


@pytest.mark.slow
@pytest.mark.xdist_group("fsdp2-grpo")  # one worker builds the shared runs
def test_grpo_gvm_under_zero3_matches_one_process(repo, testbed, grpo_runs, tmp_path):
    """GRPO with GVM, a KL term and a reward model under zero3.yaml: generation, the old / reference log-probs and
    GVM's per-sequence gradient norms on gathered weights (each process its own count), a frozen reference copied
    partition by partition, the reward model loaded whole (partitioned, its forward would fail: nothing gathers it),
    two micro-batches per update (before the fix accelerate's DeepSpeed backward stepped the optimizer after each:
    step 1's kl was 0.0069 instead of 0): the 1-process numbers, allocations and G_i at every step."""
    (_, one) = grpo_runs["one"]
    proc, three = launch(repo, tmp_path / "zero3", "grpo", [*grpo_runs["args"], *SAVE, "per_device_train_batch_size=4"],
                         cpu_variant(repo, tmp_path, "zero3"))
    assert_zero3(proc)
    assert len(three) == len(one) == 4
    assert three[0]["kl"] == pytest.approx(0.0, abs=1e-7)  # the reference copy is the initial policy
    for key in GRPO_KEYS:
        first, second = [r.get(key) for r in one], [r.get(key) for r in three]
        assert [x is None for x in second] == [x is None for x in first], key
        assert [x for x in second if x is not None] == pytest.approx([x for x in first if x is not None], rel=1e-5,
                                                                     abs=1e-5), key
    rounds = [[json.loads(x) for x in (folder / "allocation.jsonl").read_text().splitlines()]
              for folder in (grpo_runs["tmp"] / "one", tmp_path / "zero3")]
    for a, b in zip(*rounds, strict=True):
        assert (a["uid"], a["n"], a["p"]) == (b["uid"], b["n"], b["p"]) and b["G"] == pytest.approx(a["G"], rel=1e-5)
    gap, update = weight_gap(testbed, grpo_runs["tmp"] / "one", tmp_path / "zero3")
    assert update > 1e-2 and gap / update < 1e-4
    assert (tmp_path / "zero3" / "checkpoint-4" / "model.safetensors").is_file()  # full weights in the checkpoint


@pytest.mark.slow
@pytest.mark.xdist_group("fsdp2-dpo")  # one worker builds the shared runs
@pytest.mark.parametrize("config", ["fsdp2", "zero3"])
def test_dpo_live_reference_matches_one_process(repo, testbed, dpo_runs, tmp_path, config):
    """DPO with a live frozen reference, a copy of the initial policy made before the policy is sharded (FSDP2: sharded
    the same way; ZeRO-3: a partitioned copy, gathered for its pass, nested with the per-module gather of the first
    forwards) gives the 1-process run that precomputed the same reference's log-probs; the entanglement probe and the
    training batches' pair cases (their gradients taken on gathered weights) too.
    ZeRO-3 also resumes from a copy of its DeepSpeed checkpoint-2 (each process's partitions) with the uninterrupted
    run's steps 3-4."""
    (_, one) = dpo_runs["one"]
    args = [*DPO, *PROBE, "per_device_train_batch_size=8", "precompute_ref_logps=false"]
    proc, three = launch(repo, tmp_path / "two", "dpo", [*args, *(SAVE if config == "zero3" else NO_SAVE)],
                         cpu_variant(repo, tmp_path, config))
    if config == "zero3":
        assert_zero3(proc)
    else:
        assert_sharded(proc)
    assert three[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    for key in ("loss", "grad_norm", "rewards/chosen", "logps/chosen", *BATCH_CASES):
        assert [r[key] for r in three] == pytest.approx([r[key] for r in one], rel=1e-5, abs=1e-5), key
    gap, update = weight_gap(testbed, dpo_runs["tmp"] / "one", tmp_path / "two")
    assert update > 1e-2 and gap / update < 1e-4
    assert_same_probe(dpo_runs["tmp"] / "one", tmp_path / "two")
    if config == "zero3":
        shutil.copytree(tmp_path / "two" / "checkpoint-2", tmp_path / "copy" / "checkpoint-2")
        proc, resumed = launch(repo, tmp_path / "resumed", "dpo", [
            *args, *SAVE, f"resume_from_checkpoint={tmp_path / 'copy' / 'checkpoint-2'}"], cpu_variant(repo, tmp_path,
                                                                                                    config))
        assert_zero3(proc)
        assert [r["step"] for r in resumed] == [3, 4]
        assert [r["loss"] for r in resumed] == pytest.approx([r["loss"] for r in three[2:]], abs=1e-6)


@pytest.mark.slow
def test_bfloat16_under_fsdp2_keeps_float32_master_weights(repo, testbed, tmp_path):
    """``torch_dtype: bfloat16`` (every real-model config) under align's FSDP2: the shards are float32 master weights
    computed in bf16 autocast, as on one process, so an update at lr 5e-7 survives (96.4% of the weights changed in 2
    steps on both; with bf16 weights 0.81%, tests/integration/test_master_weights.py). bf16 is really in effect: the
    first loss is not ln 2 to float32 precision. The 2 processes' bf16 matmuls see 8 rows, the 1 process's 16, so the
    losses agree to bf16's rounding (2e-4 measured), not to 1e-5."""
    args = [*DPO, *NO_SAVE, "max_steps=2", "max_train_samples=32", "torch_dtype=bfloat16", "learning_rate=5e-7"]
    _, one = launch(repo, tmp_path / "one", "dpo", [*args, "per_device_train_batch_size=16"])
    proc, two = launch(repo, tmp_path / "two", "dpo", [*args, "per_device_train_batch_size=8"],
                       cpu_variant(repo, tmp_path, "fsdp2"))
    assert_sharded(proc)
    assert all(abs(run[0]["loss"] - math.log(2)) > 2e-5 for run in (one, two))  # bf16 autocast, not float32
    assert [r["loss"] for r in two] == pytest.approx([r["loss"] for r in one], abs=1e-3)
    assert [r["grad_norm"] for r in two] == pytest.approx([r["grad_norm"] for r in one], rel=5e-3)
    start = load_file(str(testbed.policy / "model.safetensors"))
    for folder in ("one", "two"):
        final = load_file(str(tmp_path / folder / "model.safetensors"))
        assert all(t.dtype == torch.float32 for t in final.values()), folder
        changed = sum((final[k] != start[k]).sum().item() for k in final) / sum(t.numel() for t in final.values())
        assert changed > 0.9, (folder, changed)


@pytest.mark.slow
def test_pairnorm_under_zero3_matches_one_process(repo, testbed, tmp_path):
    """pairnorm reads each training pair's gradient norms ‖g_w‖, ‖g_l‖: under ZeRO-3 they come from a pass on the
    gathered weights before the engine's forward (DeepSpeed's backward hooks assert on ``autograd.grad`` through the
    engine's own graph; before, the option was refused), each process its own pairs: the 1-process losses, norm
    ratios and batch cases at every step."""
    args = [*DPO, *NO_SAVE, "objective=pairnorm", "max_steps=3"]
    _, one = launch(repo, tmp_path / "one", "dpo", [*args, "per_device_train_batch_size=16"])
    proc, two = launch(repo, tmp_path / "two", "dpo", [*args, "per_device_train_batch_size=8"],
                       cpu_variant(repo, tmp_path, "zero3"))
    assert_zero3(proc)
    assert len(one) == len(two) == 3
    for key in ("loss", "grad_norm", "pairnorm/grad_norm_ratio", *BATCH_CASES):
        assert [r[key] for r in two] == pytest.approx([r[key] for r in one], rel=1e-5, abs=1e-6), key
    assert one[0]["pairnorm/grad_norm_ratio"] > 1.1  # the norms differ, so the objective's weighting matters


@pytest.mark.slow
@pytest.mark.xdist_group("fsdp2-online")
def test_online_dpo_under_zero3_matches_one_process(repo, testbed, online_dpo_one, tmp_path):
    """Online DPO under ZeRO-3: sampling from the gathered policy, the reference a partitioned copy: the 1-process
    numbers at every step."""
    args = ["--config", "configs/online_dpo/testbed.yaml", *ONLINE, "max_steps=3"]
    _, one = online_dpo_one
    proc, three = launch(repo, tmp_path / "zero3", "online_dpo", [*args, "per_device_train_batch_size=4"],
                         cpu_variant(repo, tmp_path, "zero3"))
    assert_zero3(proc)
    assert three[0]["rewards/chosen"] == pytest.approx(0.0, abs=1e-6)
    for key in ("loss", "grad_norm", "logps/chosen", "logps/rejected", "rewards/chosen"):
        assert [r[key] for r in three] == pytest.approx([r[key] for r in one], rel=1e-5, abs=1e-5), key


@pytest.mark.slow
@pytest.mark.xdist_group("fsdp2-online")
@pytest.mark.parametrize("config", ["zero2", "zero3"])
def test_egpo_under_deepspeed_matches_one_process(repo, testbed, egpo_one, tmp_path, config):
    """EGPO's extragradient under DeepSpeed: before each full step every process restores its own part of the ZeRO
    optimizer (fp32 master and working partitions, Adam's moments and steps; under ZeRO-3 the parameters DeepSpeed
    keeps gathered are gathered again from the restored partitions): the 1-process losses at every step. Without the
    re-gather ZeRO-3's first full step was 6.348 instead of 6.25."""
    one_dir, one = egpo_one
    args = ["--config", "configs/egpo/testbed.yaml", *ONLINE, *EGPO, "per_device_train_batch_size=4"]
    proc, two = launch(repo, tmp_path / "two", "egpo", args, cpu_variant(repo, tmp_path, config))
    stage = config[-1]
    assert f"DeepSpeed ZeRO-{stage} (process 1 of 2): DeepSpeedEngine" in proc.stdout
    assert len(one) == len(two) == 4
    for key in ("loss", "grad_norm", "logps/chosen", "logps/rejected"):
        assert [r[key] for r in two] == pytest.approx([r[key] for r in one], rel=1e-5, abs=1e-5), key
    gap, update = weight_gap(testbed, one_dir, tmp_path / "two")
    assert update > 1e-3 and gap / update < 1e-4
