"""Every wait is bounded: reward functions, reward models and judges get ``reward_timeout_s`` per call (the error
names the function and the prompt ids), a rollout server that heartbeats forever hits ``vllm_request_timeout_s``,
and a run whose reward hangs ends with ``error: <one line>`` and status 2 instead of hanging at exit."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch

from align.config import load_config
from align.errors import ConfigError, TrainingError
from align.recipes.grpo import GRPORecipeConfig
from align.recipes.iterative_dpo import IterativeRecipeConfig
from align.recipes.online_dpo import OnlineRecipeConfig
from align.rewards import registry
from align.rewards.preference import build_oracle
from align.rewards.registry import RewardSet
from align.rollout.base import SamplingParams
from align.rollout.remote import ServerEngine, ServerUnavailable
from align.timeouts import DeadlineExceeded, call_with_deadline, check_timeout

PROMPTS = ["p0", "p0", "p1", "p1"]
COMPLETIONS = ["a", "b", "c", "d"]
UIDS = [3, 3, 7, 7]
HINT = "; it may hang, or need a larger reward_timeout_s"


# --- call_with_deadline --------------------------------------------------------------------------------------


def test_deadline_call_returns_the_value_and_reraises_the_same_exception():
    seen = {}

    def probe(x, *, y):
        seen["thread"], seen["grad"] = threading.current_thread(), torch.is_grad_enabled()
        return x + y

    with torch.no_grad():
        assert call_with_deadline(probe, 5.0, 2, y=3) == 5
    assert seen["thread"] is not threading.main_thread() and seen["thread"].daemon
    assert seen["grad"] is False  # the caller's autograd mode goes along (it is per thread in torch)
    assert call_with_deadline(probe, None, 1, y=1) == 2 and seen["thread"] is threading.main_thread()

    error = KeyError("missing")

    def boom():
        raise error

    with pytest.raises(KeyError) as caught:
        call_with_deadline(boom, 5.0)
    assert caught.value is error


def test_deadline_call_gives_up_on_a_call_that_never_returns():
    gate = threading.Event()
    try:
        with pytest.raises(DeadlineExceeded) as caught:
            call_with_deadline(gate.wait, 0.2)
        assert caught.value.timeout_s == 0.2
        stuck = [t for t in threading.enumerate() if t.name == "align-deadline-wait"]
        assert len(stuck) == 1 and stuck[0].daemon  # left running, never holding up the interpreter's exit
    finally:
        gate.set()


# --- reward functions -----------------------------------------------------------------------------------------


def test_hung_reward_function_names_the_spec_and_the_prompt_ids():
    rs = RewardSet(["timeout_helpers:never_returns"], timeout_s=0.3)
    with pytest.raises(TrainingError) as caught:
        rs(PROMPTS, COMPLETIONS, UIDS, [1] * 4, {})
    assert str(caught.value) == ("reward function 'timeout_helpers:never_returns' did not return within "
                                 "reward_timeout_s=0.3s (prompt ids 3, 7)" + HINT)


def test_hung_reward_with_on_error_zero_scores_the_batch_zero_and_counts_it():
    rs = RewardSet(["rl_helpers:constant", "timeout_helpers:never_returns"], [2.0, 5.0], on_error="zero",
                   timeout_s=0.3)
    total, per_fn, errors = rs(PROMPTS, COMPLETIONS, UIDS, [1] * 4, {})
    assert total.tolist() == [2.0, 2.0, 2.0, 2.0]
    assert per_fn["never_returns"].tolist() == [0.0] * 4
    assert errors == {"constant": 0, "never_returns": 4}


def test_registered_rewards_run_inline_user_code_runs_bounded(monkeypatch):
    threads = {}

    def probe(completions, **_):
        threads[len(threads)] = threading.current_thread()
        return [1.0] * len(completions)

    monkeypatch.setitem(registry.REWARD_FUNCTIONS, "probe", probe)
    rs = RewardSet(["probe", probe], timeout_s=5.0)
    assert rs.bounded == (False, True)
    assert rs.specs == ("probe", "probe")
    total, _, _ = rs(PROMPTS, COMPLETIONS, UIDS, [1] * 4, {})
    assert total.tolist() == [2.0] * 4
    # the registered one on the caller's thread (math_verify's own signal time limits need the main thread)
    assert threads[0] is threading.main_thread() and threads[1] is not threading.main_thread()
    assert RewardSet(["math_verify", "rl_helpers:constant"]).bounded == (False, True)
    assert [registry.is_registered(s) for s in ("accuracy", " format ", "model:/rm", "pkg.mod:fn", len)] == [
        True, True, False, False, False]


def test_prompt_ids_of_a_large_batch_are_shortened():
    assert registry.timeout_message("reward function 'f'", 2, list(range(10))) == (
        "reward function 'f' did not return within reward_timeout_s=2s (prompt ids 0, 1, 2, 3, 4, 5, 6, 7, ... "
        "(10 prompts))" + HINT)
    assert registry.timeout_message("oracle 'o'", 1.5, [4, 4]) == (
        "oracle 'o' did not return within reward_timeout_s=1.5s (prompt id 4)" + HINT)


# --- oracles / judges -----------------------------------------------------------------------------------------


def test_hung_function_oracle_names_itself_and_the_prompt_ids():
    oracle = build_oracle("timeout_helpers:never_judges", timeout_s=0.3)
    with pytest.raises(TrainingError) as caught:
        oracle(["p", "q"], ["a", "b"], ["c", "d"], {}, ids=[5, 9])
    assert str(caught.value) == ("oracle 'timeout_helpers:never_judges' did not return within "
                                 "reward_timeout_s=0.3s (prompt ids 5, 9)" + HINT)
    assert oracle.calls == 0


def test_hung_oracle_in_best_worst_names_the_rows_uid():
    """The iterative driver ranks K candidates with best_worst(prompt, texts, row); the row's uid is named."""
    oracle = build_oracle("timeout_helpers:never_judges", timeout_s=0.3)
    with pytest.raises(TrainingError, match=re.escape("reward_timeout_s=0.3s (prompt id 11)")):
        oracle.best_worst("p", ["x", "y", "z"], {"uid": 11, "answer": 3})


