"""The HTTP side of ``align serve``, locked down: a shared key, body caps, read deadlines, a fixed worker pool.

What a client that reaches the port can and cannot do:

* **Key.** When the server has a key (``--api-key`` or ``ALIGN_SERVE_API_KEY``), every endpoint, ``/health``
  included, needs ``Authorization: Bearer <key>`` (compared with :func:`hmac.compare_digest`); otherwise 401 and
  nothing is read past the headers. ``/health`` needs it too because it names the model and the weights version,
  and so the trainer's health check proves its key before training starts.
* **Bodies.** ``Content-Length`` is required (411 without it or with ``Transfer-Encoding``; 400 when it is not a
  non-negative integer) and capped before a byte of the body is read (413): ``/weights`` at ``max_body_mb``,
  ``/generate`` at ``max_request_mb``. A body is read in 1 MiB pieces, so a lie about the length costs nothing.
* **Time.** The request line and headers must arrive within ``read_timeout_s`` in all (a client dripping a byte
  at a time is dropped too); the body (sent only after the key is checked) and every write may not stall for
  longer than ``read_timeout_s``. Every connection is closed after its answer (no idle keep-alive).
* **Threads.** ``workers`` threads answer requests (each running request adds one thread for the work while it
  sends heartbeats); up to ``queue`` more connections wait for a worker; beyond that a connection gets 503 at
  once and is closed. Half-open connections cannot make threads.
* **/generate** is checked before the engine sees it (:func:`check_generate`): a 400 names the field.

Error answers are JSON ``{"error": "..."}`` naming the option or field; the engine is anything with ``info``,
``generate(request) -> dict``, ``load_weights(payload) -> dict``, ``load_adapter(payload) -> dict`` and
``control(path, request)`` for the :data:`CONTROL` paths (a dict answered at once, or work run with heartbeats; a
:class:`BadRequest` is a 400) (:class:`align.rollout.server.RolloutServer`).
"""

from __future__ import annotations

import hmac
import io
import json
import logging
import math
import queue
import re
import socket
import sys
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, fields
from http.server import BaseHTTPRequestHandler, HTTPServer

from align.errors import ConfigError
from align.rollout.base import SamplingParams

logger = logging.getLogger(__name__)
API_KEY_ENV = "ALIGN_SERVE_API_KEY"
HEARTBEAT_S = 0.25
MB = 1 << 20
CHUNK = MB
CONTROL = ("/collective/join", "/collective/update", "/collective/alive", "/collective/leave")
BODY_CAPS = {"/weights": "max_body_mb", "/adapter": "max_body_mb", "/generate": "max_request_mb",
             **{path: "max_request_mb" for path in CONTROL}}  # each POST endpoint's ServeLimits cap


@dataclass(frozen=True)
class ServeLimits:
    """What one request may ask for; each field is the ``align serve`` option ``--<field with dashes>``."""

    max_body_mb: float = 4096.0  # POST /weights (align serve sizes it for the model)
    max_request_mb: float = 16.0  # POST /generate
    max_completions: int = 16384  # rows of one /generate, and prompts of one /generate
    max_n: int = 1024  # completions of one prompt in one /generate
    read_timeout_s: float = 30.0
    workers: int = 32
    queue: int = 64

    def __post_init__(self):
        check_limits(asdict(self))

    def public(self) -> dict:
        """The limits a client may need (sent with /health)."""
        return {k: v for k, v in asdict(self).items() if k not in ("workers", "queue")}


def check_limits(values: dict) -> None:
    """Each given :class:`ServeLimits` value is a positive finite number (ConfigError naming the option)."""
    for name, value in values.items():
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value <= 0:
            raise ConfigError(f"--{name.replace('_', '-')}: must be a positive number, got {value!r}")


class BadRequest(ValueError):
    """A request the server refuses (400); the message names the field or says why."""


