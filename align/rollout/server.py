"""The rollout server: a vLLM engine in its own process (own GPUs or node), behind a small HTTP API.

    align serve --model <folder or Hub id> [--host 0.0.0.0] [--port 8000] [--tensor-parallel-size N]

Endpoints (JSON unless said otherwise):

* ``GET /health`` -> ``{"model", "max_model_len", "tensor_parallel_size", "dtype", "weights_version"}``; answered
  without waiting for a generation in progress, so a trainer can tell a busy server from a dead one.
* ``POST /generate`` ``{"prompts", "rows", "seeds", "sampling", "eos_ids"}`` -> ``{"results": [[token
  ids, finish reason, log-probs], ...]}``: one completion per row, each with its own seed
  (:func:`align.rollout.vllm_engine.run_requests`, the same code the colocated engine runs).
* ``POST /weights`` (body: a safetensors file in memory, the policy's full weights under the plain
  model's names) -> ``{"weights_version"}``: loaded in place with vLLM's ``reload_weights``, prefix
  cache reset. HTTP carries the weights, so the same channel works between CPU processes, across
  nodes and on GPUs (where it is slower than NCCL; see docs/rollout.md).

While a generation or a weight load runs, the server writes a blank (JSON ignores leading whitespace) every
``HEARTBEAT_S`` seconds before the JSON answer, so the trainer's timeout measures the server's silence, not
the length of the work: a slow generation is fine, a server that stops answering is not.

Why our own server instead of TRL's ``vllm_serve``: every wait on the trainer side is a plain socket
with a timeout (no collective that can block forever), it runs on the CPU build of vLLM, and it keeps
the per-completion seeds of our protocol. One lock serialises the engine; ``/health`` does not take it.
"""

from __future__ import annotations

import json
import logging
import threading
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from align.errors import ConfigError
from align.rollout.base import SamplingParams
from align.rollout.vllm_engine import run_requests, start_llm

logger = logging.getLogger(__name__)
HEARTBEAT_S = 0.25


class RolloutServer:
    def __init__(self, model: str, *, max_model_len: int = 2048, tensor_parallel_size: int = 1,
                 gpu_memory_utilization: float = 0.9, dtype: str = "auto", seed: int = 0):
        self.llm = start_llm(model, max_model_len=max_model_len, dtype=dtype, tensor_parallel_size=tensor_parallel_size,
                             gpu_memory_utilization=gpu_memory_utilization, seed=seed)
        self.lock = threading.Lock()
        self.info = {"model": model, "max_model_len": max_model_len, "tensor_parallel_size": tensor_parallel_size,
                     "dtype": str(self.llm.llm_engine.model_config.dtype).removeprefix("torch."), "weights_version": 0}

    def generate(self, request: dict) -> dict:
        sampling = SamplingParams(**request["sampling"])
        rows = [tuple(r) for r in request["rows"]]
        with self.lock:
            results = run_requests(self.llm, request["prompts"], rows, request["seeds"], sampling, request["eos_ids"])
        return {"results": results}

    def load_weights(self, payload: bytes) -> dict:
        from safetensors.torch import load

        weights = load(payload)
        with self.lock:
            self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": iter(weights.items()),
                                                              "is_checkpoint_format": True})
            self.llm.reset_prefix_cache()
            self.info["weights_version"] += 1
        return {"weights_version": self.info["weights_version"]}


def _handler(server: RolloutServer):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, fmt, *args):  # requests are logged at debug level, not to stderr
            logger.debug(fmt, *args)

        def _reply(self, code: int, body: dict) -> None:
            data = json.dumps(body).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self):
            if self.path == "/health":
                self._reply(200, server.info)
            else:
                self._reply(404, {"error": f"no endpoint {self.path}"})

        def do_POST(self):
            body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
            work = {"/generate": lambda: server.generate(json.loads(body)),
                    "/weights": lambda: server.load_weights(body)}.get(self.path)
            if work is None:
                self._reply(404, {"error": f"no endpoint {self.path}"})
                return
            # headers now, then a blank every HEARTBEAT_S while the work runs, then the JSON (read to the close)
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Connection", "close")
            self.end_headers()
            self.close_connection = True
            with ThreadPoolExecutor(1) as pool:
                future = pool.submit(work)
                while not future.done():
                    try:
                        future.exception(timeout=HEARTBEAT_S)
                    except TimeoutError:
                        self.wfile.write(b" ")
                        self.wfile.flush()
            error = future.exception()
            if error is not None:  # the trainer gets the reason instead of a dropped connection
                logger.error("request %s failed: %r", self.path, error)
                result = {"error": f"{type(error).__name__}: {error}"}
            else:
                result = future.result()
            self.wfile.write(json.dumps(result).encode())

    return Handler


def serve(model: str, host: str = "127.0.0.1", port: int = 8000, **engine_kwargs) -> None:
    """Take the port (a port in use fails at once, not after the load), load the model, then answer requests
    until interrupted (requests that arrive during the load wait in the socket's backlog)."""
    try:
        httpd = ThreadingHTTPServer((host, port), BaseHTTPRequestHandler, bind_and_activate=True)
    except OSError as err:
        raise ConfigError(f"--port: cannot listen on {host}:{port} ({err.strerror or err})") from None
    server = RolloutServer(model, **engine_kwargs)
    httpd.RequestHandlerClass = _handler(server)
    print(f"align serve: {model} ready on http://{host}:{httpd.server_address[1]} "
          f"(max_model_len {server.info['max_model_len']})", flush=True)
    try:
        httpd.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        httpd.server_close()
