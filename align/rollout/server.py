"""The rollout server: a vLLM engine in its own process (own GPUs or node), behind a small HTTP API.

    align serve --model <folder or Hub id> [--host 0.0.0.0 (needs a key)] [--port 8000] [--tensor-parallel-size N]

The HTTP layer (:mod:`align.rollout.serve_http`) demands the shared key (``--api-key`` or ``$ALIGN_SERVE_API_KEY``;
required off loopback), caps bodies, bounds reads and runs a fixed pool of worker threads.

Endpoints (JSON unless said otherwise):

* ``GET /health`` -> ``{"model", "max_model_len", "tensor_parallel_size", "dtype", "weights_version",
  "collective", "max_lora_rank", "limits"}``; answered without waiting for a generation in progress, so a
  trainer can tell a busy server from a dead one.
* ``POST /generate`` ``{"prompts", "rows", "seeds", "sampling", "eos_ids"}`` -> ``{"results": [[token
  ids, finish reason, log-probs], ...]}``: one completion per row, each with its own seed
  (:func:`align.rollout.vllm_engine.run_requests`, the same code the colocated engine runs).
* ``POST /weights`` (body: a safetensors file in memory, the policy's full weights under the plain
  model's names) -> ``{"weights_version"}``: loaded in place with vLLM's ``reload_weights``, prefix
  cache reset. HTTP carries the weights, so the same channel works between CPU processes, across
  nodes and on GPUs (where it is slower than NCCL; see docs/rollout.md).
* ``POST /collective/{join,update,alive,leave}``: the weight group of ``vllm_sync: collective`` (JSON control
  messages; the weights go by broadcast, :mod:`align.rollout.serve_collective`).
* ``POST /adapter`` (body: a LoRA adapter as safetensors, its config in the header; ``--max-lora-rank`` > 0) ->
  ``{"weights_version"}``: loaded into vLLM's LoRA path in place; generations use it until a full-weight push
  (:mod:`align.rollout.lora`).

While a generation or a weight load runs, the server writes a blank (JSON ignores leading whitespace) every
``HEARTBEAT_S`` (0.25) seconds before the JSON answer, so the trainer's timeout measures the server's silence, not
the length of the work: a slow generation is fine, a server that stops answering is not.

Why our own server instead of TRL's ``vllm_serve``: every wait on the trainer side is bounded (a plain socket
with a timeout; the weight group's collectives with ``vllm_timeout_s``), it runs on the CPU build of vLLM, and it keeps
the per-completion seeds of our protocol. One lock serialises the engine; ``/health`` does not take it.
"""

from __future__ import annotations

import ipaddress
import logging
import math
import os
import signal
import socket
import threading

from align.errors import ConfigError
from align.rollout.base import SamplingParams
from align.rollout.collective import offered_backends
from align.rollout.lora import AdapterSlot
from align.rollout.serve_collective import CollectiveHost
from align.rollout.serve_http import API_KEY_ENV, MB, GuardedHTTPServer, ServeLimits
from align.rollout.vllm_engine import run_requests, shutdown_llm, start_llm

logger = logging.getLogger(__name__)


class RolloutServer:
    def __init__(self, model: str, *, max_model_len: int = 2048, tensor_parallel_size: int = 1,
                 gpu_memory_utilization: float = 0.9, dtype: str = "auto", seed: int = 0, max_lora_rank: int = 0):
        self.llm = start_llm(model, max_model_len=max_model_len, dtype=dtype, tensor_parallel_size=tensor_parallel_size,
                             gpu_memory_utilization=gpu_memory_utilization, seed=seed, max_lora_rank=max_lora_rank,
                             worker_extension=True)
        self.lock = threading.Lock()
        self.collective = CollectiveHost(self.llm, self.lock, 1 + tensor_parallel_size, self.mark_broken)
        self.adapter = AdapterSlot(self.llm) if max_lora_rank else None
        self.broken = ""  # why the weights are a mix of two versions (a push that broke off), until a full push
        self.info = {"model": model, "max_model_len": max_model_len, "tensor_parallel_size": tensor_parallel_size,
                     "dtype": str(self.llm.llm_engine.model_config.dtype).removeprefix("torch."), "weights_version": 0,
                     "collective": offered_backends(), "max_lora_rank": max_lora_rank}

    def generate(self, request: dict) -> dict:
        sampling = SamplingParams(**request["sampling"])
        rows = [tuple(r) for r in request["rows"]]
        with self.lock:
            if self.broken:
                raise RuntimeError(f"the weights are incomplete, push them again: {self.broken}")
            lora = self.adapter.request if self.adapter is not None else None
            results = run_requests(self.llm, request["prompts"], rows, request["seeds"], sampling, request["eos_ids"],
                                   lora)
        return {"results": results}

    def load_weights(self, payload: bytes) -> dict:
        with self.lock:
            self.llm.collective_rpc("align_load_weights", args=(payload,))
            self.llm.reset_prefix_cache()
            if self.adapter is not None:
                self.adapter.drop()  # merged weights: generate without the adapter
            return self.pushed()

    def load_adapter(self, payload: bytes) -> dict:
        if self.adapter is None:
            raise ValueError("this server has no LoRA path (start align serve with --max-lora-rank)")
        with self.lock:
            self.adapter.load_payload(payload)
            return self.pushed()

    def control(self, path: str, request):
        """``/collective/*`` (:class:`align.rollout.serve_collective.CollectiveHost`); an update bumps the version."""
        answer = self.collective.handle(path, request)
        if isinstance(answer, dict):
            return answer

        def update() -> dict:
            done = answer()
            with self.lock:
                if self.adapter is not None:
                    self.adapter.drop()
                return {**done, **self.pushed()}

        return update

    def mark_broken(self, reason: str) -> None:
        """A push broke off part way: the engine holds a mix of two versions until a full push."""
        with self.lock:
            self.broken = reason

    def pushed(self) -> dict:
        """Called with the lock held after a push completed."""
        if self.adapter is None or self.adapter.request is None:  # a full push: every weight is new again
            self.broken = ""
        self.info["weights_version"] += 1
        if self.adapter is not None:  # adapter pushes that replaced the loaded one in memory (no file)
            self.info["adapter_in_memory"] = self.adapter.in_memory
        return {"weights_version": self.info["weights_version"]}

    def close(self) -> None:
        self.collective.close()
        if self.adapter is not None:
            self.adapter.close()
        shutdown_llm(self.llm)