def _int_list(value, name: str, *, min_len: int = 0, max_len: int | None = None, low: int = 0,
              high: int = 2**63) -> list[int]:
    if not isinstance(value, list):
        raise BadRequest(f"{name}: must be a list, got {type(value).__name__}")
    if len(value) < min_len or (max_len is not None and len(value) > max_len):
        raise BadRequest(f"{name}: {len(value)} entries, must be {min_len}..{max_len}")
    for v in value:
        if isinstance(v, bool) or not isinstance(v, int) or not low <= v < high:
            raise BadRequest(f"{name}: entries must be integers in [{low}, {high}), got {v!r}")
    return value


def check_generate(request, max_model_len: int, limits: ServeLimits) -> None:
    """Refuse a /generate body that is malformed or asks for more than ``limits`` allow (:class:`BadRequest`)."""
    if not isinstance(request, dict):
        raise BadRequest(f"the body must be a JSON object, got {type(request).__name__}")
    expected = ("prompts", "rows", "seeds", "sampling", "eos_ids")
    for key in expected:
        if key not in request:
            raise BadRequest(f"{key}: missing")
    for key in request:
        if key not in expected:
            raise BadRequest(f"{key}: unknown field (expected {', '.join(expected)})")
    prompts, rows, sampling = request["prompts"], request["rows"], request["sampling"]
    if not isinstance(prompts, list) or len(prompts) > limits.max_completions:
        raise BadRequest(f"prompts: must be a list of at most {limits.max_completions} prompts (--max-completions), "
                         f"got {len(prompts) if isinstance(prompts, list) else type(prompts).__name__}")
    for i, prompt in enumerate(prompts):
        _int_list(prompt, f"prompts[{i}]", min_len=1, max_len=max_model_len - 1)
    if not isinstance(rows, list) or len(rows) > limits.max_completions:
        raise BadRequest(f"rows: must be a list of at most {limits.max_completions} completions (--max-completions), "
                         f"got {len(rows) if isinstance(rows, list) else type(rows).__name__}")
    for j, row in enumerate(rows):
        _int_list(row, f"rows[{j}]", min_len=2, max_len=2)
        if row[0] >= len(prompts):
            raise BadRequest(f"rows[{j}]: prompt index {row[0]} but the request has {len(prompts)} prompts")
    for i, n in Counter(row[0] for row in rows).items():
        if n > limits.max_n:
            raise BadRequest(f"rows: prompt {i} asks for {n} completions, more than {limits.max_n} (--max-n)")
    _int_list(request["seeds"], "seeds", min_len=len(rows), max_len=len(rows))
    _int_list(request["eos_ids"], "eos_ids", max_len=64, high=2**31)
    if not isinstance(sampling, dict):
        raise BadRequest(f"sampling: must be an object, got {type(sampling).__name__}")
    known = {f.name: f.type for f in fields(SamplingParams)}
    for key, value in sampling.items():
        if key not in known:
            raise BadRequest(f"sampling.{key}: unknown field (expected {', '.join(known)})")
        integral = known[key] in (int, "int")
        wanted = "an integer" if integral else "a finite number"
        if isinstance(value, bool) or not isinstance(value, int if integral else int | float) or \
                not math.isfinite(value):
            raise BadRequest(f"sampling.{key}: must be {wanted}, got {value!r}")
    try:
        params = SamplingParams(**sampling)
    except ValueError as err:
        raise BadRequest(f"sampling.{err}") from None
    if params.max_new_tokens >= max_model_len:
        raise BadRequest(f"sampling.max_new_tokens: {params.max_new_tokens} is not below the server's max_model_len "
                         f"{max_model_len}")


