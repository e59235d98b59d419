"""`align serve` against a hostile client: the HTTP layer (align/rollout/serve_http.py) on a real socket on
127.0.0.1:0 with a fake engine in place of vLLM (same ``info`` / ``generate`` / ``load_weights`` as
:class:`align.rollout.server.RolloutServer`), the trainer's client (:class:`ServerEngine`) against it, and the
``align serve`` command's refusals."""

import ast
import json
import socket
import threading
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save, save_file

from align.cli import main as cli_main
from align.errors import ConfigError, TrainingError
from align.rollout.base import SamplingParams
from align.rollout.remote import ServerEngine
from align.rollout.serve_http import API_KEY_ENV, MB, GuardedHTTPServer, ServeLimits
from align.rollout.server import is_loopback, serve, weights_cap_mb
from align.rollout.vllm_engine import policy_weights, request_rows

KEY = "s3cret-key-0123456789"
REPO = Path(__file__).resolve().parents[2]


class FakeEngine:
    """The engine's surface the HTTP layer uses; records what reached it."""

    def __init__(self):
        self.info = {"model": "fake", "max_model_len": 64, "tensor_parallel_size": 1, "dtype": "float32",
                     "weights_version": 0}
        self.loaded: list[bytes] = []
        self.requests: list[dict] = []

    def generate(self, request: dict) -> dict:
        self.requests.append(request)
        return {"results": [[[7, 1], "stop", [-0.5, -0.25]] for _ in request["rows"]]}

    def load_weights(self, payload: bytes) -> dict:
        self.loaded.append(payload)
        self.info["weights_version"] += 1
        return {"weights_version": self.info["weights_version"]}


@contextmanager
def running(api_key: str | None = KEY, **limits):
    limits = {"max_body_mb": 1.0, "read_timeout_s": 30.0, "workers": 4, "queue": 8, **limits}
    engine = FakeEngine()
    httpd = GuardedHTTPServer(("127.0.0.1", 0), ServeLimits(**limits), api_key, engine)
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield httpd.server_address[1], engine
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join()


