"""``rollout: vllm-server``: the trainer's side of :mod:`align.rollout.server`.

Every wait is bounded: each request runs with ``timeout_s`` on its socket (connect, send, each read; the
server sends a heartbeat every 0.25 s while it works, so this bounds its silence, not the length of a
generation), and the whole request with ``request_timeout_s`` (checked between reads, so a server that keeps
sending heartbeats but never its answer is given up on too), so a server that is down, dies mid-run, stops
answering or never finishes ends the run with a :class:`ServerUnavailable` naming the server, what was being
waited for and the option, instead of hanging. Before training, :meth:`check`
(the health check) turns the same failures, and a server whose ``max_model_len`` is too short, into a
one-line :class:`ConfigError`.

With several trainer processes, every process sends its own groups to the server (the server serialises
them; completions depend only on their seeds) and only the main process pushes weights; the trainer
puts a barrier between the push and the next generation (see :class:`align.rollout.sync.WeightSync`).

Weights go as one HTTP body (``vllm_sync: http``) or, with ``vllm_sync: collective``, by broadcast in a process group
with the server's workers (:class:`align.rollout.sender.CollectiveSender`, joined in :meth:`ServerEngine.check`);
a LoRA policy sends only its adapter where the server has a LoRA path (:mod:`align.rollout.lora`).

Every request carries ``Authorization: Bearer $ALIGN_SERVE_API_KEY`` when that variable is set (the key is read
from the environment only, so it never lands in a saved config); a 401 is a one-line :class:`ConfigError` naming
the variable. A body larger than the server's cap (sent with /health) is refused here, naming the server option.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
import urllib.error
import urllib.request

from align.errors import ConfigError, ServerUnavailable, TrainingError
from align.rollout.base import Rollouts, SamplingParams, eos_token_ids
from align.rollout.collective import full_weight, has_shards
from align.rollout.lora import adapter_config, adapter_params, adapter_payload, check_adapter, has_adapter
from align.rollout.sender import CollectiveSender
from align.rollout.serve_http import API_KEY_ENV, BODY_CAPS, MB
from align.rollout.vllm_engine import pushed_weights, request_rows, to_rollouts
from align.timeouts import REQUEST_TIMEOUT_S

logger = logging.getLogger(__name__)


class ServerEngine:
    """:class:`align.rollout.base.RolloutEngine` talking to ``align serve`` at ``host:port``."""

    def __init__(self, host: str, port: int, *, eos_ids: list[int], timeout_s: float = 300.0,
                 push_weights: bool = True, dtype: str | None = None,
                 request_timeout_s: float = REQUEST_TIMEOUT_S, sync: str = "http", group_port: int = 51216,
                 bucket_mb: float = 128.0, lora_adapter: bool = True):
        self.host, self.url = host, f"http://{host}:{port}"
        self.sync, self.lora_adapter = sync, lora_adapter
        self.sender = CollectiveSender(self, group_port, bucket_mb) if sync == "collective" and push_weights else None
        self.adapter = False  # whether pushes send the LoRA adapter alone (decided by check)
        self.dtype = dtype
        self.eos_ids = list(eos_ids)
        self.timeout_s = timeout_s
        self.request_timeout_s = request_timeout_s
        self.push_weights = push_weights
        self.info: dict = {}
        key = os.environ.get(API_KEY_ENV)  # the server's shared key; from the environment only, never a config file
        self.auth = {"Authorization": f"Bearer {key}"} if key else {}

    @classmethod
    def for_policy(cls, model, tokenizer, host: str, port: int, timeout_s: float, push_weights: bool,
                   request_timeout_s: float = REQUEST_TIMEOUT_S, dtype: str | None = None, **channel) -> ServerEngine:
        """``channel``: ``sync``, ``group_port``, ``bucket_mb``, ``lora_adapter`` (the ``vllm_*`` options)."""
        dtype = dtype or str(next(model.parameters()).dtype).removeprefix("torch.")  # the compute dtype, if given
        return cls(host, port, eos_ids=eos_token_ids(model, tokenizer), timeout_s=timeout_s, push_weights=push_weights,
                   dtype=dtype, request_timeout_s=request_timeout_s, **channel)

    def call(self, path: str, what: str, body: bytes | None = None, content_type: str = "application/json",
             during=None, timeout_s: float | None = None) -> dict:
        """One request, bounded (module notes); ``during()`` runs once the answer's headers are in, before its body
        is read (the collective's broadcast); ``timeout_s``: a shorter bound than ``vllm_timeout_s``."""
        req = urllib.request.Request(self.url + path, data=body, method="POST" if body is not None else "GET",
                                     headers={"Content-Type": content_type, **self.auth})
        limit = self.info.get("limits", {}).get(BODY_CAPS.get(path, ""))  # known after the health check
        if body is not None and limit is not None and len(body) > limit * MB:
            raise TrainingError(f"vllm-server {self.url}: {what} is {len(body) / MB:.3g} MB, more than the server "
                                f"takes (align serve --{BODY_CAPS[path].replace('_', '-')} {limit:g})")
        try:
            deadline = time.monotonic() + self.request_timeout_s
            with urllib.request.urlopen(req, timeout=timeout_s or self.timeout_s) as resp:
                if during is not None:
                    during()
                reply = json.loads(self._read(resp, what, deadline))
        except urllib.error.HTTPError as err:
            if err.code == 401:
                raise ConfigError(f"{API_KEY_ENV}: vllm-server {self.url} refused {what} (HTTP 401): "
                                  f"{'the key is wrong' if self.auth else 'it needs a key'}; set {API_KEY_ENV} to "
                                  "the key align serve was started with") from None
            detail = err.read().decode(errors="replace")
            try:
                detail = json.loads(detail)["error"]
            except (ValueError, KeyError, TypeError):
                pass
            detail = detail[:300]
            raise TrainingError(f"vllm-server {self.url}: {what} failed with HTTP {err.code}: {detail}") from None
        except TimeoutError:
            raise ServerUnavailable(f"vllm-server {self.url}: no answer within vllm_timeout_s={self.timeout_s:g}s "
                                    f"while waiting for {what}") from None
        except (urllib.error.URLError, ConnectionError, OSError) as err:
            reason = getattr(err, "reason", err)
            if isinstance(reason, TimeoutError | socket.timeout):
                raise ServerUnavailable(f"vllm-server {self.url}: no answer within vllm_timeout_s="
                                        f"{self.timeout_s:g}s while waiting for {what}") from None
            raise ServerUnavailable(f"vllm-server {self.url}: not reachable ({reason}) while waiting for "
                                    f"{what}") from None
        except json.JSONDecodeError as err:  # the connection closed before the answer was complete
            raise ServerUnavailable(f"vllm-server {self.url}: the answer broke off ({err}) while waiting for "
                                    f"{what}") from None
        if "error" in reply:
            raise TrainingError(f"vllm-server {self.url}: {what} failed on the server: {reply['error'][:300]}")
        return reply

    def _read(self, resp, what: str, deadline: float) -> bytes:
        """The answer's body: blanks (heartbeats) while the server works, then the JSON; read as it comes, so the
        request's deadline is checked at every heartbeat (each read still waits at most ``timeout_s``)."""
        body = bytearray()
        while chunk := resp.read1(65536):
            body += chunk
            if time.monotonic() > deadline:
                raise ServerUnavailable(f"vllm-server {self.url}: {what} took longer than vllm_request_timeout_s="
                                        f"{self.request_timeout_s:g}s (the server kept sending heartbeats without "
                                        "an answer); raise vllm_request_timeout_s for longer work, or restart the "
                                        "server")
        return bytes(body)

    def check(self, max_model_len: int, model=None) -> dict:
        """The health check before training: the server answers and can hold prompt + completion; where this
        process pushes, the weight channel is opened (``vllm_sync: collective``) and a LoRA ``model``'s adapter is
        loaded once (what the server cannot load stops the run here, in one line)."""
        try:
            self.info = self.call("/health", "the health check")
        except TrainingError as err:
            raise ConfigError(f"vllm_server_host/vllm_server_port: {err} (start one with: align serve --model "
                              "<model> --port <port>)") from None
        if self.info.get("max_model_len", 0) < max_model_len:
            raise ConfigError(f"max_completion_length: max_prompt_length + max_completion_length = {max_model_len} is "
                              f"more than the server's max_model_len {self.info.get('max_model_len')} ({self.url})")
        if self.dtype and self.info.get("dtype") not in (None, self.dtype):
            logger.warning("vllm-server %s holds the weights in %s, the policy trains in %s: expect a larger "
                           "rollout/logp_gap (truncated importance sampling, vllm_is_cap, corrects for it)", self.url,
                           self.info["dtype"], self.dtype)
        if self.sender is not None:
            self.sender.join()
        if model is not None and has_adapter(model) and self.lora_adapter:
            self.check_adapter(model)
        return self.info

    def check_adapter(self, model) -> None:
        """A LoRA policy: the adapter alone is pushed where the server has a LoRA path, else the merged weights (not
        from a sharded policy's shards: one line). The main process pushes the base weights once and checks the
        adapter loads; the others take part in the gathers of a sharded policy."""
        rank = self.info.get("max_lora_rank") or 0
        if not rank:
            if self.push_weights:
                logger.warning("vllm-server %s has no LoRA path (align serve --max-lora-rank): every push sends the "
                               "merged weights, not the adapter alone", self.url)
            return
        if not self.push_weights:  # the main process's base push and adapter push below, weight by weight
            self.take_part(model, merge=False)
            self.take_part(model, adapter=True)
            self.adapter = True
            return
        check_adapter(adapter_config(model), rank, f"vllm-server {self.url}")
        self.push_full(model, merge=False)  # the server's base must be the policy's (another run may have pushed)
        try:
            self.push_adapter(model)
        except TrainingError as err:
            self.close()
            key = "lora_target_modules" if "target modules" in str(err) else "use_peft"
            raise ConfigError(f"{key}: {err}; set vllm_lora_adapter: false to push the merged weights") from None
        self.adapter = True

    def push_adapter(self, model) -> None:
        reply = self.call("/adapter", "the adapter update", adapter_payload(model), "application/octet-stream")
        self.info["weights_version"] = reply["weights_version"]

    def generate(self, prompts, n_per_prompt, sampling: SamplingParams, keys=None) -> Rollouts:
        rows, seeds = request_rows(prompts, n_per_prompt, sampling, keys)
        if not rows:
            return Rollouts()
        request = {"prompts": [list(p) for p in prompts], "rows": rows, "seeds": seeds, "eos_ids": self.eos_ids,
                   "sampling": {"max_new_tokens": sampling.max_new_tokens, "temperature": sampling.temperature,
                                "top_p": sampling.top_p, "top_k": sampling.top_k, "seed": sampling.seed}}
        reply = self.call("/generate", f"{len(rows)} completions", json.dumps(request).encode())
        return to_rollouts(prompts, rows, [tuple(r) for r in reply["results"]])

    def sync_weights(self, model) -> None:
        """Send the policy's weights to the server, only where ``push_weights``: a LoRA adapter alone where the
        server loads it (:meth:`check`), else the whole weights (an adapter merged in) over the collective
        (:class:`align.rollout.sender.CollectiveSender`) or as one HTTP body."""
        if not self.push_weights:
            return self.take_part(model, adapter=self.adapter)
        if self.adapter:
            return self.push_adapter(model)
        self.push_full(model)

    @staticmethod
    def take_part(model, adapter: bool = False, merge: bool = True) -> None:
        """In a process that does not push: a sharded policy's part in the main process's gathers of what it pushes
        (``adapter``: the LoRA factors; else :func:`pushed_weights` with ``merge``), one at a time in the same
        order; nothing for a whole policy (a LoRA one is not merged here: merging and unmerging is not exact)."""
        if not has_shards(model):
            return
        if adapter:
            for tensor in adapter_params(model).values():
                full_weight(tensor)
            return
        with pushed_weights(model, merge) as weights:
            for _ in weights:
                pass

    def push_full(self, model, merge: bool = True) -> None:
        """Every weight (a LoRA adapter merged in; ``merge=False``: its base weights) over this engine's channel."""
        if self.sender is not None:
            self.info["weights_version"] = self.sender.push(model, merge)["weights_version"]
            return
        from safetensors.torch import save

        with pushed_weights(model, merge) as weights:
            payload = save({name: t.cpu().clone() for name, t in weights})  # clone: untie
        self.info["weights_version"] = self.call("/weights", "the weight update", payload,
                                                  "application/octet-stream")["weights_version"]

    def close(self) -> None:
        if self.sender is not None:
            self.sender.close()
