"""Held-out accuracy of a policy on verifiable prompts (greedy decoding with HF generate)."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence

from align.args import CPUSaneDefaults
from align.rewards.math import extract_answer, is_correct


def prompt_texts(tokenizer, prompts: Sequence) -> list[str]:
    """Prompts as model input text: conversational prompts go through the chat template."""
    out = []
    for p in prompts:
        if isinstance(p, str):
            out.append(p)
        else:
            out.append(tokenizer.apply_chat_template(p, tokenize=False, add_generation_prompt=True))
    return out


def prompt_token_ids(tokenizer, rows: Sequence[dict]) -> list[list[int]]:
    """Each row's prompt as token ids: its ``prompt_ids`` when it has them (a tokenised dataset's), else its
    ``prompt`` through :func:`prompt_texts`, without special tokens."""
    texts = prompt_texts(tokenizer, [r["prompt"] for r in rows])
    return [list(r["prompt_ids"]) if "prompt_ids" in r else tokenizer(t, add_special_tokens=False)["input_ids"]
            for r, t in zip(rows, texts, strict=True)]


class EntropyRecorder:
    """A logits processor (the last) that records each step's next-token entropy, one number per row, and
    changes nothing: the entropy metric without ``output_logits`` (a ``[rows, steps, vocab]`` copy)."""

    def __init__(self):
        self.steps: list = []

    def __call__(self, input_ids, scores):
        from align.logps import token_entropy

        self.steps.append(token_entropy(scores.float()))
        return scores


def generate(model, tokenizer, prompts: Sequence, max_new_tokens: int = 32, batch_size: int = 64,
             progress: bool = False, desc: str = "generate", with_entropy: bool = False,
             num_samples: int = 0, temperature: float = 1.0):
    """Completions for ``prompts`` (strings or message lists), decoded without special tokens.

    Greedy by default (one per prompt); ``num_samples=k`` samples k per prompt at ``temperature``
    (prompt-major order: k for the first prompt, then k for the next). With ``with_entropy`` also
    returns the policy's mean next-token entropy along its own generations (every generated position
    up to and including eos), in nats, of the scores greedy decoding picks from (after the model's generation
    config's processors, if it has any), recorded step by step (:class:`EntropyRecorder`).
    """
    import torch
    from transformers import LogitsProcessorList

    from align.progress import bar

    texts = prompt_texts(tokenizer, prompts)
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    was_training = model.training
    model.eval()
    out: list[str] = []
    ent_sum, ent_count = 0.0, 0
    per_prompt = max(num_samples, 1)
    stage = bar(desc, len(texts) * per_prompt, "completions", show=progress)
    try:
        for s in range(0, len(texts), batch_size):
            enc = tokenizer(texts[s : s + batch_size], return_tensors="pt", padding=True, add_special_tokens=False)
            enc = {k: v.to(model.device) for k, v in enc.items()}
            recorder = EntropyRecorder()
            with torch.no_grad():
                gen = model.generate(
                    **enc,
                    max_new_tokens=max_new_tokens,
                    do_sample=num_samples > 0,
                    num_return_sequences=max(num_samples, 1),
                    **({"temperature": temperature, "top_k": 0, "top_p": 1.0} if num_samples else {}),
                    pad_token_id=tokenizer.pad_token_id,
                    eos_token_id=tokenizer.eos_token_id,
                    logits_processor=LogitsProcessorList([recorder] if with_entropy else []),
                    return_dict_in_generate=True,
                )
            new = gen.sequences[:, enc["input_ids"].shape[1] :]
            out.extend(tokenizer.batch_decode(new, skip_special_tokens=True))
            if with_entropy:
                entropy = torch.stack(recorder.steps, 1).to(new.device)
                is_eos = new == tokenizer.eos_token_id
                alive = (is_eos.long().cumsum(1) - is_eos.long()) == 0  # positions up to the first eos
                ent_sum += (entropy * alive).sum().item()
                ent_count += int(alive.sum().item())
            stage.advance(len(new))
    finally:
        stage.close()
        tokenizer.padding_side = side
        model.train(was_training)
    return (out, ent_sum / max(ent_count, 1)) if with_entropy else out


def accuracy(model, tokenizer, rows, max_new_tokens: int = 32, batch_size: int = 64, progress: bool = False) -> dict:
    """Exact-answer accuracy over ``rows`` (each with ``prompt`` and ``answer``; ``task`` optional).

    Returns ``accuracy``, ``format`` (fraction with a parseable answer), ``entropy`` (the policy's mean
    next-token entropy along its greedy generations) and ``accuracy/<task>``.
    """
    rows = list(rows)
    completions, entropy = generate(model, tokenizer, [r["prompt"] for r in rows], max_new_tokens, batch_size,
                                    progress, desc="evaluate", with_entropy=True)
    hits = [is_correct(c, r["answer"]) for c, r in zip(completions, rows, strict=True)]
    per_task: dict[str, list[bool]] = defaultdict(list)
    for hit, r in zip(hits, rows, strict=True):
        per_task[r.get("task", "all")].append(hit)
    result = {
        "accuracy": sum(hits) / max(len(hits), 1),
        "format": sum(extract_answer(c) is not None for c in completions) / max(len(completions), 1),
        "entropy": entropy,
    }
    result.update({f"accuracy/{t}": sum(v) / len(v) for t, v in sorted(per_task.items())})
    return result


def held_out(model, tokenizer, rows, k: int = 8, max_new_tokens: int = 32, seed: int = 1234) -> dict:
    """Greedy accuracy and mean@k on ``rows``: ``greedy``, ``mean_at_k`` (the mean correctness of ``k`` samples a
    row at temperature 1, drawn after ``torch.manual_seed(seed)``), ``solve_rates`` (each row's share of correct
    samples) and ``per_task`` (greedy ``accuracy/<task>``)."""
    import torch

    rows = list(rows)
    greedy = accuracy(model, tokenizer, rows, max_new_tokens=max_new_tokens)
    torch.manual_seed(seed)
    samples = generate(model, tokenizer, [r["prompt"] for r in rows], max_new_tokens, num_samples=k)
    hits = [is_correct(c, rows[i // k]["answer"]) for i, c in enumerate(samples)]
    solve = [sum(hits[i * k:(i + 1) * k]) / k for i in range(len(rows))]
    return {"greedy": greedy["accuracy"], "mean_at_k": sum(hits) / max(len(hits), 1), "solve_rates": solve,
            "per_task": {t: v for t, v in greedy.items() if t.startswith("accuracy/")}}


def answer_probability(model, tokenizer, rows, batch_size: int = 64,
                       block_size: int = CPUSaneDefaults.logits_block_size) -> dict:
    """Mean probability the policy gives the canonical correct completion ``Answer: <n>`` (then end of turn)
    of each row: the policy's expected accuracy at temperature 1 without sampling noise (it leaves out the
    rare correct answers in another format). Returns ``answer_probability`` and ``answer_probability/<task>``.
    ``block_size``: tokens per block through the lm head (:func:`align.logps.token_logps`; 0: all at once)."""
    import torch

    from align.logps import pack, token_logps

    rows = list(rows)
    prompts = prompt_token_ids(tokenizer, rows)
    answers = [tokenizer(f"Answer: {r['answer']}", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
               for r in rows]
    probs: list[float] = []
    was_training = model.training
    model.eval()
    try:
        for s in range(0, len(rows), batch_size):
            ids, attn, cmask, width = pack(prompts[s : s + batch_size], answers[s : s + batch_size],
                                           tokenizer.pad_token_id, model.device)
            with torch.no_grad():
                logps = token_logps(model, ids, attn, width, block_size=block_size)
            probs += (logps * cmask).sum(-1).exp().tolist()
    finally:
        model.train(was_training)
    per_task: dict[str, list[float]] = defaultdict(list)
    for p, r in zip(probs, rows, strict=True):
        per_task[r.get("task", "all")].append(p)
    out = {"answer_probability": sum(probs) / max(len(probs), 1)}
    out.update({f"answer_probability/{t}": sum(v) / len(v) for t, v in sorted(per_task.items())})
    return out


def sequence_entropy(model, tokenizer, rows, num_samples: int = 8, max_new_tokens: int = 32, seed: int = 0,
                     batch_size: int = 64) -> float:
    """The policy's entropy over whole completions, H(π(·|x)) = −E_{y∼π(·|x)} log π(y|x), in nats, averaged over
    ``rows`` (each with ``prompt``) and estimated from ``num_samples`` completions per prompt at temperature 1
    (HF engine, deterministic for a ``seed``). Unbiased; its standard error shrinks as 1/√(rows·samples).
    Completions cut at ``max_new_tokens`` count the log-prob of their tokens so far."""
    from align.rollout import HFEngine, SamplingParams

    rows = list(rows)
    prompts = prompt_token_ids(tokenizer, rows)
    sampling = SamplingParams(max_new_tokens=max_new_tokens, temperature=1.0, seed=seed)
    out = HFEngine(model, tokenizer, batch_size).generate(prompts, [num_samples] * len(rows), sampling)
    return -sum(sum(lp) for lp in out.sampling_logps) / max(len(out), 1)


def win_rate(policy, baseline, tokenizer, rows, oracle, num_samples: int = 4, max_new_tokens: int = 32,
             temperature: float = 1.0, seed: int = 1234, batch_size: int = 64, baseline_context=None,
             progress: bool = False) -> dict:
    """Win rate of ``policy`` against ``baseline`` under a preference ``oracle`` (:mod:`rewards.preference`).

    Each model draws ``num_samples`` completions per row (HF engine, the same per-completion random streams
    for both, so the comparison is paired and deterministic for a seed); the k-th sample of the policy is
    judged against the k-th of the baseline. Returns ``win_rate`` (mean P(policy ≻ baseline), ties ½),
    ``policy_length`` / ``baseline_length`` (mean completion tokens) and ``oracle_calls`` (pairs judged).
    ``baseline_context``: a context the baseline samples under (e.g. a LoRA model's ``disable_adapter()``);
    ``progress``: bars for the sampling and the oracle's judging (:mod:`align.progress`)."""
    from contextlib import nullcontext

    from align.progress import bar
    from align.rollout import HFEngine, SamplingParams

    rows = list(rows)
    prompts = prompt_token_ids(tokenizer, rows)
    sampling = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, seed=seed)
    outs = []
    with bar("win rate: sampling (policy, baseline)", 2 * num_samples * len(rows), "completions", show=progress):
        for model, ctx in ((policy, nullcontext()), (baseline, baseline_context or nullcontext())):
            with ctx:  # the HF engine ticks the bar per batch
                outs.append(HFEngine(model, tokenizer, batch_size).generate(prompts, [num_samples] * len(rows),
                                                                            sampling))
    texts = [tokenizer.batch_decode(o.completion_ids, skip_special_tokens=True) for o in outs]
    index = outs[0].prompt_index
    columns = {k: [rows[i][k] for i in index] for k in rows[0] if k not in ("prompt", "prompt_ids")} if rows else {}
    before = oracle.calls
    with bar(f"win rate: oracle {oracle.name!r}", len(index), "pairs", show=progress) as judging:
        p = oracle([rows[i]["prompt"] for i in index], texts[0], texts[1], columns)
        judging.finish()

    def mean_len(o):
        return sum(map(len, o.completion_ids)) / max(len(o), 1)

    return {"win_rate": float(p.mean()), "policy_length": mean_len(outs[0]), "baseline_length": mean_len(outs[1]),
            "oracle_calls": oracle.calls - before}


