"""Benchmark: peak memory and throughput at Qwen2.5's vocabulary (151,936): align vs TRL, DPO and GRPO updates.

    python scripts/bench_memory.py [--vocab 151936] [--hidden 256] [--layers 2] [--tokens 1024] [--steps 4]
                                   [--batch 2] [--which dpo,grpo] [--compute-bound] [--ragged]
                                   [--tools trl,align,align-unchunked] [--json OUT]

The model is a config-built Llama (``--hidden``, ``--layers``, MLP 4 x hidden, untied head) with a
``--vocab``-token output head and random weights, saved once to a temp folder; the text side is the testbed
tokenizer (384 tokens), whose ids are all valid for the larger vocabulary. ``--compute-bound`` uses hidden
1,024 and 4 layers (~67M non-embedding parameters) to measure throughput where the body, not the head,
dominates.

Each (tool, update) runs in its own child process (so peak RSS is that run's own), one after the other, for each
of ``--tools``: ``trl`` (TRL 1.16), ``align`` (its defaults: ``logits_block_size: auto`` blocks through the head),
``align-unchunked`` (``logits_block_size=0``: the full ``[batch, tokens, vocab]`` logits, as before issue 18),
``align-padding-free`` (``padding_free=true``) and ``align-block-N`` (``logits_block_size=N``). All at identical
settings: fp32, bf16 off, no gradient checkpointing, learning rate and beta the same. ``--ragged``: completions of
different lengths (each drawn from ``--tokens``/4 .. ``--tokens``; DPO: the rejected ones), so batches pad.

* ``dpo``: ``trainer.train()`` of align's PreferenceTrainer / TRL's DPOTrainer, one pair a step
  (a 64-token prompt, chosen and rejected completions of ``--tokens`` tokens each), reference log-probs
  precomputed by both, one pair per forward of that pass (TRL ``precompute_ref_batch_size=1``, align
  ``max_tokens_per_micro_batch`` = one pair). tokens/s: non-padding tokens of both sequences of every pair
  over the wall time of building the trainer and ``train()`` (tokenisation and the reference pass included, for
  both: TRL runs its reference pass when the trainer is built, align at the start of ``train()``); s/step: the
  mean time of the steps after the first.
* ``grpo``: the update part only (TRL's GRPOTrainer cannot train without generating): ``--batch`` completions
  of ``--tokens`` tokens after 64-token prompts, random ids, advantages +-1, beta 0, ``dapo`` loss,
  old log-probs = the policy's own (ratio 1). Timed per step: the forward with per-token log-probs and
  entropies, the loss and ``backward()`` (no optimizer step) -- align's ``token_logps(with_entropy=True)``
  and ``policy_loss``, TRL's ``GRPOTrainer._compute_loss`` on the same tensors. tokens/s: prompt +
  completion tokens over the mean time of ``--steps`` updates after one untimed warm-up update.

Peak memory: ``torch.cuda.max_memory_allocated`` when CUDA is present, else the child's peak RSS (imports,
model, optimizer state and data included); ``base`` is the same reading just before the measured part (the
model loaded and the trainer built), so ``peak - base`` is what the updates themselves added. Ratios are
align/TRL; exits non-zero when any run fails.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import tempfile
import time

from _bench import peak_rss_mib, run_children, step_timer

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

PROMPT_TOKENS, BETA, LR = 64, 0.1, 1e-5
TOOLS = ("trl", "align", "align-unchunked")
ALIGN_TOOLS = ("align", "align-unchunked", "align-padding-free")  # and align-block-<N>
COMPUTE_BOUND = {"hidden": 1024, "layers": 4}


def build_model(folder: str, vocab: int, hidden: int, layers: int) -> int:
    """A random-weight Llama and the testbed tokenizer saved to ``folder``; returns the non-embedding parameters."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from align.testbed.build import ensure_testbed

    tokenizer = AutoTokenizer.from_pretrained(str(ensure_testbed(progress=False).policy))
    heads = max(1, hidden // 64)
    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=layers,
                         num_attention_heads=heads, num_key_value_heads=heads, max_position_embeddings=4096,
                         tie_word_embeddings=False, pad_token_id=tokenizer.pad_token_id,
                         eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    embedding = model.get_input_embeddings().weight.numel() + model.get_output_embeddings().weight.numel()
    return sum(p.numel() for p in model.parameters()) - embedding


def peak_memory_mib() -> float:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return peak_rss_mib()


def random_ids(rng: random.Random, tokenizer, n: int) -> list[int]:
    """``n`` ids of ordinary tokens (no special token) of ``tokenizer``."""
    special = set(tokenizer.all_special_ids)
    pool = [i for i in range(len(tokenizer)) if i not in special]
    return [rng.choice(pool) for _ in range(n)]


def lengths(rng: random.Random, n: int, tokens: int, ragged: bool) -> list[int]:
    """``n`` completion lengths: ``tokens`` each, or drawn from ``tokens // 4 .. tokens`` with ``ragged``."""
    return [rng.randint(tokens // 4, tokens) if ragged else tokens for _ in range(n)]


def align_options(tool: str) -> dict:
    """The config keys an align tool sets (its log-prob options; see the module docstring)."""
    if tool == "align-unchunked":
        return {"logits_block_size": 0}
    if tool == "align-padding-free":
        return {"padding_free": True}
    if tool.startswith("align-block-"):
        return {"logits_block_size": int(tool.removeprefix("align-block-"))}
    return {}


def preference_rows(tokenizer, pairs: int, tokens: int, ragged: bool = False):
    """``pairs`` rows of random text: a ~64-token prompt and ~``tokens``-token chosen and rejected completions (with
    ``ragged``, rejected ones of ``tokens // 4 .. tokens``)."""
    from datasets import Dataset

    rng = random.Random(0)
    text = lambda n: tokenizer.decode(random_ids(rng, tokenizer, n))  # noqa: E731
    rejected = lengths(random.Random(1), pairs, tokens, ragged)
    return Dataset.from_list([{"prompt": text(PROMPT_TOKENS), "chosen": text(tokens), "rejected": text(n)}
                              for n in rejected])


def dpo_child(tool: str, path: str, steps: int, tokens: int, ragged: bool = False) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from align.data.preference import tokenize_preferences

    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(path)
    rows = preference_rows(tokenizer, steps, tokens, ragged)
    max_length = PROMPT_TOKENS + tokens + 16
    tok = tokenize_preferences(rows, tokenizer, max_length)
    n_tokens = sum(2 * len(p) + len(c) + len(r) for p, c, r in zip(tok["prompt_ids"], tok["chosen_ids"],
                                                                     tok["rejected_ids"], strict=True))
    common = dict(output_dir=f"/tmp/align-bench-memory-{tool}-{os.getpid()}", max_steps=steps,
                  per_device_train_batch_size=1, per_device_eval_batch_size=1, learning_rate=LR, beta=BETA,
                  max_length=max_length, logging_steps=steps, save_strategy="no", report_to="none", disable_tqdm=True,
                  seed=0, lr_scheduler_type="constant", dataloader_pin_memory=False, bf16=False,
                  gradient_checkpointing=False, use_cpu=not torch.cuda.is_available())
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    timer = step_timer()
    t0 = time.perf_counter()
    if tool == "trl":
        from trl import DPOConfig, DPOTrainer

        config = DPOConfig(**common, precompute_ref_log_probs=True, precompute_ref_batch_size=1)
        trainer = DPOTrainer(model=model, args=config, train_dataset=rows, processing_class=tokenizer,
                             callbacks=[timer])
    else:
        from align.trainers import PreferenceConfig, PreferenceTrainer

        config = PreferenceConfig(**common, **align_options(tool), precompute_ref_logps=True,
                                  max_tokens_per_micro_batch=2 * max_length)
        trainer = PreferenceTrainer(model, config, rows, processing_class=tokenizer, callbacks=[timer])
    base = peak_memory_mib()
    trainer.train()
    wall = time.perf_counter() - t0
    s_per_step = (timer.times[-1] - timer.times[0]) / (len(timer.times) - 1) if len(timer.times) > 1 else wall
    return {"tokens_per_s": n_tokens / wall, "s_per_step": s_per_step, "wall_s": wall, "tokens": n_tokens,
            "base_mib": base}


def grpo_batch(tokenizer, batch: int, tokens: int, ragged: bool = False):
    """Prompts, completions (token id lists) and advantages (+-1) of one GRPO update."""
    rng = random.Random(0)
    prompts = [random_ids(rng, tokenizer, PROMPT_TOKENS) for _ in range(batch)]
    completions = [random_ids(rng, tokenizer, n) for n in lengths(random.Random(1), batch, tokens, ragged)]
    return prompts, completions, [1.0 if i % 2 == 0 else -1.0 for i in range(batch)]


def trl_update(model, tokenizer, batch: int, tokens: int, device, ragged: bool = False):
    """TRL's ``GRPOTrainer._compute_loss`` + backward on one batch, as a function of no arguments."""
    import torch
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    def zero_reward(completions, **kwargs):
        return [0.0] * len(completions)

    config = GRPOConfig(output_dir=f"/tmp/align-bench-memory-trl-{os.getpid()}", per_device_train_batch_size=batch,
                        num_generations=batch, max_completion_length=tokens, beta=0.0, loss_type="dapo",
                        epsilon=0.2, learning_rate=LR, bf16=False, gradient_checkpointing=False, report_to="none",
                        use_cpu=not torch.cuda.is_available(), disable_tqdm=True, dataloader_pin_memory=False)
    trainer = GRPOTrainer(model=model, reward_funcs=zero_reward, args=config,
                          train_dataset=Dataset.from_list([{"prompt": "1 + 1 ="}] * batch), processing_class=tokenizer)
    trainer.current_gradient_accumulation_steps = 1
    prompts, completions, adv = grpo_batch(tokenizer, batch, tokens, ragged)
    width = max(len(c) for c in completions)  # right-padded, as TRL's generation returns them
    mask = [[1] * len(c) + [0] * (width - len(c)) for c in completions]
    inputs = {"prompt_ids": torch.tensor(prompts, device=device),
              "prompt_mask": torch.ones(batch, PROMPT_TOKENS, dtype=torch.long, device=device),
              "completion_ids": torch.tensor([c + [tokenizer.pad_token_id] * (width - len(c)) for c in completions],
                                             device=device),
              "completion_mask": torch.tensor(mask, device=device),
              "advantages": torch.tensor(adv, device=device),
              "num_items_in_batch": torch.tensor(float(sum(map(sum, mask))), device=device)}
    trainer.model.train()
    return lambda: trainer._compute_loss(trainer.model, inputs).backward()


def align_update(model, tokenizer, batch: int, tokens: int, device, options: dict, ragged: bool = False):
    """align's per-token log-probs with entropies + ``policy_loss`` + backward, as a function of no arguments;
    ``options``: the tool's config keys (:func:`align_options`)."""
    import torch

    from align.logps import pack, token_logps
    from align.objectives.policy import policy_loss

    prompts, completions, adv = grpo_batch(tokenizer, batch, tokens, ragged)
    ids, attn, cmask, width = pack(prompts, completions, tokenizer.pad_token_id, device)
    advantages = torch.tensor(adv, device=device)
    kwargs = {"block_size": options.get("logits_block_size", "auto"), "padding_free": options.get("padding_free",
                                                                                                    False)}
    model.train()

    def update():
        logps, entropy = token_logps(model, ids, attn, width, with_entropy=True, **kwargs)
        loss, _ = policy_loss(logps, advantages, cmask, loss_type="dapo", epsilon=0.2, beta=0.0,
                              num_tokens=float(cmask.sum()))
        (entropy * cmask).sum() / cmask.sum()  # the logged entropy metric, as the trainer computes it
        loss.backward()

    return update


def grpo_child(tool: str, path: str, steps: int, tokens: int, batch: int, ragged: bool = False) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).to(device)
    if tool == "trl":
        update = trl_update(model, tokenizer, batch, tokens, device, ragged)
    else:
        update = align_update(model, tokenizer, batch, tokens, device, align_options(tool), ragged)
    base = peak_memory_mib()
    times = []
    for _ in range(steps + 1):  # the first (warm-up: allocation, first-call set-up) is not timed
        model.zero_grad(set_to_none=True)
        t0 = time.perf_counter()
        update()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    s_per_step = sum(times[1:]) / steps
    n_tokens = sum(PROMPT_TOKENS + len(c) for c in grpo_batch(tokenizer, batch, tokens, ragged)[1])
    return {"tokens_per_s": n_tokens / s_per_step, "s_per_step": s_per_step, "wall_s": sum(times), "tokens": n_tokens,
            "base_mib": base}


def child(tool: str, which: str, args) -> dict:
    if which == "dpo":
        r = dpo_child(tool, args.model_dir, args.steps, args.tokens, args.ragged)
    else:
        r = grpo_child(tool, args.model_dir, args.steps, args.tokens, args.batch, args.ragged)
    import torch

    return {**r, "tool": tool, "which": which, "peak_mib": peak_memory_mib(),
            "memory": "GPU allocated" if torch.cuda.is_available() else "RSS"}


def print_table(results: dict, which: list[str], header: str, tools=TOOLS) -> None:
    print(f"\n{header}")
    print(f"{'update':<6} {'tool':<16} {'base MiB':>9} {'peak MiB':>9} {'peak-base':>10} {'tokens/s':>9} {'s/step':>8} "
          f"{'peak/TRL':>9} {'tok/s/TRL':>10}")
    for w in which:
        t = results[("trl", w)]
        for tool in tools:
            r = results[(tool, w)]
            grown = r["peak_mib"] - r["base_mib"]
            print(f"{w:<6} {tool:<16} {r['base_mib']:>9.0f} {r['peak_mib']:>9.0f} {grown:>10.0f} "
                  f"{r['tokens_per_s']:>9.1f} {r['s_per_step']:>8.3f} {r['peak_mib'] / t['peak_mib']:>8.2f}x "
                  f"{r['tokens_per_s'] / t['tokens_per_s']:>9.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vocab", type=int, default=151936, help="output vocabulary of the model (Qwen2.5's)")
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=1024, help="tokens per completion")
    parser.add_argument("--steps", type=int, default=4, help="updates per run (DPO: pairs; GRPO: timed updates)")
    parser.add_argument("--batch", type=int, default=2, help="GRPO completions per update (even)")
    parser.add_argument("--which", default="dpo,grpo", help="comma-separated: dpo, grpo")
    parser.add_argument("--compute-bound", action="store_true",
                        help=f"hidden {COMPUTE_BOUND['hidden']}, {COMPUTE_BOUND['layers']} layers (overrides both)")
    parser.add_argument("--repeats", type=int, default=1,
                        help="rounds of runs, each round every tool once in turn; per (tool, update) the lowest peak "
                             "and the fastest steps are kept (the machine's load changes between runs)")
    parser.add_argument("--ragged", action="store_true", help="completions of different lengths (batches pad)")
    parser.add_argument("--tools", default=",".join(TOOLS),
                        help="comma-separated: trl (first, the ratios' base), align, align-unchunked, "
                             "align-padding-free, align-block-<N>")
    parser.add_argument("--json", metavar="OUT", help="also write the settings and results to this JSON file")
    parser.add_argument("--model-dir", help=argparse.SUPPRESS)
    parser.add_argument("--child", nargs=2, metavar=("TOOL", "WHICH"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    which = [w.strip() for w in args.which.split(",") if w.strip()]
    if not which or set(which) - {"dpo", "grpo"}:
        parser.error(f"--which: comma-separated dpo / grpo, got {args.which!r}")
    if args.batch < 2 or args.batch % 2:
        parser.error(f"--batch: an even number >= 2 (completions with advantages +1 and -1), got {args.batch}")
    if min(args.vocab, args.hidden, args.layers, args.tokens, args.steps) < 1:
        parser.error("--vocab, --hidden, --layers, --tokens and --steps must be >= 1")
    tools = [t.strip() for t in args.tools.split(",") if t.strip()]
    if not tools or tools[0] != "trl" or any(t not in ALIGN_TOOLS and not (t.startswith("align-block-") and
                                                                        t.removeprefix("align-block-").isdigit())
                                             for t in tools[1:]):
        parser.error(f"--tools: trl, then any of {', '.join(ALIGN_TOOLS)}, align-block-<N>; got {args.tools!r}")
    if args.compute_bound:
        args.hidden, args.layers = COMPUTE_BOUND["hidden"], COMPUTE_BOUND["layers"]
    if args.child:
        print("RESULT " + json.dumps(child(*args.child, args)), flush=True)
        return

    import torch

    with tempfile.TemporaryDirectory(prefix="align-bench-memory-") as folder:
        body = build_model(folder, args.vocab, args.hidden, args.layers)  # outside the measured children
        child_args = ["--model-dir", folder, "--tokens", str(args.tokens), "--steps", str(args.steps),
                      "--batch", str(args.batch), *(["--ragged"] if args.ragged else [])]
        results = {}
        for _ in range(args.repeats):  # interleaved: a load spike slows one run of each tool, not all of one tool
            for key, r in run_children(__file__, which, 1, child_args, better=None, tools=tools).items():
                old = results.get(key)
                results[key] = r if old is None else {
                    **r, **{k: min(r[k], old[k]) for k in ("peak_mib", "base_mib", "s_per_step")},
                    "tokens_per_s": max(r["tokens_per_s"], old["tokens_per_s"]), "runs": old.get("runs", 1) + 1}
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU, {os.cpu_count()} cores"
    memory = "peak GPU memory allocated" if torch.cuda.is_available() else "peak RSS"
    header = (f"Llama, vocab {args.vocab:,}, hidden {args.hidden}, {args.layers} layers "
              f"({body / 1e6:.1f}M non-embedding parameters), fp32; "
              f"{PROMPT_TOKENS} prompt + {'up to ' if args.ragged else ''}{args.tokens} completion tokens; "
              f"{args.steps} steps; "
              f"GRPO batch {args.batch}; {device}; memory = {memory}")
    print_table(results, which, header, tools)
    if args.json:
        from align.io import atomic_open

        settings = {k: getattr(args, k) for k in ("vocab", "hidden", "layers", "tokens", "steps", "batch", "ragged")}
        with atomic_open(args.json, "w") as f:
            json.dump({"settings": {**settings, "non_embedding_params": body, "device": device, "memory": memory},
                       "results": list(results.values())}, f, indent=1)


if __name__ == "__main__":
    main()