def is_loopback(host: str) -> bool:
    """Whether ``host`` (an address or a name) is reachable only from this machine ("" and 0.0.0.0 are not)."""
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        pass
    try:
        found = socket.getaddrinfo(host, None) if host else []
    except OSError:
        return False
    return bool(found) and all(ipaddress.ip_address(info[4][0].split("%")[0]).is_loopback for info in found)


def serve_api_key(host: str, given: str | None) -> str | None:
    """The key the server demands: ``--api-key`` (``given``), else ``$ALIGN_SERVE_API_KEY``, else None, which only
    a loopback ``host`` may go without (one-line :class:`ConfigError` otherwise)."""
    key, where = (given, "--api-key") if given is not None else (os.environ.get(API_KEY_ENV) or None, API_KEY_ENV)
    if key is not None and not (key.isascii() and key.isprintable() and key and " " not in key):
        raise ConfigError(f"{where}: the key must be non-empty printable ASCII without spaces")
    if key is None and not is_loopback(host):
        raise ConfigError(f"--api-key: --host {host or '(every interface)'} is reachable from other machines, so a "
                          f"shared key is required: set {API_KEY_ENV} (or pass --api-key) here and the same "
                          f"{API_KEY_ENV} for the trainer")
    return key


def weights_cap_mb(model_path: str) -> float | None:
    """A ``/weights`` body cap for ``model_path``'s weights: room for every weight in float32, twice (a trainer
    sends tied weights under each name), plus 64 MiB; None when the weights are not in a local folder."""
    folder = model_path if os.path.isdir(model_path) else None
    if folder is None:
        try:
            from huggingface_hub import snapshot_download

            folder = snapshot_download(model_path, local_files_only=True, allow_patterns=["*.safetensors", "*.bin",
                                                                                           "*.pt", "*.json"])
        except Exception:  # not a Hub id, or not in the cache
            return None
    names = [n for n in sorted(os.listdir(folder)) if n.endswith((".safetensors", ".bin", ".pt"))]
    if not names:
        return None
    size = 0
    for name in names:
        path = os.path.join(folder, name)
        if name.endswith(".safetensors"):  # the header alone gives every tensor's element count
            from safetensors import safe_open

            with safe_open(path, "pt") as fh:
                size += sum(8 * math.prod(fh.get_slice(k).get_shape()) for k in fh.keys())
        else:  # a pickle: at least 2 bytes a weight on disk
            size += 4 * os.path.getsize(path)
    return size / MB + 64


def serve(model: str, host: str = "127.0.0.1", port: int = 8000, *, api_key: str | None = None,
          limits: dict | None = None, **engine_kwargs) -> None:
    """Check the key (:func:`serve_api_key`) and ``limits`` (:class:`ServeLimits` fields; ``max_body_mb`` None or
    absent: sized for the model by :func:`weights_cap_mb`), take the port (a port in use fails at once, not after
    the load), load the model, then answer requests until interrupted (requests that arrive during the load wait
    in the socket's backlog)."""
    api_key = serve_api_key(host, api_key)
    limits = dict(limits or {})
    if limits.get("max_body_mb") is None:
        limits["max_body_mb"] = weights_cap_mb(model)
        if limits["max_body_mb"] is None:
            raise ConfigError(f"--max-body-mb: cannot size the weights of {model!r} (no local weight files); pass "
                              "--max-body-mb")
    limits = ServeLimits(**limits)
    try:
        httpd = GuardedHTTPServer((host, port), limits, api_key)
    except OSError as err:
        raise ConfigError(f"--port: cannot listen on {host}:{port} ({err.strerror or err})") from None

    def stop(signum, frame):  # SIGTERM ends the server as Ctrl-C does: the engine's processes are shut down
        raise KeyboardInterrupt

    if threading.current_thread() is threading.main_thread():  # only the main thread may set a handler
        signal.signal(signal.SIGTERM, stop)
    try:
        httpd.engine = RolloutServer(model, **engine_kwargs)
        print(f"align serve: {model} ready on http://{host}:{httpd.server_address[1]} "
              f"(max_model_len {httpd.engine.info['max_model_len']}, "
              f"{'key required' if api_key else 'no key: loopback only'}, weights up to {limits.max_body_mb:g} MB)",
              flush=True)
        httpd.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        httpd.server_close()
        if httpd.engine is not None:
            httpd.engine.close()