def cyclic_exploitability(policy, tokenizer, prompt_ids: Sequence[list[int]], samples: int = 16,
                          max_new_tokens: int = 32, seed: int = 99) -> dict:
    """Exploitability of ``policy`` under the cyclic oracle (:class:`rewards.preference.CyclicOracle`): per prompt,
    max over answer classes c of P(c ≻ π) − ½ from ``samples`` completions (0 at the Nash equilibrium, ⅓ a class;
    a best response beats c − 1, ties c and beats a completion with no answer), averaged over the prompts; with the
    policy's class shares (``share_None``: no answer)."""
    from align.rewards.preference import CyclicOracle
    from align.rollout import HFEngine, SamplingParams

    out = HFEngine(policy, tokenizer).generate(list(prompt_ids), [samples] * len(prompt_ids),
                                               SamplingParams(max_new_tokens=max_new_tokens, seed=seed))
    classes = CyclicOracle.classes(tokenizer.batch_decode(out.completion_ids, skip_special_tokens=True))
    shares = {c: 0.0 for c in (0, 1, 2, None)}
    exploit = 0.0
    for i in range(len(prompt_ids)):
        mine = classes[i * samples:(i + 1) * samples]
        q = {c: mine.count(c) / samples for c in shares}
        for c in shares:
            shares[c] += q[c] / len(prompt_ids)
        exploit += (max(q[(c - 1) % 3] + 0.5 * q[c] + q[None] for c in range(3)) - 0.5) / len(prompt_ids)
    return {"exploitability": exploit, **{f"share_{c}": v for c, v in shares.items()}}