class DeadlineReader(io.RawIOBase):
    """A socket's reading side: no recv waits longer than ``idle_s``, and none goes past ``deadline`` (a
    ``time.monotonic()`` value, or None: no deadline); either raises :class:`TimeoutError`."""

    def __init__(self, sock: socket.socket, idle_s: float, deadline: float | None):
        self.sock, self.idle_s, self.deadline = sock, idle_s, deadline

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        wait = self.idle_s
        if self.deadline is not None:
            wait = min(wait, self.deadline - time.monotonic())
            if wait <= 0:
                raise TimeoutError("the request line and headers did not arrive in time")
        self.sock.settimeout(wait)
        return self.sock.recv_into(buffer)


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: GuardedHTTPServer

    def setup(self):
        super().setup()
        limits = self.server.limits
        self.rfile.close()
        self.reader = DeadlineReader(self.connection, limits.read_timeout_s,
                                     time.monotonic() + limits.read_timeout_s)
        self.rfile = io.BufferedReader(self.reader)
        self.connection.settimeout(limits.read_timeout_s)  # writes; reads set their own

    def log_message(self, fmt, *args):  # requests are logged at debug level, not to stderr
        logger.debug(fmt, *args)

    def reply(self, code: int, body: dict, extra: dict | None = None) -> None:
        data = json.dumps(body).encode()
        self.send_response(code)
        for key, value in {"Content-Type": "application/json", "Content-Length": str(len(data)),
                           "Connection": "close", **(extra or {})}.items():
            self.send_header(key, value)
        self.end_headers()
        self.close_connection = True
        self.wfile.write(data)

    def authorized(self) -> bool:
        key = self.server.api_key
        if key is None:
            return True
        scheme, _, token = self.headers.get("Authorization", "").strip().partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), key.encode())

    def refusal(self) -> tuple[int, str] | None:
        """Why the request is refused before its body is read (status, message), or None."""
        if not self.authorized():
            return 401, (f"unauthorized: send the header 'Authorization: Bearer <key>' with the key align serve was "
                         f"started with (--api-key or {API_KEY_ENV}); the trainer reads it from {API_KEY_ENV}")
        if self.command != "POST":
            return None
        if self.path not in BODY_CAPS:
            return 404, f"no endpoint {self.path}"
        cap = BODY_CAPS[self.path], getattr(self.server.limits, BODY_CAPS[self.path])
        if "Transfer-Encoding" in self.headers:
            return 411, "Transfer-Encoding is not accepted: send the body with a Content-Length"
        given = self.headers.get_all("Content-Length") or []
        if not given:
            return 411, "Content-Length: required"
        if len(set(given)) > 1 or not re.fullmatch(r"[0-9]{1,19}", given[0].strip()):
            return 400, f"Content-Length: must be one non-negative integer, got {', '.join(given)[:40]!r}"
        self.length = int(given[0])
        if self.length > cap[1] * MB:
            return 413, (f"Content-Length: {self.length} bytes is more than this server takes for {self.path} "
                         f"(--{cap[0].replace('_', '-')} {cap[1]:g})")
        return None

    def handle_expect_100(self) -> bool:
        """``Expect: 100-continue``: refuse (401, 413, ...) before the client sends the body."""
        refused = self.refusal()
        if refused is not None:
            self.refuse(*refused)
            return False
        return super().handle_expect_100()

    def refuse(self, code: int, message: str) -> None:
        logger.log(logging.WARNING if code == 401 else logging.INFO, "align serve: %s %s from %s refused (%d): %s",
                   self.command, self.path, self.client_address[0], code, message)
        self.reply(code, {"error": message}, {"WWW-Authenticate": "Bearer"} if code == 401 else None)

    def headers_done(self) -> None:
        """The request line and headers are in: from now on only stalls count (the body may be large)."""
        self.reader.deadline = None
        self.connection.settimeout(self.server.limits.read_timeout_s)

    def do_GET(self):
        self.headers_done()
        refused = self.refusal()
        if refused is not None:
            self.refuse(*refused)
        elif self.path == "/health":
            self.reply(200, {**self.server.engine.info, "limits": self.server.limits.public()})
        else:
            self.refuse(404, f"no endpoint {self.path}")

    def read_body(self) -> bytes | None:
        body = bytearray()
        while len(body) < self.length:
            piece = self.rfile.read(min(CHUNK, self.length - len(body)))
            if not piece:  # the client closed early: nobody to answer
                self.close_connection = True
                return None
            body += piece
        return bytes(body)

    def do_POST(self):
        self.headers_done()
        refused = self.refusal()
        if refused is not None:
            self.refuse(*refused)
            return
        body = self.read_body()
        if body is None:
            return
        engine = self.server.engine
        if self.path == "/weights":
            work = lambda: engine.load_weights(body)  # noqa: E731
        elif self.path == "/adapter":
            work = lambda: engine.load_adapter(body)  # noqa: E731
        else:
            try:
                request = json.loads(body)
                if self.path == "/generate":
                    check_generate(request, engine.info["max_model_len"], self.server.limits)
                    work = lambda: engine.generate(request)  # noqa: E731
                else:  # a control message: answered now, or work to run with heartbeats
                    work = engine.control(self.path, request)
                    if isinstance(work, dict):
                        self.reply(200, work)
                        return
            except (ValueError, RecursionError) as err:  # BadRequest, JSON, UTF-8, nesting
                plain = isinstance(err, BadRequest)
                self.refuse(400, str(err)[:500] if plain else f"the body is not JSON: {err}"[:300])
                return
        self.run_with_heartbeats(work)

    def run_with_heartbeats(self, work) -> None:
        """Headers now, then a blank every HEARTBEAT_S while the work runs, then the JSON (read to the close)."""
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Connection", "close")
        self.end_headers()
        self.close_connection = True
        with ThreadPoolExecutor(1, thread_name_prefix="align-serve-work") as pool:
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


