"""Issue 18 §1 and §3: token-budget micro-batches (hand-computed; the RL old / reference passes, the DPO reference
precompute and the RL update give the old batching's values), ``max_tokens_per_micro_batch`` checked (exit 2, one
line), and the HF / mixture engines: the completions and log-probs of the engine before issue 18 (copied here as
the oracle) with no ``[rows, steps, vocab]`` tensor built."""

from __future__ import annotations

import glob
import os
from contextlib import nullcontext
from types import SimpleNamespace

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from align.logps import pack, token_logps
from align.microbatch import padding_fraction, token_budget_batches
from align.modeling import load_model, load_tokenizer
from align.rollout import HFEngine, SamplingParams
from align.rollout.base import sample_seed
from align.rollout.hf import filter_logits
from align.rollout.mixture import MixtureEngine

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ONE_PROCESS = SimpleNamespace(is_main_process=False, num_processes=1, process_index=0)  # an accelerator stand-in

# (prompt, completion) lengths of five RL samples, and the micro-batches a budget of 80 padded tokens makes:
# longest first (totals 35, 15, 12, 5, 3 -> items 2, 0, 3, 1, 4); [2, 0] is 2 rows x (5 + 30) = 70 tokens, adding
# item 3 would make 3 x 35 = 105 > 80; [3, 1, 4] is 3 rows x (4 + 8) = 36.
RL_SIZES = [(5, 10), (3, 2), (5, 30), (4, 8), (2, 1)]
RL_BATCHES_80 = [[2, 0], [3, 1, 4]]


# --- the token budget, by hand ---------------------------------------------------------------------------


def test_token_budget_batches_by_hand():
    assert token_budget_batches(RL_SIZES, 80) == RL_BATCHES_80
    # a budget below one item: it runs alone; [1, 4] is 2 x (3 + 2) = 10 <= 10
    assert token_budget_batches(RL_SIZES, 10) == [[2], [0], [3], [1, 4]]
    assert token_budget_batches(RL_SIZES, 10**6) == [[2, 0, 3, 1, 4]]
    assert token_budget_batches(RL_SIZES, 10**6, max_items=2) == [[2, 0], [3, 1], [4]]  # micro_batch_size 2
    assert token_budget_batches(RL_SIZES, 80, max_items=2) == [[2, 0], [3, 1], [4]]
    # preference pairs: two sequences per item; [1, 2] is 2 pairs x 2 rows x 50 = 200 <= 200, + item 0: 300
    assert token_budget_batches([(20,), (50,), (30,)], 200, rows_per_item=2) == [[1, 2], [0]]
    assert token_budget_batches([(7,), (7,), (7,)], 28, rows_per_item=2) == [[0, 1], [2]]  # ties keep their order
    assert token_budget_batches([], 16) == []
    with pytest.raises(ValueError, match="budget: must be >= 1, got 0"):
        token_budget_batches(RL_SIZES, 0)


def test_padding_fraction_by_hand():
    real = sum(p + c for p, c in RL_SIZES)  # 70
    # one batch of all five: 5 rows x (5 + 30) = 175 positions; grouped at 80: 70 + 36 = 106
    assert padding_fraction(RL_SIZES, [[0, 1, 2, 3, 4]], real) == pytest.approx(1 - 70 / 175)
    assert padding_fraction(RL_SIZES, RL_BATCHES_80, real) == pytest.approx(1 - 70 / 106)


@pytest.mark.parametrize(("recipe", "value"), [("dpo", "0"), ("grpo", "-5")])
def test_budget_option_is_checked(recipe, value, tmp_path, capsys, monkeypatch):
    from align.recipe import get_recipe, main

    monkeypatch.chdir(tmp_path)
    config = os.path.join(REPO, "configs", recipe, "testbed.yaml")
    code = main(get_recipe(recipe), ["--config", config, f"output_dir={tmp_path}/out",
                                     f"max_tokens_per_micro_batch={value}"])
    err = capsys.readouterr().err
    assert code == 2
    assert err.splitlines() == [f"error: max_tokens_per_micro_batch: must be >= 1, got {value}"]
    assert not (tmp_path / "out").exists()


