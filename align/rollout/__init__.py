"""Rollout engines behind one protocol: ``generate(prompts, n_per_prompt, sampling) -> Rollouts``.

``rollout: hf`` (:class:`HFEngine`, the training model's own ``generate``), ``vllm`` (a colocated
``vllm.LLM``, :mod:`align.rollout.vllm_engine`) or ``vllm-server`` (``align serve`` in another process,
:mod:`align.rollout.server` / :mod:`align.rollout.remote`); :func:`build_engine` is the one place that
picks and builds one, :class:`~align.rollout.args.RolloutArguments` the one place its options are defined and
:class:`~align.rollout.sync.WeightSync` the one rule for when weights are pushed. Used by the RL trainer, the
online preference trainers and the iterative driver.
"""

from align.rollout.base import RolloutEngine, Rollouts, SamplingParams, sample_seed
from align.rollout.hf import HFEngine
from align.rollout.sync import WeightSync


def build_engine(args, model, tokenizer, *, is_main: bool = True, max_len: int | None = None):
    """The engine ``args.rollout`` names, checked before training (health check, lengths, devices). ``max_len``:
    the longest prompt + completion it must hold (default ``max_prompt_length`` + the longer of
    ``max_completion_length`` and ``eval_max_new_tokens``); a too-long one names ``max_completion_length``."""
    from align.precision import compute_dtype  # bf16 compute over fp32 master weights: the engine holds bf16

    if args.rollout == "hf":
        return HFEngine(model, tokenizer, args.generation_batch_size)
    if max_len is None:
        max_len = args.max_prompt_length + max(args.max_completion_length,
                                               getattr(args, "eval_max_new_tokens", 0) or 0)
    if args.rollout == "vllm":
        from align.rollout.lora import engine_rank
        from align.rollout.vllm_engine import VLLMEngine

        lora_rank = engine_rank(args.lora_r) if getattr(args, "use_peft", False) and args.vllm_lora_adapter else 0
        return VLLMEngine(model, tokenizer, max_model_len=max_len, tensor_parallel_size=args.vllm_tensor_parallel_size,
                          gpu_memory_utilization=args.vllm_gpu_memory_utilization,
                          enable_sleep_mode=args.vllm_enable_sleep_mode, seed=args.seed, dtype=compute_dtype(args),
                          lora_rank=lora_rank)
    from align.rollout.remote import ServerEngine

    engine = ServerEngine.for_policy(model, tokenizer, args.vllm_server_host, args.vllm_server_port,
                                     args.vllm_timeout_s, push_weights=is_main,
                                     request_timeout_s=args.vllm_request_timeout_s, dtype=compute_dtype(args),
                                     sync=args.vllm_sync, group_port=args.vllm_group_port,
                                     bucket_mb=args.vllm_bucket_mb, lora_adapter=args.vllm_lora_adapter)
    engine.check(max_len, model)
    return engine


__all__ = ["HFEngine", "RolloutEngine", "Rollouts", "SamplingParams", "WeightSync", "build_engine", "sample_seed"]