@pytest.mark.parametrize("spec,name", [
    ("reward:timeout_helpers:never_returns", "reward:never_returns"),
    ("verifier:timeout_helpers:never_returns", "verifier:timeout_helpers:never_returns"),
])
def test_reward_and_verifier_oracles_over_user_code_are_bounded(spec, name):
    oracle = build_oracle(spec, timeout_s=0.3)
    assert oracle.runs_user_code
    with pytest.raises(TrainingError) as caught:
        oracle(["p"], ["a"], ["b"], {"uid": [2]})
    assert str(caught.value) == f"oracle {name!r} did not return within reward_timeout_s=0.3s (prompt id 2)" + HINT


def test_oracles_of_our_own_run_inline():
    assert [build_oracle(s).runs_user_code for s in ("cyclic", "verifier:accuracy", "reward:accuracy")] == [
        False, False, False]
    assert build_oracle("verifier:accuracy", timeout_s=7.0).timeout_s == 7.0


# --- options ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("cls,path", [
    (GRPORecipeConfig, "configs/grpo/testbed.yaml"),
    (OnlineRecipeConfig, "configs/online_dpo/testbed.yaml"),
    (IterativeRecipeConfig, "configs/iterative/testbed-apo.yaml"),
])
@pytest.mark.parametrize("value", ["0", "-1", "nan", "inf"])
def test_reward_timeout_must_be_finite_and_positive(repo, tmp_path, cls, path, value):
    with pytest.raises(ConfigError) as caught:
        load_config(cls, repo / path, [f"reward_timeout_s={value}", f"output_dir={tmp_path / 'o'}"])
    message = str(caught.value)  # the loader may refuse NaN as a number first; either way one line naming the key
    assert message.startswith("reward_timeout_s: must be") and "\n" not in message and value in message


@pytest.mark.parametrize("value", [0, -1.5, float("nan"), float("inf"), True, "5"])
def test_check_timeout_refuses_every_unbounded_or_odd_value(value):
    with pytest.raises(ConfigError) as caught:
        check_timeout("reward_timeout_s", value)
    assert str(caught.value) == ("reward_timeout_s: must be a finite number of seconds > 0 (every wait is bounded; "
                                 f"give a larger number for a slow function), got {value!r}")
    check_timeout("reward_timeout_s", 1e-3)
    check_timeout("reward_timeout_s", 86400)


def test_reward_timeout_default_and_override(repo, tmp_path):
    over = [f"output_dir={tmp_path / 'o'}"]
    assert load_config(GRPORecipeConfig, repo / "configs/grpo/testbed.yaml", over).reward_timeout_s == 600.0
    config = load_config(GRPORecipeConfig, repo / "configs/grpo/testbed.yaml", [*over, "reward_timeout_s=2.5"])
    assert RewardSet.from_config(config).timeout_s == 2.5


@pytest.mark.parametrize("values,message", [
    (["vllm_timeout_s=5", "vllm_request_timeout_s=4"], "vllm_request_timeout_s: must be >= vllm_timeout_s (5), got 4"),
    (["vllm_request_timeout_s=inf"], "vllm_request_timeout_s: must be a finite number of seconds > 0"),
    (["vllm_timeout_s=inf"], "vllm_timeout_s: must be a finite number of seconds > 0"),
])
def test_request_timeout_is_checked_against_the_silence_timeout(repo, tmp_path, values, message):
    with pytest.raises(ConfigError, match="^" + re.escape(message)):
        load_config(GRPORecipeConfig, repo / "configs/grpo/testbed.yaml",
                    ["rollout=vllm-server", f"output_dir={tmp_path / 'o'}", *values])
    config = load_config(GRPORecipeConfig, repo / "configs/grpo/testbed.yaml",
                         ["rollout=vllm-server", f"output_dir={tmp_path / 'o'}"])
    assert (config.vllm_timeout_s, config.vllm_request_timeout_s) == (60.0, 1800.0)


