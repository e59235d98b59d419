"""The launcher's sharding against the run (align/sharding.py), fp32 master weights (align/precision.py) and the
`align train --accelerate_config` flags (align/launch.py): the rules, exactly, without starting any process group."""

import copy
import sys
from types import SimpleNamespace

import pytest
import torch

from align import sharding as sh
from align.errors import ConfigError, TrainingError
from align.launch import launcher_command, split_launcher_flags
from align.precision import apply_master_weights, vanishing_threshold, warn_vanishing_updates, weights_dtype

LAUNCH_ENV = ("ACCELERATE_USE_FSDP", "ACCELERATE_USE_DEEPSPEED", "ACCELERATE_DEEPSPEED_ZERO_STAGE",
              "ACCELERATE_USE_CPU", "RANK", "WORLD_SIZE", "LOCAL_RANK")


@pytest.fixture
def launcher(monkeypatch):
    """Set the environment `accelerate launch` gives a config: {"ACCELERATE_USE_FSDP": "true", ...}."""
    for name in LAUNCH_ENV:
        monkeypatch.delenv(name, raising=False)

    def set_env(**env):
        for k, v in env.items():
            monkeypatch.setenv(k, v)
    return set_env


def run_args(recipe="dpo", use_cpu=True, **kw):
    return SimpleNamespace(fsdp="", deepspeed=None, use_cpu=use_cpu, recipe_name=recipe, **kw)


def on_gpu(monkeypatch):
    monkeypatch.setattr(sh, "runs_on_cpu", lambda args: False)


# --- check_launch: before any model loads ---------------------------------------------------------------------