def exchange(port: int, head: str, body: bytes = b"", timeout: float = 10.0) -> tuple[int, dict]:
    """Send ``head`` (request line and headers, without the blank line) and ``body``; the status and JSON body."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(head.encode("latin-1") + b"\r\n\r\n" + body)
        data = read_all(sock)
    return parse(data)


def read_all(sock: socket.socket) -> bytes:
    """Everything the server sends until it closes (a reset after its answer ends it too)."""
    data = b""
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except ConnectionResetError:
        pass
    return data


def parse(data: bytes) -> tuple[int, dict]:
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(body)


def post(port: int, path: str, body: bytes, key: str | None = KEY, extra: str = "") -> tuple[int, dict]:
    auth = f"\r\nAuthorization: Bearer {key}" if key is not None else ""
    return exchange(port, f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}{auth}{extra}", body)


def generate_body(**change) -> bytes:
    request = {"prompts": [[5, 6, 7], [8]], "rows": [[0, 0], [0, 1], [1, 0]], "seeds": [11, 12, 13],
               "sampling": {"max_new_tokens": 4, "temperature": 1.0, "top_p": 1.0, "top_k": 0, "seed": 0},
               "eos_ids": [1], **change}
    return json.dumps({k: v for k, v in request.items() if v is not None}).encode()


# --- the key ------------------------------------------------------------------------------------------------


def test_every_endpoint_needs_the_key_and_nothing_reaches_the_engine_without_it():
    weights = save({"w": torch.arange(6.0)})
    with running() as (port, engine):
        for key in (None, "wrong-key", KEY + "x", KEY[:-1], ""):
            status, reply = post(port, "/weights", weights, key=key)
            assert status == 401 and reply["error"].startswith("unauthorized: send the header 'Authorization: "
                                                               "Bearer <key>'"), (key, reply)
            assert post(port, "/generate", generate_body(), key=key)[0] == 401
            assert exchange(port, "GET /health HTTP/1.1\r\nHost: x" + (f"\r\nAuthorization: Bearer {key}"
                                                                       if key is not None else ""))[0] == 401
        assert exchange(port, f"GET /health HTTP/1.1\r\nAuthorization: Basic {KEY}")[0] == 401  # not a bearer token
        assert engine.loaded == [] and engine.requests == [] and engine.info["weights_version"] == 0

        assert post(port, "/weights", weights) == (200, {"weights_version": 1})
        assert engine.loaded == [weights]
        status, reply = post(port, "/generate", generate_body())
        assert status == 200 and reply["results"] == [[[7, 1], "stop", [-0.5, -0.25]]] * 3
        status, info = exchange(port, f"GET /health HTTP/1.1\r\nauthorization: bearer {KEY}")  # case-insensitive
        assert status == 200 and info["weights_version"] == 1 and info["limits"] == {
            "max_body_mb": 1.0, "max_request_mb": 16.0, "max_completions": 16384, "max_n": 1024, "read_timeout_s": 30.0}


def test_without_a_key_a_loopback_server_answers_anyone():
    with running(api_key=None) as (port, engine):
        assert post(port, "/weights", b"abc", key=None) == (200, {"weights_version": 1})
        assert engine.loaded == [b"abc"]


# --- bodies -------------------------------------------------------------------------------------------------


def test_content_length_is_checked_before_a_byte_of_the_body_is_read():
    """The server would wait 30 s for a body that never comes; the 413 arrives at once, so it read nothing."""
    with running() as (port, engine):
        auth = f"Authorization: Bearer {KEY}"
        status, reply = exchange(port, f"POST /weights HTTP/1.1\r\n{auth}\r\nContent-Length: {10**11}")
        assert status == 413 and reply["error"] == ("Content-Length: 100000000000 bytes is more than this server "
                                                    "takes for /weights (--max-body-mb 1)")
        status, reply = exchange(port, f"POST /generate HTTP/1.1\r\n{auth}\r\nContent-Length: {16 * MB + 1}")
        assert status == 413 and reply["error"].endswith("for /generate (--max-request-mb 16)")
        # the key first: a stranger learns nothing about the limits
        assert exchange(port, f"POST /weights HTTP/1.1\r\nContent-Length: {10**11}")[0] == 401
        # Expect: 100-continue is refused before the client sends the body; a good one gets 100 and then 200
        status, _ = exchange(port, f"POST /weights HTTP/1.1\r\n{auth}\r\nContent-Length: {2 * MB}\r\n"
                                   "Expect: 100-continue")
        assert status == 413
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            sock.sendall(f"POST /weights HTTP/1.1\r\n{auth}\r\nContent-Length: 3\r\nExpect: 100-continue\r\n\r\n"
                         .encode())
            assert sock.recv(100).startswith(b"HTTP/1.1 100 Continue\r\n")
            sock.sendall(b"xyz")
            assert parse(read_all(sock)) == (200, {"weights_version": 1})
        for headers, code, message in [
            ("", 411, "Content-Length: required"),
            ("Content-Length: abc", 400, "Content-Length: must be one non-negative integer, got 'abc'"),
            ("Content-Length: -5", 400, "Content-Length: must be one non-negative integer, got '-5'"),
            ("Content-Length: \u00b2", 400, "Content-Length: must be one non-negative integer, got '\u00b2'"),
            ("Content-Length: " + "9" * 5000, 400, "Content-Length: must be one non-negative integer, got '999"),
            ("Content-Length: 3\r\nContent-Length: 4", 400, "Content-Length: must be one non-negative integer, "
                                                            "got '3, 4'"),
            ("Transfer-Encoding: chunked", 411, "Transfer-Encoding is not accepted"),
        ]:
            status, reply = exchange(port, f"POST /weights HTTP/1.1\r\n{auth}" + (f"\r\n{headers}" if headers else ""))
            assert status == code and reply["error"].startswith(message), (headers, reply)
        assert exchange(port, f"POST /nowhere HTTP/1.1\r\n{auth}\r\nContent-Length: 0")[0] == 404
        assert engine.loaded == [b"xyz"]


# --- time and threads ---------------------------------------------------------------------------------------


def test_half_open_connections_cannot_make_threads_and_are_dropped():
    """50 connections that send half a request: no thread is made for them (4 workers take 4, 8 wait, the rest get
    503 at once), each waiting one is dropped after the 0.5 s read timeout, then a normal request is answered."""
    with running(read_timeout_s=0.5) as (port, engine):
        threads = threading.active_count()
        socks = []
        for _ in range(50):
            sock = socket.create_connection(("127.0.0.1", port), timeout=10)
            sock.sendall(b"POST /weights HTTP/1.1\r\nHost: x\r\n")  # no blank line: the headers never end
            socks.append(sock)
        most = threads
        replies = []
        for sock in socks:
            most = max(most, threading.active_count())
            replies.append(read_all(sock))  # a 503, or nothing when the server drops it after the read timeout
            sock.close()
        assert most <= threads, (most, threads)
        busy = [r for r in replies if r]
        assert all(r.startswith(b"HTTP/1.1 503 ") for r in busy), busy[:1]
        assert parse(busy[0]) == (503, {"error": "align serve: every worker is busy, try again"})
        assert len(busy) <= 50 - 12 and len(replies) - len(busy) >= 12  # 4 workers + 8 queued, each dropped
        status, info = exchange(port, f"GET /health HTTP/1.1\r\nAuthorization: Bearer {KEY}")
        assert status == 200 and info["model"] == "fake" and engine.loaded == []


def test_headers_dripped_a_byte_at_a_time_are_dropped_at_the_deadline():
    """Each byte comes well within the 0.5 s read timeout, but the headers as a whole must arrive within it."""
    with running(read_timeout_s=0.5) as (port, _), socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\n")
        sock.settimeout(0.1)
        closed = False
        for _ in range(60):  # 6 s of drips at most
            try:
                sock.sendall(b"X")
                closed = sock.recv(100) == b""
            except TimeoutError:
                continue
            except (BrokenPipeError, ConnectionResetError):
                closed = True
            if closed:
                break
        assert closed


def test_a_stalled_body_is_dropped_and_not_loaded():
    with running(read_timeout_s=0.5) as (port, engine), socket.create_connection(("127.0.0.1", port),
                                                                                 timeout=10) as sock:
        sock.sendall(f"POST /weights HTTP/1.1\r\nAuthorization: Bearer {KEY}\r\nContent-Length: 100\r\n\r\n"
                     .encode() + b"0123456789")
        assert read_all(sock) == b""  # closed without an answer after 0.5 s of silence
        assert engine.loaded == []


# --- /generate limits ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(("change", "message"), [
    ({"prompts": [[5]] * 5, "rows": [[0, 0]], "seeds": [1]},
     "prompts: must be a list of at most 4 prompts (--max-completions), got 5"),
    ({"rows": [[0, 0], [0, 1], [1, 0], [1, 1], [1, 2]], "seeds": [1, 2, 3, 4, 5]},
     "rows: must be a list of at most 4 completions (--max-completions), got 5"),
    ({"rows": [[0, 0], [0, 1], [0, 2]]}, "rows: prompt 0 asks for 3 completions, more than 2 (--max-n)"),
    ({"rows": [[0, 0], [3, 0], [1, 0]]}, "rows[1]: prompt index 3 but the request has 2 prompts"),
    ({"rows": [[0, 0], [0], [1, 0]]}, "rows[1]: 1 entries, must be 2..2"),
    ({"prompts": [list(range(64)), [8]]}, "prompts[0]: 64 entries, must be 1..63"),
    ({"prompts": [[5], []]}, "prompts[1]: 0 entries, must be 1..63"),
    ({"prompts": [[5, -1], [8]]}, "prompts[0]: entries must be integers in [0, 9223372036854775808), got -1"),
    ({"prompts": [[5, 2.5], [8]]}, "prompts[0]: entries must be integers"),
    ({"prompts": "[5]"}, "prompts: must be a list of at most 4 prompts (--max-completions), got str"),
    ({"seeds": [1, 2]}, "seeds: 2 entries, must be 3..3"),
    ({"eos_ids": None}, "eos_ids: missing"),
    ({"extra": 1}, "extra: unknown field"),
    ({"sampling": {"max_new_tokens": 64}}, "sampling.max_new_tokens: 64 is not below the server's max_model_len 64"),
    ({"sampling": {"max_new_tokens": 0}}, "sampling.max_new_tokens: must be >= 1, got 0"),
    ({"sampling": {"temperature": -1.0}}, "sampling.temperature: must be >= 0, got -1.0"),
    ({"sampling": {"temperature": "hot"}}, "sampling.temperature: must be a finite number, got 'hot'"),
    ({"sampling": {"top_k": 1.5}}, "sampling.top_k: must be an integer, got 1.5"),
    ({"sampling": {"n": 8}}, "sampling.n: unknown field"),
    ({"sampling": [1]}, "sampling: must be an object, got list"),
])
def test_generate_over_a_limit_or_malformed_is_400_naming_the_field(change, message):
    with running(max_completions=4, max_n=2) as (port, engine):
        status, reply = post(port, "/generate", generate_body(**change))
        assert status == 400 and reply["error"].startswith(message), reply
        assert engine.requests == []


def test_generate_bodies_that_are_not_json():
    with running() as (port, engine):
        for body in (b"{not json", b"\xff\xfe", b"[" * 100_000, b"[1, 2]"):
            status, reply = post(port, "/generate", body)
            assert status == 400, (body[:10], reply)
            assert reply["error"].startswith("the body must be a JSON object, got list" if body == b"[1, 2]"
                                             else "the body is not JSON"), reply
        assert engine.requests == []
        status, reply = post(port, "/generate", generate_body())  # the server is still fine
        assert status == 200 and len(reply["results"]) == 3 and engine.requests[0]["seeds"] == [11, 12, 13]


# --- the trainer's client -----------------------------------------------------------------------------------


def test_client_sends_the_key_from_the_environment(monkeypatch):
    monkeypatch.setenv(API_KEY_ENV, KEY)
    with running() as (port, engine):
        client = ServerEngine("127.0.0.1", port, eos_ids=[1], timeout_s=10)
        assert client.check(max_model_len=32)["limits"]["max_body_mb"] == 1.0
        sampling = SamplingParams(max_new_tokens=2, seed=3)
        out = client.generate([[5, 6], [7]], [2, 1], sampling)
        assert out.completion_ids == [[7, 1]] * 3 and out.prompt_index == [0, 0, 1] and out.sample_index == [0, 1, 0]
        assert engine.requests[0]["seeds"] == request_rows([[5, 6], [7]], [2, 1], sampling, None)[1]
        model = torch.nn.Linear(4, 3)
        client.sync_weights(model)
        sent = load_safetensors(engine.loaded[0])
        assert sorted(sent) == ["bias", "weight"] and torch.equal(sent["weight"], model.weight.detach())
        assert client.info["weights_version"] == 1

        monkeypatch.setenv(API_KEY_ENV, "wrong")
        with pytest.raises(ConfigError, match=rf"^{API_KEY_ENV}: vllm-server http://127.0.0.1:{port} refused the "
                                              rf"health check \(HTTP 401\): the key is wrong; set {API_KEY_ENV}"):
            ServerEngine("127.0.0.1", port, eos_ids=[1], timeout_s=10).check(max_model_len=32)
        monkeypatch.delenv(API_KEY_ENV)
        with pytest.raises(ConfigError, match=r"refused the health check \(HTTP 401\): it needs a key"):
            ServerEngine("127.0.0.1", port, eos_ids=[1], timeout_s=10).check(max_model_len=32)
        assert len(engine.loaded) == 1


def test_client_refuses_a_push_larger_than_the_server_takes(monkeypatch):
    monkeypatch.setenv(API_KEY_ENV, KEY)
    with running(max_body_mb=0.001) as (port, engine):
        client = ServerEngine("127.0.0.1", port, eos_ids=[1], timeout_s=10)
        client.check(max_model_len=32)
        model = torch.nn.Linear(64, 64)  # 4160 float32 weights: 16640 bytes + a header = 0.016 MB > 0.001 MB
        with pytest.raises(TrainingError, match=r"the weight update is 0.016 MB, more than the server takes "
                                                r"\(align serve --max-body-mb 0.001\)$"):
            client.sync_weights(model)
        assert engine.loaded == []


# --- align serve: key policy, limits, the weights cap -------------------------------------------------------


@pytest.mark.parametrize(("host", "loopback"), [("127.0.0.1", True), ("127.5.5.5", True), ("::1", True),
                                                ("[::1]", True), ("localhost", True), ("0.0.0.0", False), ("", False),
                                                ("::", False), ("10.0.0.5", False), ("192.168.1.20", False)])
def test_is_loopback(host, loopback):
    assert is_loopback(host) is loopback


def run_cli(capsys, *argv) -> tuple[int, list[str]]:
    code = cli_main(["serve", *argv])
    return code, capsys.readouterr().err.strip().splitlines()


def test_serve_off_loopback_without_a_key_refuses_in_one_line_before_anything(monkeypatch, capsys):
    monkeypatch.delenv(API_KEY_ENV, raising=False)
    code, err = run_cli(capsys, "--model", "/no/such/model", "--host", "0.0.0.0")  # the key is checked first
    assert code == 2 and err == [
        "error: --api-key: --host 0.0.0.0 is reachable from other machines, so a shared key is required: set "
        f"{API_KEY_ENV} (or pass --api-key) here and the same {API_KEY_ENV} for the trainer"]
    code, err = run_cli(capsys, "--model", "/no/such/model", "--host", "0.0.0.0", "--api-key", "")
    assert code == 2 and err == ["error: --api-key: the key must be non-empty printable ASCII without spaces"]
    monkeypatch.setenv(API_KEY_ENV, "two words")
    code, err = run_cli(capsys, "--model", "/no/such/model", "--host", "0.0.0.0")
    assert code == 2 and err == [f"error: {API_KEY_ENV}: the key must be non-empty printable ASCII without spaces"]
    monkeypatch.setenv(API_KEY_ENV, KEY)  # with the key (or on loopback) the next check speaks
    for host in ("0.0.0.0", "127.0.0.1"):
        code, err = run_cli(capsys, "--model", "/no/such/model", "--host", host)
        assert code == 2 and len(err) == 1 and err[0].startswith("error: --model: folder '/no/such/model'"), err


def test_serve_limits_are_checked_before_the_port_and_the_model(capsys):
    for option, value in [("--workers", "0"), ("--max-body-mb", "-1"), ("--read-timeout-s", "nan"),
                          ("--max-n", "0")]:
        code, err = run_cli(capsys, "--model", "/no/such/model", "--port", "1", option, value)
        shown = {"nan": "nan", "-1": "-1.0", "0": "0"}[value]
        assert code == 2 and err == [f"error: {option}: must be a positive number, got {shown}"], err
    with pytest.raises(ConfigError, match=r"^--workers: must be a positive number, got 0$"):
        ServeLimits(workers=0)


def test_serve_help_shows_the_limits_defaults(capsys):
    with pytest.raises(SystemExit):
        cli_main(["serve", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    defaults = ServeLimits()
    for option, field in [("--max-request-mb", "max_request_mb"), ("--max-completions", "max_completions"),
                          ("--max-n", "max_n"), ("--read-timeout-s", "read_timeout_s"), ("--workers", "workers")]:
        assert f"(default {getattr(defaults, field):g})" in text.split(option, 2)[2].split(" --", 1)[0], option
    assert f"{defaults.queue} more connections may wait" in text


def test_weights_cap_is_float32_twice_plus_64_mb(tmp_path):
    save_file({"a": torch.zeros(3, 4, dtype=torch.bfloat16), "b": torch.zeros(5)}, tmp_path / "model.safetensors")
    (tmp_path / "extra.bin").write_bytes(b"\0" * 1000)
    assert weights_cap_mb(str(tmp_path)) == pytest.approx((17 * 8 + 4 * 1000) / MB + 64, abs=1e-12)
    empty = tmp_path / "empty"
    empty.mkdir()
    assert weights_cap_mb(str(empty)) is None
    with pytest.raises(ConfigError, match=r"^--max-body-mb: cannot size the weights of .*empty.*; pass --max-body-mb"):
        serve(str(empty))


@pytest.mark.slow
def test_the_testbed_policys_real_push_fits_the_default_cap(testbed):
    """What ServerEngine.sync_weights sends for the testbed policy (float32, every name) fits its folder's cap."""
    from align.modeling import load_model

    model = load_model(str(testbed.policy))
    payload = save({name: t.clone() for name, t in policy_weights(model)})
    cap = weights_cap_mb(str(testbed.policy))
    elements = sum(t.numel() for t in model.state_dict().values())
    assert len(payload) <= cap * MB and cap == pytest.approx(8 * elements / MB + 64, abs=1e-9)


def test_every_torch_load_passes_weights_only_true():
    """``torch.load`` unpickles: every call in the repository says ``weights_only=True`` explicitly."""
    calls = 0
    for path in [*REPO.glob("align/**/*.py"), *REPO.glob("recipes/*.py"), *REPO.glob("rewards/*.py"),
                 *REPO.glob("tests/**/*.py")]:
        text = path.read_text(encoding="utf-8")
        if "torch.load" not in text:
            continue
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.Call) and ast.unparse(node.func) == "torch.load":
                calls += 1
                keywords = {k.arg: ast.unparse(k.value) for k in node.keywords}
                assert keywords.get("weights_only") == "True", f"{path}:{node.lineno}"
    assert calls >= 2  # the reference log-prob cache and the distributed test read it back