# --- the rollout server's requests ------------------------------------------------------------------------------


class FakeServer:
    """`align serve`'s protocol on 127.0.0.1:<free port>: a POST gets its headers at once, then a heartbeat blank every
    0.05 s, then (unless ``answer_after_s`` is None: never) one completion per prompt."""

    RESULT = [[5, 6, 7], "stop", [-0.5, -0.25, -0.125]]

    def __init__(self, answer_after_s: float | None):
        stop = self.stop = threading.Event()

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_POST(self):
                request = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                self.send_response(200)
                self.send_header("Connection", "close")
                self.end_headers()
                self.close_connection = True
                beats = 0
                try:
                    while not stop.is_set() and (answer_after_s is None or beats * 0.05 < answer_after_s):
                        self.wfile.write(b" ")
                        self.wfile.flush()
                        beats += 1
                        stop.wait(0.05)
                    self.wfile.write(json.dumps({"results": [FakeServer.RESULT] * len(request["rows"])}).encode())
                except (BrokenPipeError, ConnectionResetError):  # the trainer gave up and closed
                    pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.stop.set()
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def fake_server(request):
    server = FakeServer(request.param)
    yield server
    server.close()


@pytest.mark.parametrize("fake_server", [None], indirect=True)
def test_server_that_heartbeats_forever_hits_the_request_timeout(fake_server):
    engine = ServerEngine("127.0.0.1", fake_server.port, eos_ids=[0], timeout_s=1, request_timeout_s=2)
    with pytest.raises(ServerUnavailable) as caught:
        engine.generate([[1, 2, 3], [4]], [2, 1], SamplingParams(max_new_tokens=3))
    # the heartbeats kept the socket from ever being silent for vllm_timeout_s=1: the request's bound ended it
    assert str(caught.value) == (f"vllm-server http://127.0.0.1:{fake_server.port}: 3 completions took longer than "
                                 "vllm_request_timeout_s=2s (the server kept sending heartbeats without an answer); "
                                 "raise vllm_request_timeout_s for longer work, or restart the server")


@pytest.mark.parametrize("fake_server", [0.5], indirect=True)
def test_server_that_answers_after_heartbeats_still_works(fake_server):
    engine = ServerEngine("127.0.0.1", fake_server.port, eos_ids=[0], timeout_s=1, request_timeout_s=2)
    out = engine.generate([[1, 2, 3], [4]], [2, 1], SamplingParams(max_new_tokens=3))
    assert out.prompt_index == [0, 0, 1] and out.sample_index == [0, 1, 0]
    assert out.completion_ids == [[5, 6, 7]] * 3 and out.sampling_logps == [[-0.5, -0.25, -0.125]] * 3


# --- a whole run ------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_recipe_run_with_a_hung_reward_exits_2_with_one_line(repo, testbed, tmp_path):
    """GRPO with a reward that never returns: the run ends (the stuck daemon thread does not hold up the exit) with
    status 2 and one `error:` line naming the function, the option and the round's prompt ids."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(repo / "tests"), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "recipes/grpo.py", "--config", "configs/grpo/testbed.yaml",
           "reward_funcs=[timeout_helpers:never_returns]", "reward_timeout_s=1", "max_steps=1",
           "per_device_train_batch_size=4", "num_generations=2", "num_minibatches=1", "max_train_samples=16",
           "max_completion_length=4", "dataset_test_split=null", "disable_tqdm=true", f"output_dir={tmp_path / 'o'}"]
    proc = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and proc.stderr.rstrip().endswith(errors[0]), proc.stderr[-3000:]
    assert re.fullmatch(r"error: reward function 'timeout_helpers:never_returns' did not return within "
                        r"reward_timeout_s=1s \(prompt ids \d+, \d+, \d+, \d+\)" + re.escape(HINT), errors[0])
    assert "Traceback" not in proc.stderr


@pytest.mark.slow
def test_online_dpo_with_a_hung_oracle_names_the_step_prompts(repo, testbed, tmp_path):
    """Online DPO hands its rows' uids to the oracle: the error names the prompts of the step that hung."""
    from align.recipes.online_dpo import run

    config = load_config(OnlineRecipeConfig, repo / "configs/online_dpo/testbed.yaml", [
        "oracle=timeout_helpers:never_judges", "reward_timeout_s=0.5", "max_steps=1", "per_device_train_batch_size=2",
        "max_train_samples=8", "max_completion_length=4", "dataset_test_split=null", "disable_tqdm=true",
        f"output_dir={tmp_path / 'o'}"])
    with pytest.raises(TrainingError) as caught:
        run(config)
    assert re.fullmatch(r"oracle 'timeout_helpers:never_judges' did not return within reward_timeout_s=0\.5s "
                        r"\(prompt ids \d+, \d+\)" + re.escape(HINT), str(caught.value))