@pytest.mark.parametrize("env, kind, engine", [
    ({"ACCELERATE_USE_FSDP": "true"}, "FSDP", "FSDP"),
    ({"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "1"}, "ZeRO-1", "DeepSpeed"),
    ({"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "2"}, "ZeRO-2", "DeepSpeed"),
])
def test_sharding_on_the_cpu_warns_once_and_runs_as_ddp(launcher, capsys, env, kind, engine):
    launcher(**env)
    sh.check_launch(run_args("sft" if kind == "FSDP" else "dpo"))  # dpo: align's own FSDP2, below
    assert capsys.readouterr().err.splitlines() == [
        f"warning: distributed_type: {kind} was asked for, but accelerate 1.15 does not run {engine} on the CPU "
        "(use_cpu): this run is plain data parallel (DDP), every process holding the whole model and optimizer state. "
        f"The numbers are DDP's, which are {kind}'s up to float rounding (docs/architecture.md, Sharding); the memory "
        "saving is not there."]


@pytest.mark.parametrize("recipe", sh.FSDP2_RECIPES)
def test_fsdp_on_the_cpu_is_aligns_own_fsdp2_for_the_ported_recipes(launcher, capsys, recipe):
    launcher(ACCELERATE_USE_FSDP="true")
    sh.check_launch(run_args(recipe, use_peft=False, precompute_ref_logps=True, beta=0.0, rollout="hf",
                             objective="dpo", entanglement_steps=None, entanglement_action="none"))
    assert capsys.readouterr().err.splitlines() == [sh.FSDP2_NOTE]


@pytest.mark.parametrize("recipe", sh.FSDP2_RECIPES)
def test_lora_runs_under_aligns_fsdp2(launcher, recipe):
    """LoRA under align's FSDP2 (the adapter sharded with its layer) for every trainer: 2 processes = 1 process in
    tests/distributed/test_fsdp2.py (DPO, GRPO with GVM, EGPO) and test_sharded_configs.py (the iterative driver,
    its policies saved merged)."""
    launcher(ACCELERATE_USE_FSDP="true")
    for resume in (None, "out/checkpoint-2"):  # a LoRA checkpoint's adapter loads into the shards (test_fsdp2.py)
        sh.check_launch(run_args(recipe, use_peft=True, precompute_ref_logps=True, beta=0.0, rollout="hf",
                                 objective="dpo", entanglement_steps=None, entanglement_action="none",
                                 ref_model_name_or_path=None, resume_from_checkpoint=resume))


def test_fsdp_on_gpus_is_aligns_own_fsdp2_for_the_ported_recipes(launcher, capsys, monkeypatch):
    """On GPUs too (accelerate would shard only at prepare): the same note; the other recipes are left to accelerate's
    FSDP."""
    on_gpu(monkeypatch)
    launcher(ACCELERATE_USE_FSDP="true")
    base = dict(use_peft=False, precompute_ref_logps=True, beta=0.0, rollout="hf", objective="dpo",
                entanglement_steps=None, entanglement_action="none")
    sh.check_launch(run_args("grpo", use_cpu=False, **base))
    assert capsys.readouterr().err.splitlines() == [sh.FSDP2_NOTE]
    sh.check_launch(run_args("dpo", use_cpu=False, **{**base, "objective": "pairnorm"}))
    assert capsys.readouterr().err.splitlines() == [sh.FSDP2_NOTE]
    sh.check_launch(run_args("sft", use_cpu=False))  # TRL's SFTTrainer: accelerate's FSDP
    assert capsys.readouterr().err == ""


def test_fsdp_warning_only_from_the_main_process(launcher, capsys):
    launcher(ACCELERATE_USE_FSDP="true", RANK="1")
    sh.check_launch(run_args())
    assert capsys.readouterr().err == ""


def test_zero3_with_use_cpu_true_is_refused(launcher):
    launcher(ACCELERATE_USE_DEEPSPEED="true", ACCELERATE_DEEPSPEED_ZERO_STAGE="3")
    with pytest.raises(ConfigError) as err:
        sh.check_launch(run_args(use_cpu=True))
    assert str(err.value) == (
        "use_cpu: true makes accelerate 1.15 run a DeepSpeed launch as plain DDP, after transformers had already "
        "partitioned the weights for ZeRO-3; leave use_cpu unset (a DeepSpeed launch without a GPU then runs DeepSpeed "
        "on the CPU), or launch with configs/accelerate/zero2.yaml or cpu2.yaml")


@pytest.mark.parametrize("stage", ["1", "2", "3"])
def test_a_deepspeed_launch_without_a_gpu_runs_deepspeed_on_the_cpu(launcher, monkeypatch, capsys, stage):
    """No GPU, a DeepSpeed launch: use_cpu defaults to false and ddp_backend to gloo (accelerate then starts the
    engine on DeepSpeed's CPU accelerator, tests/distributed/test_zero3.py), no DDP-fallback warning, no refusal."""
    from align.args import CPUSaneDefaults

    monkeypatch.setattr(sh, "has_accelerator", lambda: False)
    monkeypatch.setattr("align.args.has_accelerator", lambda: False)
    assert not sh.deepspeed_on_cpu()
    values = {}
    CPUSaneDefaults.precheck(values)
    assert "ddp_backend" not in values  # no DeepSpeed launch: nothing changes
    launcher(ACCELERATE_USE_DEEPSPEED="true", ACCELERATE_DEEPSPEED_ZERO_STAGE=stage)
    assert sh.deepspeed_on_cpu()
    use_cpu = next(f for f in CPUSaneDefaults.__dataclass_fields__.values() if f.name == "use_cpu")
    assert use_cpu.default_factory() is False
    for given, expected in ((None, "gloo"), ("mpi", "mpi")):
        values = {} if given is None else {"ddp_backend": given}
        CPUSaneDefaults.precheck(values)
        assert values["ddp_backend"] == expected
    for half in ({"torch_dtype": "bfloat16"}, {"bf16": True}):  # transformers' own refusal, said in align's words
        with pytest.raises(ConfigError, match=r"^torch_dtype / bf16: DeepSpeed on the CPU \(a DeepSpeed launch "):
            CPUSaneDefaults.precheck(dict(half))
    values = {"use_cpu": True}  # asked for by hand: accelerate's CPU run (DDP), as before
    CPUSaneDefaults.precheck(values)
    assert "ddp_backend" not in values
    assert not sh.runs_on_cpu(run_args(use_cpu=False)) and sh.runs_on_cpu(run_args(use_cpu=True))
    sh.check_launch(run_args("grpo", use_cpu=False))
    assert capsys.readouterr().err == ""


def test_launchers_use_cpu_counts_even_when_the_config_says_gpu(launcher, monkeypatch):
    monkeypatch.setattr(sh, "has_accelerator", lambda: True)
    launcher(ACCELERATE_USE_CPU="true")
    assert sh.runs_on_cpu(run_args(use_cpu=False))
    monkeypatch.delenv("ACCELERATE_USE_CPU")
    assert not sh.runs_on_cpu(run_args(use_cpu=False))
    assert sh.runs_on_cpu(run_args(use_cpu=True))


@pytest.mark.parametrize("recipe", ["dpo", "grpo", "raft", "online_dpo", "xpo", "egpo", "iterative_dpo"])
def test_zero3_runs_every_trainer_and_rollout_with_lora_too(launcher, monkeypatch, recipe):
    """Every trainer runs under ZeRO-3 (a partitioned reference copy, gathered passes, EGPO's restore of each
    process's optimizer part: tests/distributed/test_fsdp2.py), with HF generation, a colocated engine or
    vllm-server (weights gathered one at a time for the push: tests/vllm/test_vllm.py), a LoRA policy too (its
    adapter alone, or merged weight by weight without writing into the partitions)."""
    on_gpu(monkeypatch)
    launcher(ACCELERATE_USE_DEEPSPEED="true", ACCELERATE_DEEPSPEED_ZERO_STAGE="3")
    for rollout in ("hf", "vllm", "vllm-server"):
        sh.check_launch(run_args(recipe, precompute_ref_logps=False, use_peft=False, rollout=rollout))
    for rollout in ("hf", "vllm", "vllm-server"):  # LoRA: the adapter alone, or merged, gathered piece by piece
        for adapter in (True, False):
            sh.check_launch(run_args(recipe, precompute_ref_logps=False, use_peft=True, rollout=rollout,
                                     vllm_lora_adapter=adapter))


@pytest.mark.parametrize("recipe", ["grpo", "online_dpo"])
def test_fsdp2_takes_vllm_rollouts(launcher, recipe):
    """A colocated engine and vllm-server under align's FSDP2: every process gathers each weight in turn for the push
    (tests/vllm/test_vllm.py)."""
    launcher(ACCELERATE_USE_FSDP="true")
    for rollout in ("vllm", "vllm-server"):
        sh.check_launch(run_args(recipe, use_peft=False, precompute_ref_logps=True, beta=0.0, rollout=rollout,
                                 objective="dpo", entanglement_steps=None, entanglement_action="none"))


def test_batch_pair_gradients_and_the_probe_monitor_run_under_every_sharding(launcher, monkeypatch):
    """pairnorm / entanglement_action take each training pair's gradients on gathered weights under ZeRO-3 and align's
    FSDP2, like the probe monitor (the numbers: tests/distributed/test_fsdp2.py); before, ZeRO-3 and FSDP2 refused
    them in one line."""
    on_gpu(monkeypatch)
    base = dict(use_peft=False, precompute_ref_logps=True, rollout="hf", entanglement_action="none")
    options = ({"objective": "pairnorm"}, {"objective": "dpo", "entanglement_action": "downweight"},
               {"objective": "dpo", "entanglement_steps": 5})
    for env in ({"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "3"},
                {"ACCELERATE_DEEPSPEED_ZERO_STAGE": "2"}, {"ACCELERATE_USE_DEEPSPEED": "false",
                                                          "ACCELERATE_USE_FSDP": "true"}):
        launcher(**env)
        for option in options:
            assert sh.check_launch(run_args("dpo", **{**base, **option})) is None


@pytest.mark.parametrize("extra", [{"reward_funcs": ["accuracy", "model:org/rm"]}, {"oracle": "pairwise:org/judge"},
                                   {"oracle": "reward:model:org/rm"}])
def test_zero3_takes_reward_and_judge_models(launcher, monkeypatch, extra):
    """They load whole in every process (align.zero3.loading_whole; a ZeRO-3 GRPO run with a model reward equals 1
    process in tests/distributed/test_fsdp2.py)."""
    on_gpu(monkeypatch)
    launcher(ACCELERATE_USE_DEEPSPEED="true", ACCELERATE_DEEPSPEED_ZERO_STAGE="3")
    sh.check_launch(run_args("grpo" if "reward_funcs" in extra else "online_dpo", rollout="hf", **extra))


def test_no_sharding_asked_checks_nothing(launcher, capsys):
    sh.check_launch(run_args("online_dpo"))
    assert capsys.readouterr().err == ""


# --- check_in_effect: after the Trainer built its accelerator ---------------------------------------------------


def test_sharding_asked_but_not_in_effect_on_gpus_is_an_error(launcher, monkeypatch):
    on_gpu(monkeypatch)
    launcher(ACCELERATE_USE_FSDP="true")
    with pytest.raises(TrainingError) as err:
        sh.check_in_effect(run_args(), SimpleNamespace(distributed_type=SimpleNamespace(value="MULTI_GPU")))
    assert str(err.value) == ("distributed_type: FSDP was asked for, but accelerate runs MULTI_GPU: the run would not "
                              "be sharded; check the accelerate config and that its processes see a GPU each")
    sh.check_in_effect(run_args(), SimpleNamespace(distributed_type=SimpleNamespace(value="FSDP")))
    launcher(ACCELERATE_USE_FSDP="false", ACCELERATE_USE_DEEPSPEED="true", ACCELERATE_DEEPSPEED_ZERO_STAGE="2")
    sh.check_in_effect(run_args(), SimpleNamespace(distributed_type=SimpleNamespace(value="DEEPSPEED")))
    with pytest.raises(TrainingError, match="ZeRO-2 was asked for, but accelerate runs NO"):
        sh.check_in_effect(run_args(), SimpleNamespace(distributed_type=SimpleNamespace(value="NO")))


def test_cpu_fallback_is_not_an_error_after_the_warning(launcher):
    launcher(ACCELERATE_USE_FSDP="true")
    sh.check_in_effect(run_args(use_cpu=True), SimpleNamespace(distributed_type=SimpleNamespace(value="MULTI_CPU")))


def test_rank0_weights_are_shared_only_under_ram_efficient_fsdp_loading(launcher, monkeypatch):
    launcher(ACCELERATE_USE_FSDP="true")
    monkeypatch.setenv("FSDP_CPU_RAM_EFFICIENT_LOADING", "true")
    assert not sh.rank0_loads_alone()  # no process group: one process, nothing to share
    model = torch.nn.Linear(2, 2)
    assert sh.share_rank0_weights(model) is model


def test_full_weights_leaves_an_ordinary_model_alone():
    model = torch.nn.Linear(3, 2)
    before = model.weight.detach().clone()
    with sh.full_weights(model, torch.device("cpu")) as m:
        assert m is model and model.weight.device.type == "cpu"
    assert torch.equal(model.weight, before)


# --- fp32 master weights ------------------------------------------------------------------------------------------


def test_half_dtype_means_float32_weights_and_autocast():
    values = {"torch_dtype": "bfloat16"}
    apply_master_weights(values)
    assert values == {"torch_dtype": "bfloat16", "bf16": True}
    values = {"torch_dtype": "float16"}
    apply_master_weights(values)
    assert values["fp16"] is True and "bf16" not in values
    pure = {"torch_dtype": "bfloat16", "pure_bf16": True}
    apply_master_weights(pure)
    assert "bf16" not in pure
    for torch_dtype, pure_bf16, want in [("bfloat16", False, "float32"), ("float16", False, "float32"),
                                         ("bfloat16", True, "bfloat16"), ("float32", False, "float32"),
                                         ("auto", False, "auto"), ("auto", True, "auto")]:
        assert weights_dtype(SimpleNamespace(torch_dtype=torch_dtype, pure_bf16=pure_bf16)) == want
    # LoRA: the base never changes (peft's adapter is float32), so it stays in the half dtype
    assert weights_dtype(SimpleNamespace(torch_dtype="bfloat16", pure_bf16=False, use_peft=True)) == "bfloat16"


def test_master_weight_contradictions_are_one_line():
    with pytest.raises(ConfigError, match=r"^bf16: false, but torch_dtype: bfloat16 computes in bfloat16 through bf16 "
                                          r"autocast over float32 master weights; remove bf16: false"):
        apply_master_weights({"torch_dtype": "bfloat16", "bf16": False})
    with pytest.raises(ConfigError, match=r"^pure_bf16: keeps the weights in torch_dtype, which is 'float32'"):
        apply_master_weights({"pure_bf16": True})


def test_the_vanishing_update_rule():
    # bf16 keeps 8 significant bits: an lr below 2^-8 x the median |w| is below its precision at a typical weight.
    assert vanishing_threshold("bfloat16", 0.02) == pytest.approx(0.02 / 256)
    assert vanishing_threshold("float16", 0.02) == pytest.approx(0.02 / 2048)
    # The rule's premise, checked on the dtype itself: a step of 0.5 x 2^-8 x |w| rounds away, 2 x 2^-8 x |w| does not.
    w = torch.tensor(0.02, dtype=torch.bfloat16)
    assert (w + w * 2**-9) == w and (w + w * 2**-7) != w


def test_vanishing_update_warning(capsys):
    layer = torch.nn.Linear(64, 64, bias=False)
    with torch.no_grad():
        signs = torch.ones(64 * 64)
        signs[::2] = -1
        layer.weight.copy_((signs * 2**-6).reshape(64, 64))  # |w| = 2^-6 everywhere, exact in bf16
    half = layer.to(torch.bfloat16)
    line = warn_vanishing_updates(half, SimpleNamespace(learning_rate=5e-7, use_peft=False))
    assert line == ("warning: learning_rate 5e-07 is below bfloat16's relative precision 2^-8 x the weights' median "
                    "|w| 0.0156 = 6.1e-05: most updates of bfloat16 weights round away (docs/architecture.md, "
                    "Precision); leave pure_bf16 off (float32 master weights, bfloat16 compute) or raise learning_rate")
    assert capsys.readouterr().err.strip() == line
    assert warn_vanishing_updates(half, SimpleNamespace(learning_rate=2**-14, use_peft=False)) is None  # at the line
    assert warn_vanishing_updates(half, SimpleNamespace(learning_rate=5e-7, use_peft=True)) is None
    fp32 = copy.deepcopy(half).float()
    assert warn_vanishing_updates(fp32, SimpleNamespace(learning_rate=5e-7, use_peft=False)) is None
    assert warn_vanishing_updates(half, SimpleNamespace(learning_rate=5e-7, use_peft=False), is_main=False) == line
    assert capsys.readouterr().err == ""


# --- align train --accelerate_config ----------------------------------------------------------------------------


def test_launcher_flags_are_taken_out_anywhere(launcher):
    flags, rest = split_launcher_flags(["--config", "testbed", "--accelerate-config=a.yaml", "max_steps=2",
                                        "--num_processes", "2", "--main_process_port", "29555"])
    assert flags == {"--accelerate_config": "a.yaml", "--num_processes": "2", "--main_process_port": "29555"}
    assert rest == ["--config", "testbed", "max_steps=2"]


def test_launcher_command(launcher, tmp_path):
    cfg = tmp_path / "acc.yaml"
    cfg.write_text("distributed_type: MULTI_GPU\n")
    cmd = launcher_command("align.recipes.dpo", {"--accelerate_config": str(cfg), "--num_processes": "2"},
                           ["--config", "testbed"])
    assert cmd == [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(cfg), "--num_processes",
                   "2", "-m", "align.recipes.dpo", "--config", "testbed"]


@pytest.mark.parametrize("flags, message", [
    ({"--accelerate_config": "missing.yaml"}, "--accelerate_config: file 'missing.yaml' does not exist (shipped ones: "
                                              "configs/accelerate/ddp.yaml, fsdp2.yaml, zero1.yaml, zero2.yaml, "
                                              "zero3.yaml, multi_node.yaml, cpu2.yaml)"),
    ({"--num_processes": "2"}, "--num_processes: needs --accelerate_config FILE (an accelerate config, e.g. "
                               "configs/accelerate/ddp.yaml)"),
    ({"--accelerate_config": "configs/accelerate/cpu2.yaml", "--num_processes": "0"},
     "--num_processes: must be a whole number >= 1, got '0'"),
    ({"--accelerate_config": "configs/accelerate/cpu2.yaml", "--main_process_port": "70000"},
     "--main_process_port: must be a port number in 1..65535, got '70000'"),
])
def test_bad_launcher_flags(launcher, repo, monkeypatch, flags, message):
    monkeypatch.chdir(repo)
    with pytest.raises(ConfigError) as err:
        launcher_command("align.recipes.dpo", flags, [])
    assert str(err.value) == message


def test_no_launcher_inside_a_launcher(launcher, repo, monkeypatch):
    monkeypatch.chdir(repo)
    launcher(WORLD_SIZE="2")
    with pytest.raises(ConfigError, match=r"^--accelerate_config: this command already runs under a launcher"):
        launcher_command("align.recipes.dpo", {"--accelerate_config": "configs/accelerate/cpu2.yaml"}, [])


def test_a_flag_without_its_value():
    with pytest.raises(ConfigError, match=r"^--num_processes: needs a value \(--num_processes VALUE\)$"):
        split_launcher_flags(["--accelerate_config", "x.yaml", "--num_processes"])


# --- align's own FSDP2 on the CPU (align/fsdp2.py; the 2-process runs: tests/distributed/test_fsdp2.py) ----------


def test_fsdp2_finds_the_decoder_layers_and_its_config(launcher, monkeypatch):
    from transformers import LlamaConfig, LlamaForCausalLM

    from align import fsdp2
    from align.trainers.preference import PreferenceTrainer

    model = LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=3,
                                         num_attention_heads=2, num_key_value_heads=1))
    assert fsdp2.decoder_layers(model) == list(model.model.layers)  # by _no_split_modules: LlamaDecoderLayer
    model._no_split_modules = None
    assert fsdp2.decoder_layers(model) == list(model.model.layers)  # else model.model.layers
    assert fsdp2.reshard_after_forward(SimpleNamespace(fsdp_config={})) is True
    monkeypatch.setenv("FSDP_RESHARD_AFTER_FORWARD", "false")  # the accelerate config's fsdp_reshard_after_forward
    assert fsdp2.reshard_after_forward(SimpleNamespace(fsdp_config={"reshard_after_forward": True})) is False
    launcher(ACCELERATE_USE_FSDP="true")
    assert not fsdp2.wanted(run_args("dpo"), PreferenceTrainer)  # no process group of 2+: nothing to shard
    assert not fsdp2.wanted(run_args("iterative_dpo"), PreferenceTrainer)  # its rounds run as DDP
    assert not fsdp2.is_sharded(model)


def test_loading_whole_clears_transformers_zero3_flag_for_the_block_only():
    """transformers partitions whatever from_pretrained loads while its ZeRO-3 flag is set; align.zero3.loading_whole
    clears it for a frozen model's load and sets it again, with the same config, after (also after an error)."""
    from transformers.integrations import (
        HfDeepSpeedConfig,
        deepspeed_config,
        is_deepspeed_zero3_enabled,
        unset_hf_deepspeed_config,
    )

    from align.zero3 import loading_whole

    config = {"zero_optimization": {"stage": 3}, "train_micro_batch_size_per_gpu": 1}
    keep = HfDeepSpeedConfig(config)
    try:
        assert is_deepspeed_zero3_enabled()
        with loading_whole():
            assert not is_deepspeed_zero3_enabled() and deepspeed_config() is None
        assert is_deepspeed_zero3_enabled() and deepspeed_config() == config
        with pytest.raises(OSError), loading_whole():
            raise OSError("the load failed")
        assert is_deepspeed_zero3_enabled() and deepspeed_config() == config
        del keep
    finally:
        unset_hf_deepspeed_config()
    with loading_whole():  # no ZeRO-3: nothing to clear, nothing set after
        assert not is_deepspeed_zero3_enabled()
    assert not is_deepspeed_zero3_enabled()