_BUSY_BODY = json.dumps({"error": "align serve: every worker is busy, try again"}).encode()
BUSY = (b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nConnection: close\r\n"
        b"Content-Length: %d\r\n\r\n%s" % (len(_BUSY_BODY), _BUSY_BODY))


class GuardedHTTPServer(HTTPServer):
    """An HTTPServer whose requests run on ``limits.workers`` fixed threads; a connection that finds the pool
    and its queue full is answered 503 and closed. ``engine`` may be set after construction (before
    ``serve_forever``), so the port is taken before a long model load."""

    request_queue_size = 128  # the listen backlog: connections the kernel holds before accept

    def __init__(self, address, limits: ServeLimits, api_key: str | None, engine=None):
        super().__init__(address, Handler)
        self.limits, self.api_key, self.engine = limits, api_key, engine
        self.pending: queue.Queue = queue.Queue()  # bounded by process_request, the only producer
        self.workers = [threading.Thread(target=self.work, name=f"align-serve-{i}", daemon=True)
                        for i in range(limits.workers)]
        for thread in self.workers:
            thread.start()

    def process_request(self, request, client_address):
        if self.pending.qsize() < self.limits.queue:
            self.pending.put((request, client_address))
        else:
            logger.warning("align serve: %d connections waiting for %d workers; refused %s", self.limits.queue,
                           self.limits.workers, client_address[0])
            try:
                request.setblocking(False)
                request.send(BUSY)
                request.recv(65536)  # what the client sent already: unread, it would make the close a reset
            except OSError:
                pass
            self.shutdown_request(request)

    def work(self) -> None:
        while (item := self.pending.get()) is not None:
            request, client_address = item
            try:
                self.finish_request(request, client_address)
            except Exception:
                self.handle_error(request, client_address)
            finally:
                self.shutdown_request(request)

    def handle_error(self, request, client_address):
        error = sys.exc_info()[1]
        if isinstance(error, OSError):  # the client went away (or stalled past the timeout): one line
            logger.warning("align serve: connection from %s ended: %r", client_address[0], error)
        else:
            logger.warning("align serve: connection from %s ended with an error", client_address[0], exc_info=True)

    def server_close(self):
        super().server_close()
        while True:  # connections still waiting are closed unanswered, then every worker is told to stop
            try:
                item = self.pending.get_nowait()
            except queue.Empty:
                break
            if item is not None:
                self.shutdown_request(item[0])
        for _ in self.workers:
            self.pending.put(None)
        deadline = time.monotonic() + self.limits.read_timeout_s + 1  # a worker may be reading a request
        for thread in self.workers:
            thread.join(timeout=max(0.0, deadline - time.monotonic()))
