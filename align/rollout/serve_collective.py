"""``align serve``'s side of ``vllm_sync: collective``: one trainer at a time joins the server's vLLM workers in a
weight group (:mod:`align.rollout.collective`), set up and driven through HTTP control messages.

* ``POST /collective/join`` ``{"port", "backend", "timeout_s", "session", "trainer"}``: the server takes ``port``
  for the group's TCP store (a port it cannot bind is refused at once, naming it), starts its workers joining
  (ranks 1..tensor_parallel_size; they wait at most ``timeout_s`` for the trainer) and answers ``{"world",
  "rank": 0}``; the trainer then joins as rank 0. A server already bound to a live trainer refuses a second one.
* ``POST /collective/update`` ``{"session", "buckets"}``: the answer's headers go out first, then the workers
  receive the buckets the trainer broadcasts and load them in place (heartbeats meanwhile), then ``{"weights_version",
  "bytes"}``. A failed broadcast tears the group down and frees the server for another trainer.
* ``POST /collective/alive`` ``{"session"}``: the trainer's keep-alive (every few seconds while it is bound); a
  binding not renewed for ``2 x timeout_s`` is stale, and a new trainer's join replaces it (a trainer killed
  without leaving does not block the server forever).
* ``POST /collective/leave`` ``{"session"}``: workers leave, the store closes, the server is free.

The engine's lock serialises these with generations and HTTP weight pushes, so a push never overlaps a generation.
"""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor

from align.rollout.collective import BACKENDS
from align.rollout.serve_http import BadRequest

logger = logging.getLogger(__name__)