# --- the RL old / reference passes ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def policy(testbed):
    return load_model(str(testbed.policy)), load_tokenizer(str(testbed.policy))


class ForwardShapes:
    """A forward pre-hook recording the ``input_ids`` shape of every forward of a model."""

    def __init__(self, model):
        self.shapes: list[tuple[int, int]] = []
        self.handle = model.register_forward_pre_hook(self.hook, with_kwargs=True)

    def hook(self, module, args, kwargs):
        self.shapes.append(tuple(kwargs["input_ids"].shape))


def test_rl_passes_by_token_budget_equal_one_batch(policy):
    from align.trainers.rounds import RoundBuilder, Sample

    model, tok = policy
    gen = torch.Generator().manual_seed(0)
    samples = []
    for g, (p, c) in enumerate(RL_SIZES):
        ids = torch.randint(2, 384, (p + c,), generator=gen).tolist()
        samples.append(Sample(g, 0, 0, 0.0, {}, c, False, ids[:p], ids[p:], minibatch=1))
    args = SimpleNamespace(allocator="uniform", advantage="grpo", scale_rewards="group", accept_threshold=0.5,
                           grad_norm_monitor_steps=None, num_minibatches=2, num_iterations=1, updates_per_round=2,
                           beta=0.1, device="cpu", max_tokens_per_micro_batch=80, micro_batch_size=64,
                           logits_block_size=0)
    builder = RoundBuilder(args, ONE_PROCESS, None, None, None, tok, [], tok.pad_token_id, policy=lambda: model,
                           reference=lambda: (model, nullcontext()), step=lambda: 0)
    rec = ForwardShapes(model)
    try:
        builder._precompute_logps(samples, 0)
    finally:
        rec.handle.remove()
    # the old log-probs pass, then the reference pass, each on [2, 0] (2 x 35) and [3, 1, 4] (3 x 12)
    assert rec.shapes == [(2, 35), (3, 12)] * 2
    # before: one micro-batch of micro_batch_size 64 sequences, in order
    ids, attn, _, width = pack([s.prompt_ids for s in samples], [s.completion_ids for s in samples], tok.pad_token_id)
    with torch.no_grad():
        whole = token_logps(model, ids, attn, width)
    # to fp32 rounding: another left padding shifts every position (RoPE sees the same differences), another batch
    # shape rounds the matmuls differently; 1e-6 relative is ~8 ulps at the log-probs' size (-10)
    for s, row in zip(samples, whole, strict=True):
        assert s.old_logps.shape == (s.length,) and s.ref_logps.shape == (s.length,)
        torch.testing.assert_close(s.old_logps, row[: s.length], atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(s.ref_logps, row[: s.length], atol=1e-6, rtol=1e-6)


# --- the DPO reference precompute -----------------------------------------------------------------------


@pytest.mark.slow
def test_reference_precompute_by_token_budget_equals_eval_batches(testbed, tmp_path):
    from align.config import load_config
    from align.data.preference import PreferenceCollator
    from align.microbatch import padded_width
    from align.recipes.dpo import DPORecipeConfig, build_trainer
    from align.trainers.preference import pair_sizes

    over = {"output_dir": str(tmp_path / "out"), "max_steps": 1, "disable_tqdm": True, "max_train_samples": 24,
            "per_device_eval_batch_size": 8}
    trainer = build_trainer(load_config(DPORecipeConfig, os.path.join(REPO, "configs/dpo/testbed.yaml"), over))
    ds = trainer.train_dataset
    rows = list(range(len(ds)))
    # before: per_device_eval_batch_size rows at a time, in order
    collate = PreferenceCollator(trainer.processing_class.pad_token_id)
    trainer.model.eval()
    old = []
    for s in range(0, len(ds), 8):
        batch = collate([ds[i] for i in rows[s : s + 8]])
        c, r = trainer.reference_logps(batch)
        old.extend(zip(c.tolist(), r.tolist(), strict=True))
    old = torch.tensor(old, dtype=torch.float64)

    sizes = pair_sizes(ds, rows)
    budget = 4 * max(w for (w,) in sizes)  # about two pairs per forward
    expected = token_budget_batches(sizes, budget, 2)
    assert 6 <= len(expected) <= 12  # the budget really splits the 24 pairs (hand check: sizes are 31..55 tokens)
    model, _ = trainer.reference()
    for value in (budget, 10**6):
        for path in glob.glob(str(tmp_path / "out" / "ref_logps-*.pt")):
            os.remove(path)  # the cache is keyed by weights and data, not by the budget
        trainer.args.max_tokens_per_micro_batch = value
        rec = ForwardShapes(model)
        try:
            got = trainer.precompute_reference(ds)
        finally:
            rec.handle.remove()
        batches = token_budget_batches(sizes, value, 2)
        assert rec.shapes == [(2 * len(b), padded_width(sizes, b)) for b in batches]
        assert all(rows_ * width <= value for rows_, width in rec.shapes)
        new = torch.tensor([got["ref_chosen_logps"], got["ref_rejected_logps"]], dtype=torch.float64).T
        torch.testing.assert_close(new, old, atol=1e-6, rtol=0)
    assert len(expected) > 1 and batches == [sorted(rows, key=lambda i: -sizes[i][0])]


# --- the HF engine: the engine before issue 18, as the oracle --------------------------------------------


class LegacyNoise:
    """The engine's logits processor before issue 18: tempered, filtered scores plus Gumbel noise."""

    def __init__(self, sampling, seeds):
        self.sampling = sampling
        self.generators = [torch.Generator().manual_seed(s) for s in seeds]

    def __call__(self, input_ids, scores):
        s = self.sampling
        scores = filter_logits(scores.float() / s.temperature, s.top_k, s.top_p)
        u = torch.stack([torch.rand(scores.shape[-1], generator=g) for g in self.generators]).to(scores.device)
        return scores + -torch.log(-torch.log(u.clamp(1e-20, 1.0 - 1e-7)))


class LegacyMixer:
    """The mixture processor before issue 18: it kept every step's mixed log-probs."""

    def __init__(self, ref, coef, input_ids, attention_mask):
        self.ref, self.coef, self.prompt_mask, self.width = ref, coef, attention_mask, input_ids.shape[1]
        self.past, self.seen, self.history = None, 0, []

    def __call__(self, input_ids, scores):
        rows, length = input_ids.shape
        mask = torch.cat([self.prompt_mask, torch.ones((rows, length - self.width), dtype=self.prompt_mask.dtype)], 1)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        out = self.ref(input_ids=input_ids[:, self.seen:], attention_mask=mask, position_ids=positions[:, self.seen:],
                       past_key_values=self.past, use_cache=True)
        self.past, self.seen = out.past_key_values, length
        mixed = (1 - self.coef) * scores.float().log_softmax(-1) + self.coef * out.logits[:, -1].float().log_softmax(-1)
        self.history.append(mixed.log_softmax(-1))
        return self.history[-1]


@torch.no_grad()
def legacy_generate(model, tok, prompts, counts, sampling, ref=None, coef=0.0):
    """What HFEngine / MixtureEngine returned before issue 18 (one batch): ``(completions, sampling log-probs)``."""
    from transformers import GenerationConfig, LogitsProcessorList

    engine = HFEngine(model, tok)
    rows = [(i, k) for i, n in enumerate(counts) for k in range(n)]
    width = max(len(prompts[i]) for i, _ in rows)
    ids = torch.full((len(rows), width), engine.pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for r, (i, _) in enumerate(rows):
        ids[r, width - len(prompts[i]) :] = torch.tensor(prompts[i])
        mask[r, width - len(prompts[i]) :] = 1
    config = GenerationConfig(max_new_tokens=sampling.max_new_tokens, do_sample=False, eos_token_id=engine.eos_ids,
                              pad_token_id=engine.pad_id, bos_token_id=None, output_logits=True,
                              return_dict_in_generate=True)
    processors = LogitsProcessorList([LegacyMixer(ref, coef, ids, mask)] if ref is not None else [])
    if sampling.temperature > 0:
        processors.append(LegacyNoise(sampling, [sample_seed(sampling.seed, i, k) for i, k in rows]))
    model.eval()
    gen = model.generate(input_ids=ids, attention_mask=mask, generation_config=config, logits_processor=processors)
    new = gen.sequences[:, width:]
    logits = torch.stack(processors[0].history if ref is not None else gen.logits, 1).float()
    if sampling.temperature > 0:
        logits = filter_logits(logits / sampling.temperature, sampling.top_k, sampling.top_p)
    logps = logits.log_softmax(-1).gather(-1, new.unsqueeze(-1)).squeeze(-1)
    completions, out_logps = [], []
    for r in range(len(rows)):
        tokens = new[r].tolist()
        stop = next((t for t, x in enumerate(tokens) if x in engine.eos_ids), None)
        length = len(tokens) if stop is None else stop + 1
        completions.append(tokens[:length])
        out_logps.append(logps[r, :length])
    return completions, out_logps


def chat_prompts(tok, questions):
    texts = [tok.apply_chat_template([{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True)
             for q in questions]
    return [tok(t, add_special_tokens=False)["input_ids"] for t in texts]


QUESTIONS = ["What is 3+4?", "What is 7*8?", "What is 9-2?", "What is 6*6?"]
SAMPLINGS = [SamplingParams(max_new_tokens=16, temperature=1.0, seed=0),
             SamplingParams(max_new_tokens=16, temperature=0.7, top_k=20, seed=1),
             SamplingParams(max_new_tokens=16, temperature=1.3, top_p=0.9, seed=2),
             SamplingParams(max_new_tokens=16, temperature=0.8, top_k=50, top_p=0.8, seed=3),
             SamplingParams(max_new_tokens=16, temperature=0.0, seed=4)]


def assert_same(new, old_completions, old_logps):
    assert new.completion_ids == old_completions
    for got, want in zip(new.sampling_logps, old_logps, strict=True):
        torch.testing.assert_close(torch.tensor(got), want, atol=1e-6, rtol=0)


@pytest.mark.parametrize("sampling", SAMPLINGS, ids=lambda s: f"T{s.temperature}-k{s.top_k}-p{s.top_p}-s{s.seed}")
def test_hf_engine_equals_the_engine_before(policy, sampling):
    model, tok = policy
    prompts = chat_prompts(tok, QUESTIONS)
    old_completions, old_logps = legacy_generate(model, tok, prompts, [3, 1, 0, 4], sampling)
    new = HFEngine(model, tok, batch_size=64).generate(prompts, [3, 1, 0, 4], sampling)
    assert_same(new, old_completions, old_logps)
    if sampling.temperature > 0:  # it really samples
        assert len({tuple(c) for c in new.completion_ids}) > 2


@pytest.fixture(scope="module")
def reference(testbed):
    return load_model(str(testbed.base))


@pytest.mark.parametrize("coef", [pytest.param(0.0, marks=pytest.mark.slow), 0.5,
                                  pytest.param(1.0, marks=pytest.mark.slow)])
def test_mixture_engine_equals_the_engine_before(policy, reference, coef):
    model, tok = policy
    ref = reference
    prompts = chat_prompts(tok, QUESTIONS[:2])
    for sampling in (SAMPLINGS[3], SAMPLINGS[4]):  # top-k and top-p; greedy
        old_completions, old_logps = legacy_generate(model, tok, prompts, [3, 3], sampling, ref=ref, coef=coef)
        new = MixtureEngine(model, ref, tok, coef).generate(prompts, [3, 3], sampling)
        assert_same(new, old_completions, old_logps)


def test_model_generation_defaults_do_not_change_the_sampler(policy):
    """generate fills unset fields from the model's generation_config (a repetition penalty, a minimum length): the
    engine turns them off, so what it samples is the policy's tempered, cut distribution."""
    model, tok = policy
    prompts = chat_prompts(tok, QUESTIONS)
    clean = HFEngine(model, tok).generate(prompts, [2, 2, 2, 2], SAMPLINGS[1])
    assert min(len(c) for c in clean.completion_ids) < 6  # short answers: a minimum length would show
    saved = model.generation_config.to_dict()
    model.generation_config.repetition_penalty, model.generation_config.min_new_tokens = 1.5, 6
    try:
        skewed = HFEngine(model, tok).generate(prompts, [2, 2, 2, 2], SAMPLINGS[1])
    finally:
        model.generation_config.repetition_penalty = saved.get("repetition_penalty")
        model.generation_config.min_new_tokens = saved.get("min_new_tokens")
    assert skewed.completion_ids == clean.completion_ids
    assert skewed.sampling_logps == clean.sampling_logps


# --- no [rows, steps, vocab] tensor ----------------------------------------------------------------------


class LargestTensor(TorchDispatchMode):
    """Records the largest number of elements of any tensor an operator returns."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


@pytest.fixture(scope="module")
def wide_vocab_model():
    """A config-built Llama with an 8,192-token vocabulary and a tiny body (its own tensors are small next to the
    logits, as with a real vocabulary), random weights, so completions run to max_new_tokens."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=8192, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, head_dim=16, max_position_embeddings=128,
                         eos_token_id=1, pad_token_id=0, bos_token_id=None)
    return LlamaForCausalLM(config).eval()


def test_generation_builds_no_rows_steps_vocab_tensor(wide_vocab_model, policy):
    _, tok = policy
    prompts = chat_prompts(tok, QUESTIONS[:2])
    sampling = SamplingParams(max_new_tokens=32, temperature=1.0, top_k=100, top_p=0.95, seed=7)
    rows, vocab = 8, wide_vocab_model.config.vocab_size
    with LargestTensor() as now:
        out = HFEngine(wide_vocab_model, tok).generate(prompts, [4, 4], sampling)
    steps = max(len(c) for c in out.completion_ids)
    assert steps == 32 and len(out) == rows
    assert now.largest < rows * steps * vocab / 4, now.largest  # 8 x 8,192 per step at most here
    with LargestTensor() as before:  # the engine before issue 18 did build one: the check can fail
        old_completions, old_logps = legacy_generate(wide_vocab_model, tok, prompts, [4, 4], sampling)
    assert before.largest >= rows * steps * vocab
    assert_same(out, old_completions, old_logps)


# --- the RL update: grouped by length where the loss is a sum over micro-batches ---------------------------


@pytest.mark.slow
@pytest.mark.parametrize("loss_type", ["dapo", "grpo", "bnpo"])
def test_rl_update_grouping_changes_no_gradient(testbed, tmp_path, loss_type):
    from align.config import load_config
    from align.recipes.grpo import GRPORecipeConfig, build_trainer

    over = {"output_dir": str(tmp_path / "out"), "disable_tqdm": True, "max_steps": 1, "max_train_samples": 16,
            "per_device_train_batch_size": 4, "num_generations": 4, "num_minibatches": 1,
            "dataset_test_split": None, "loss_type": loss_type, "micro_batch_size": 16}
    trainer = build_trainer(load_config(GRPORecipeConfig, os.path.join(REPO, "configs/grpo/testbed.yaml"), over))
    rnd = trainer.rounds.make([trainer.train_dataset[i] for i in range(4)], 0)
    samples = rnd.samples
    assert len({len(s.prompt_ids) + s.length for s in samples}) >= 3  # lengths to group

    def gradient(micro_batch_size):
        trainer.args.micro_batch_size = micro_batch_size
        trainer.model.zero_grad()
        rec = ForwardShapes(trainer.model)
        try:
            trainer._update(trainer.model, rnd, 0)
        finally:
            rec.handle.remove()
        return torch.cat([p.grad.flatten() for p in trainer.model.parameters()]), rec.shapes

    whole, _ = gradient(16)
    split, shapes = gradient(5)
    chunks = [samples[j : j + 5] for j in range(0, 16, 5)]
    in_order = [(len(c), max(len(s.prompt_ids) for s in c) + max(s.length for s in c)) for c in chunks]
    ranked = sorted(samples, key=lambda s: -(len(s.prompt_ids) + s.length))
    grouped = [(len(c), max(len(s.prompt_ids) for s in c) + max(s.length for s in c))
               for c in (ranked[j : j + 5] for j in range(0, 16, 5))]
    if loss_type == "bnpo":  # a mean per micro-batch: grouping would change the loss, so the order is kept
        assert shapes == in_order
        assert not torch.allclose(split, whole, atol=1e-6, rtol=0)
    else:
        assert shapes == grouped != in_order  # longest first
        torch.testing.assert_close(split, whole, atol=1e-6, rtol=1e-5)
