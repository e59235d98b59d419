"""The trainer's end of ``vllm_sync: collective`` (rank 0 of the weight group, :mod:`align.rollout.collective`).

:meth:`CollectiveSender.join` (before training, from :meth:`align.rollout.remote.ServerEngine.check`) asks the
server to open the group on ``vllm_group_port`` and joins it; what cannot work is a one-line ConfigError there: a
server that does not offer the channel, a port it cannot bind, a server already bound to another trainer, a group
that does not form within ``vllm_timeout_s``. :meth:`push` sends the plan of the push (names, dtypes, shapes in
buckets of at most ``vllm_bucket_mb``) as the body of ``POST /collective/update``; once the answer's headers are
in (the server has accepted it), it packs and broadcasts one bucket at a time, then reads the answer (the
server's heartbeats meanwhile). A broadcast that breaks off (the server died or stalled past ``vllm_timeout_s``)
ends the run with :class:`align.errors.ServerUnavailable` naming the server and the bucket, and the group
is torn down. While bound, a daemon thread renews the binding every few seconds (``POST /collective/alive``) so
the server can tell a live trainer from a dead one; :meth:`close` (every exit path: the trainer's close, an
error, interpreter exit) leaves the group.
"""

from __future__ import annotations

import atexit
import json
import os
import secrets
import socket
import threading

import torch

from align.errors import ConfigError, ServerUnavailable, TrainingError
from align.rollout.collective import InOrder, WeightGroup, default_backend, dtype_name, pack, plan, weight_shape
from align.rollout.vllm_engine import policy_weights, pushed_weights


class CollectiveSender:
    """Rank 0 of ``engine``'s (a :class:`align.rollout.remote.ServerEngine`) weight group on ``port``."""

    def __init__(self, engine, port: int, bucket_mb: float):
        self.engine, self.port, self.bucket_mb = engine, port, bucket_mb
        self.group: WeightGroup | None = None
        self.session = secrets.token_hex(8)
        self.stop = threading.Event()
        self.pushes = 0

    def join(self) -> None:
        engine = self.engine
        offered = engine.info.get("collective") or []
        if not offered:
            raise ConfigError(f"vllm_sync: collective: vllm-server {engine.url} does not offer the collective channel "
                              "(an align serve from before it); update the server or set vllm_sync: http")
        backend = default_backend() if default_backend() in offered else "gloo"
        if backend not in offered:
            raise ConfigError(f"vllm_sync: collective: vllm-server {engine.url} offers {offered}, not {backend}")
        request = {"port": self.port, "backend": backend, "timeout_s": engine.timeout_s, "session": self.session,
                   "trainer": f"{socket.gethostname()}:{os.getpid()}"}
        try:
            reply = engine.call("/collective/join", "joining the weight group", json.dumps(request).encode())
            self.group = WeightGroup(engine.host, self.port, reply["rank"], reply["world"], backend,
                                     engine.timeout_s, self.session)
        except TrainingError as err:
            self.close()
            key = "vllm_group_port" if "cannot bind port" in str(err) else "vllm_sync"
            raise ConfigError(f"{key}: collective: {err}") from None
        except Exception as err:  # the group did not form in time (torch's DistStoreError / RuntimeError)
            self.close()
            raise ConfigError(f"vllm_group_port: the weight group with vllm-server {engine.url} on port {self.port} "
                              f"did not form within vllm_timeout_s={engine.timeout_s:g}s "
                              f"({str(err).splitlines()[0][:200]}); is the port reachable from here?") from None
        threading.Thread(target=self.keep_alive, name="align-weight-group-alive", daemon=True).start()
        atexit.register(self.close)

    def keep_alive(self) -> None:
        every = max(0.5, min(5.0, self.engine.timeout_s / 4))
        body = json.dumps({"session": self.session}).encode()
        while not self.stop.wait(every):
            try:
                self.engine.call("/collective/alive", "the weight group's keep-alive", body)
            except TrainingError:  # the next push reports what is wrong, naming the stage
                pass

    def push(self, model, merge: bool = True) -> dict:
        """The policy's weights (a LoRA adapter merged in; ``merge=False``: its base weights) to every worker; the
        server's answer."""
        if self.group is None:
            raise TrainingError(f"vllm-server {self.engine.url}: the weight group is closed (an earlier push failed)")
        with pushed_weights(model, merge) as weights:  # each whole weight made when pack reaches it
            specs = [(n, dtype_name(t.dtype), weight_shape(t)) for n, t in policy_weights(model)]
            buckets = plan(specs, self.bucket_mb)
            body = json.dumps({"session": self.session, "buckets": buckets}).encode()
            try:
                reply = self.engine.call("/collective/update", f"the weight update ({len(buckets)} buckets)", body,
                                         during=lambda: self.broadcast(buckets, InOrder(weights)))
            except BaseException:
                self.close()
                raise
        self.pushes += 1
        return reply

    def broadcast(self, buckets, tensors) -> None:
        """Pack and send each bucket in turn: bucket k+1 is packed while bucket k is on the wire (at most two buckets
        held)."""
        device = self.group.device
        pending, at = None, 0  # at: the bucket (from 1) being packed or waited on
        try:
            for k, bucket in enumerate(buckets):
                at = k + 1
                flat = pack(bucket, tensors, device)
                if pending is not None:
                    at = k
                    pending.wait()
                pending = self.group.start(flat)
                del flat
            if pending is not None:
                at = len(buckets)
                pending.wait()
        except Exception as err:
            raise ServerUnavailable(f"vllm-server {self.engine.url}: the weight broadcast broke off at bucket "
                                    f"{at} of {len(buckets)} (the server died, or stalled past vllm_timeout_s="
                                    f"{self.engine.timeout_s:g}s): {str(err).splitlines()[0][:200]}") from None
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def close(self) -> None:
        """Leave the group (both sides); safe to call twice and after a failure."""
        self.stop.set()
        group, self.group = self.group, None
        if group is not None:
            group.close()
        try:  # best effort: a dead server frees itself when the binding goes stale
            self.engine.call("/collective/leave", "leaving the weight group",
                             json.dumps({"session": self.session}).encode(), timeout_s=min(5.0, self.engine.timeout_s))
        except TrainingError:
            pass
        atexit.unregister(self.close)