class CollectiveHost:
    """The weight group of one :class:`align.rollout.server.RolloutServer` (``llm``, its engine ``lock``);
    ``on_broken(reason)`` is called, before the group is torn down, when an update fails part way."""

    def __init__(self, llm, lock: threading.Lock, world: int, on_broken=None):
        self.llm, self.lock, self.world, self.on_broken = llm, lock, world, on_broken
        self.state = threading.Lock()  # guards the fields below; never held while waiting on the engine
        self.session: str | None = None
        self.trainer, self.since, self.seen, self.timeout_s = "", 0.0, 0.0, 0.0
        self.store: _Store | None = None
        self.joined: Future | None = None
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="align-serve-join")

    def handle(self, path: str, request: dict):
        """The answer to a control message (a dict), or for an update the work to run with heartbeats (a callable
        returning the answer); :class:`BadRequest` for a message turned down."""
        if not isinstance(request, dict):
            raise BadRequest("the body must be a JSON object")
        action = path.removeprefix("/collective/")
        if action == "join":
            return self.join(request)
        if not isinstance(request.get("session"), str):
            raise BadRequest("session: missing")
        if action == "alive":
            return self.alive(request["session"])
        if action == "update":  # checked now (a 400 before the trainer broadcasts), run with heartbeats
            session, buckets = request["session"], request.get("buckets")
            if not isinstance(buckets, list) or not all(isinstance(b, list) and b for b in buckets):
                raise BadRequest("buckets: must be a list of non-empty lists")
            with self.state:
                self._check(session)
            return lambda: self.update(session, buckets)
        if action == "leave":
            self.leave(request["session"])
            return {"left": True}
        raise BadRequest(f"no endpoint {path}")

    def join(self, request: dict) -> dict:
        port, backend, timeout_s = request.get("port"), request.get("backend"), request.get("timeout_s")
        session, trainer = request.get("session"), str(request.get("trainer", "?"))[:200]
        if not isinstance(port, int) or not 1024 <= port < 65536:
            raise BadRequest(f"port: must be in 1024..65535, got {port!r}")
        if backend not in BACKENDS:
            raise BadRequest(f"backend: must be one of {BACKENDS}, got {backend!r}")
        if not isinstance(timeout_s, int | float) or not 0 < timeout_s <= 86400:
            raise BadRequest(f"timeout_s: must be in (0, 86400], got {timeout_s!r}")
        if not isinstance(session, str) or not 8 <= len(session) <= 64 or not session.isalnum():
            raise BadRequest("session: must be 8..64 letters or digits")
        with self.state:
            if self.session is not None:
                if time.monotonic() - self.seen <= 2 * self.timeout_s:
                    raise BadRequest(f"already bound to trainer {self.trainer} over the collective since "
                                  f"{time.strftime('%H:%M:%S', time.localtime(self.since))}; one trainer per server: "
                                  "stop that run, or start another align serve")
                logger.warning("align serve: trainer %s stopped renewing its weight group; %s replaces it",
                               self.trainer, trainer)
                self._teardown()
            try:  # the store: the port is taken here, so a port in use is refused before training starts
                self.store = _Store(port, timeout_s)
            except Exception as err:  # torch raises DistNetworkError / RuntimeError with the OS reason
                raise BadRequest(f"cannot bind port {port} for the weight group: {str(err).splitlines()[0][:200]}") \
                    from None
            self.session, self.trainer, self.timeout_s = session, trainer, float(timeout_s)
            self.since, self.seen = time.time(), time.monotonic()
            args = ("127.0.0.1", port, self.world, backend, float(timeout_s), session)
            self.joined = self.pool.submit(self._join_workers, args)
        logger.info("align serve: trainer %s is joining the weight group on port %d (%s)", trainer, port, backend)
        return {"world": self.world, "rank": 0}

    def _join_workers(self, args) -> None:
        with self.lock:
            self.llm.collective_rpc("align_join", args=args)

    def _check(self, session: str) -> None:
        if session != self.session:
            raise BadRequest("this trainer is not bound to the server's weight group (it was torn down, or another "
                          "trainer replaced it); restart the run")
        self.seen = time.monotonic()

    def alive(self, session: str) -> dict:
        with self.state:
            self._check(session)
        return {"alive": True}

    def update(self, session: str, buckets: list) -> dict:
        with self.state:
            self._check(session)
            joined = self.joined
        try:
            joined.result(timeout=self.timeout_s)  # the workers' join: done once the trainer joined
            with self.lock:
                received = self.llm.collective_rpc("align_receive", args=(buckets,))[0]
                self.llm.reset_prefix_cache()
        except BaseException as err:
            if self.on_broken is not None:
                self.on_broken(f"a collective push broke off ({type(err).__name__}: {str(err).splitlines()[0][:150]})")
            with self.state:
                if self.session == session:
                    self._teardown()
            raise
        with self.state:
            self.seen = time.monotonic()
        return {"bytes": received}

    def leave(self, session: str) -> None:
        with self.state:
            if session == self.session:
                self._teardown()

    def _teardown(self) -> None:
        """Workers leave (bounded: a worker stuck in a collective fails within its group's timeout), the store
        closes, the server is free. Called with ``self.state`` held."""
        joined, self.joined, self.session = self.joined, None, None
        if joined is not None and not joined.done():
            joined.cancel()
        try:
            if self.lock.acquire(timeout=2 * self.timeout_s + 1):
                try:
                    self.llm.collective_rpc("align_leave")
                finally:
                    self.lock.release()
            else:
                logger.warning("align serve: the engine stayed busy; the weight group's workers leave on their own "
                               "timeout")
        except Exception as err:  # a worker that already left, or died
            logger.warning("align serve: leaving the weight group: %r", err)
        store, self.store = self.store, None
        if store is not None:
            store.close()

    def close(self) -> None:
        with self.state:
            if self.session is not None:
                self._teardown()
        self.pool.shutdown(wait=False, cancel_futures=True)


class _Store:
    """The group's TCP store, hosted by the server on ``port`` (every interface), closed with the group."""

    def __init__(self, port: int, timeout_s: float):
        from datetime import timedelta

        from torch.distributed import TCPStore

        self.store = TCPStore("0.0.0.0", port, world_size=None, is_master=True, timeout=timedelta(seconds=timeout_s),
                              wait_for_workers=False, use_libuv=True)

    def close(self) -> None:
        self.store = None  # the listening socket closes with the store object
