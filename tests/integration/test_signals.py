"""SIGTERM / SIGINT stop a run cleanly (align/stopping.py): the step in progress finishes, a checkpoint is written
there, one line says where, the status is 128 + the signal's number, and resuming from that checkpoint gives the
uninterrupted run's numbers exactly. A second signal exits at once; a signal before training exits at once; with
two processes, a signal to one rank stops both at the same step.

The handler and the callback are checked first on their own; whole runs are subprocesses of ``align train`` (or
``accelerate launch``) whose output goes to a file the test watches, signalled once the first step is logged; the
iterative driver runs in-process, signalled by a callback at an exact point."""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import psutil
import pytest
import torch
from ports import free_port
from safetensors.torch import load_file
from transformers import TrainerCallback, TrainerControl, TrainerState

from align.rollout import WeightSync
from align.stopping import RESUME, StopCallback, Stopped, after_train, signals_handled, stop_point

# the subprocess imports this module (its reward functions) and `ports` from tests/
TESTS_PATH = os.pathsep.join((str(Path(__file__).parent), str(Path(__file__).parents[1])))
TIMEOUT = 600  # seconds any one run may take before the test calls it a hang (the CPU may be shared)
COMMON = ["logging_steps=1", "dataset_test_split=null", "disable_tqdm=true"]
DPO = ["dpo", "--config", "configs/dpo/testbed.yaml", "max_train_samples=128", "per_device_train_batch_size=4",
       *COMMON]
# Two optimizer steps per round (num_minibatches=2): a stop waits for the round's last step.
GRPO = ["grpo", "--config", "configs/grpo/testbed.yaml", "max_train_samples=64", "per_device_train_batch_size=4",
        "num_generations=4", "num_minibatches=2", *COMMON]
STOP = re.compile(r"^align: stopped by (SIG\w+) at step (\d+); checkpoint in (\S+); "
                  r"resume with resume_from_checkpoint=true$", re.M)
RECEIVED = re.compile(r"^align: (SIG\w+) received; (?:finishing|training on to) step (\d+)(?: \(the next step a "
                      r"checkpoint resumes exactly\))?, then saving a checkpoint \(a second signal exits at once\)$",
                      re.M)


# --- the handler and the callback, without training ----------------------------------------------------------------

def wait_for_handler() -> None:
    """Let Python run a pending signal handler (it runs between bytecodes of the main thread)."""
    for _ in range(50):
        time.sleep(0.001)


def test_outside_a_loop_the_first_signal_stops_at_once_and_the_old_handlers_come_back():
    before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    with pytest.raises(Stopped) as info, signals_handled():
        os.kill(os.getpid(), signal.SIGTERM)
        wait_for_handler()
    assert (info.value.code, info.value.line) == (
        143, "align: stopped by SIGTERM outside a training step; nothing saved by this stop")
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == before


SAID = "align: {} received; training on to step {} (the next step a checkpoint resumes exactly), then saving a " \
       "checkpoint (a second signal exits at once)\n"


def test_in_a_loop_the_signal_waits_for_the_batch_end_then_saves_and_stops(capfd):
    args, control = SimpleNamespace(device="cpu", output_dir="out"), TrainerControl()
    state = TrainerState(global_step=0, max_steps=10)
    callback = StopCallback(SimpleNamespace(batch_repeats=2))  # an RL round of 2 optimizer steps
    with pytest.raises(Stopped) as info, signals_handled():
        callback.on_train_begin(args, state, control)
        os.kill(os.getpid(), signal.SIGINT)  # during step 1
        wait_for_handler()
        assert capfd.readouterr().err == SAID.format("SIGINT", 2)
        state.global_step = 1
        callback.on_step_end(args, state, control)  # inside the round: no stop
        assert not (control.should_save or control.should_training_stop)
        state.global_step = 2
        callback.on_step_end(args, state, control)
        assert control.should_save and control.should_training_stop and control.should_log
        callback.on_train_end(args, state, control)
        after_train(SimpleNamespace(is_world_process_zero=lambda: True))
    assert (info.value.code, info.value.line) == (130, "align: stopped by SIGINT at step 2; checkpoint in "
                                                       f"{os.path.join('out', 'checkpoint-2')}; {RESUME}")


def test_with_weights_pushed_every_3_steps_the_stop_waits_for_a_push(capfd):
    """vllm_sync_steps=3, last push before step 1 (synced at 0): the next generation that pushes is at step 3, so a
    checkpoint at step 1 or 2 would resume with fresher weights in the engine than the run had."""
    sync = WeightSync(engine=None, rollout="vllm", every=3, processes=None)
    sync.synced_step = 0
    args, control = SimpleNamespace(device="cpu", output_dir="out"), TrainerControl()
    state = TrainerState(global_step=1, max_steps=10)
    callback = StopCallback(SimpleNamespace(batch_repeats=1, weight_sync=sync))
    assert [callback.is_stop_point(s) for s in range(1, 7)] == [False, False, True, True, True, True]
    with signals_handled():
        callback.on_train_begin(args, state, control)
        os.kill(os.getpid(), signal.SIGTERM)  # during step 2
        wait_for_handler()
        assert capfd.readouterr().err == SAID.format("SIGTERM", 3)
        state.global_step = 2
        callback.on_step_end(args, state, control)
        assert not control.should_training_stop
        state.global_step = 3
        callback.on_step_end(args, state, control)
        assert control.should_save and control.should_training_stop
        callback.on_train_end(args, state, control)
        with pytest.raises(Stopped, match="at step 3;"):
            after_train(SimpleNamespace(is_world_process_zero=lambda: True))


def test_after_a_loop_the_signal_waits_for_the_stop_point_and_then_stops(capfd):
    args, control, state = SimpleNamespace(device="cpu", output_dir="out"), TrainerControl(), TrainerState()
    state.max_steps = 3
    with signals_handled():
        callback = StopCallback()
        callback.on_train_begin(args, state, control)
        callback.on_train_end(args, state, control)
        stop_point("after x", "cpu", True)  # no signal: nothing happens, and from here a signal stops at once
        callback.on_train_begin(args, state, control)
        callback.on_train_end(args, state, control)
        os.kill(os.getpid(), signal.SIGTERM)  # while the final model is saved
        wait_for_handler()
        assert capfd.readouterr().err.endswith("finishing the save in progress, then stopping "
                                               "(a second signal exits at once)\n")
        with pytest.raises(Stopped) as info:
            stop_point("after training, with the final model saved in out", "cpu", True)
    assert (info.value.code, info.value.line) == (
        143, "align: stopped by SIGTERM after training, with the final model saved in out")


def test_a_forked_worker_keeps_the_default_signal_behaviour():
    """A dataloader worker forked during the run inherits the handler; a SIGTERM to it ends it as it would have
    without align (here: the default action, death by SIGTERM), it neither prints nor raises."""
    with signals_handled():
        pid = os.fork()
        if pid == 0:
            try:
                os.kill(os.getpid(), signal.SIGTERM)
                wait_for_handler()
            finally:
                os._exit(0)  # reached only if the handler returned or raised
        _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGTERM


# --- whole runs ---------------------------------------------------------------------------------------------------

class Run:
    """A training subprocess with its stdout and stderr in ``<name>.log`` (watched while it runs)."""

    def __init__(self, repo: Path, tmp_path: Path, name: str, args: list[str], launcher: list[str] | None = None,
                 env: dict | None = None):
        self.out, self.log = tmp_path / name, tmp_path / f"{name}.log"
        cmd = [*(launcher or [sys.executable, "-m", "align.cli", "train"]), *args, f"output_dir={self.out}"]
        with open(self.log, "w") as log:
            self.proc = subprocess.Popen(cmd, cwd=repo, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                         env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})
        self.started = time.monotonic()

    def text(self) -> str:
        return self.log.read_text()

    def wait_until(self, condition, what: str) -> None:
        while not condition():
            if self.proc.poll() is not None:
                pytest.fail(f"the run ended (status {self.proc.returncode}) before {what}:\n{self.text()[-3000:]}")
            if time.monotonic() - self.started > TIMEOUT:
                self.kill()
                pytest.fail(f"no {what} after {TIMEOUT} s:\n{self.text()[-3000:]}")
            time.sleep(0.02)

    def steps(self) -> list[int]:
        """The steps logged so far (metrics.jsonl lines with a loss)."""
        path = self.out / "metrics.jsonl"
        lines = path.read_text().splitlines() if path.exists() else []
        return [json.loads(x)["step"] for x in lines if x.endswith("}") and '"loss"' in x]

    def wait_for_step(self, step: int = 1) -> None:
        self.wait_until(lambda: step in self.steps(), f"step {step} logged")

    def finish(self) -> int:
        try:
            return self.proc.wait(timeout=max(1, TIMEOUT - (time.monotonic() - self.started)))
        except subprocess.TimeoutExpired:
            self.kill()
            pytest.fail(f"the run hung (killed after {TIMEOUT} s):\n{self.text()[-3000:]}")

    def kill(self) -> None:
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()


def losses(out: Path) -> list[tuple[int, float]]:
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"]) for r in rows if "loss" in r]


def checkpoints(out: Path) -> list[str]:
    return sorted(p.name for p in out.iterdir() if p.name.startswith("checkpoint-"))


def stopped_at(run: Run, signame: str) -> int:
    """The stop's step, checked: status 128 + signal, one stop line naming the checkpoint it wrote, one line when
    the signal arrived announcing that same step, no traceback, and that checkpoint the only one."""
    text = run.text()
    assert run.proc.returncode == 128 + signal.Signals[signame].value, text[-3000:]
    assert "Traceback" not in text
    ((name, step, folder),) = STOP.findall(text)
    ((received, announced),) = RECEIVED.findall(text)
    step = int(step)
    assert (name, received, int(announced)) == (signame, signame, step)
    assert folder == str(run.out / f"checkpoint-{step}")
    assert checkpoints(run.out) == [f"checkpoint-{step}"]
    assert json.loads((run.out / f"checkpoint-{step}" / "trainer_state.json").read_text())["global_step"] == step
    return step


@pytest.mark.slow
@pytest.mark.parametrize("args,max_steps,every,weights", [
    (DPO, 12, 1, "model.safetensors"),
    (GRPO, 8, 2, "model.safetensors"),
], ids=["dpo", "grpo"])
def test_sigterm_checkpoints_the_step_and_resume_matches_the_uninterrupted_run(repo, tmp_path, testbed, args,
                                                                                 max_steps, every, weights):
    args = [*args, f"max_steps={max_steps}"]
    straight = Run(repo, tmp_path, "straight", args)
    stopped = Run(repo, tmp_path, "stopped", args)
    stopped.wait_for_step(1)
    stopped.proc.send_signal(signal.SIGTERM)
    stopped.finish()
    step = stopped_at(stopped, "SIGTERM")
    assert 2 <= step < max_steps and step % every == 0  # RL: the end of a round (2 optimizer steps)
    assert not (stopped.out / weights).exists()  # no final model: the stop is not a finished run
    assert straight.finish() == 0, straight.text()[-3000:]

    resumed = Run(repo, tmp_path, "stopped", [*args, "resume_from_checkpoint=true"])
    assert resumed.finish() == 0, resumed.text()[-3000:]
    assert f"checkpoint-{step}" in resumed.text()  # it said which checkpoint it resumed
    expected = losses(straight.out)
    assert [s for s, _ in expected] == list(range(1, max_steps + 1))
    assert losses(stopped.out) == expected  # every step's loss, bit for bit
    w1, w2 = load_file(str(straight.out / weights)), load_file(str(stopped.out / weights))
    assert w1.keys() == w2.keys() and all(torch.equal(w1[k], w2[k]) for k in w1)


@pytest.mark.slow
def test_sigint_stops_with_130_and_no_traceback(repo, tmp_path, testbed):
    run = Run(repo, tmp_path, "run", [*DPO, "max_steps=40"])
    run.wait_for_step(1)
    run.proc.send_signal(signal.SIGINT)
    run.finish()
    step = stopped_at(run, "SIGINT")
    assert 2 <= step < 40
    assert "KeyboardInterrupt" not in run.text()


# --- a second signal ----------------------------------------------------------------------------------------------

_calls = {"n": 0}


def gated_constant(completions, **_):
    """Reward 1.0; from its second call on it first waits 60 s (a step that cannot finish while the test signals)."""
    _calls["n"] += 1
    if _calls["n"] > 1:
        time.sleep(60)
    return [1.0] * len(completions)


@pytest.mark.slow
def test_second_signal_exits_at_once_without_saving(repo, tmp_path, testbed):
    """Step 2 is held in its reward function: the first SIGTERM is announced, the second ends the process there."""
    args = [*GRPO, "max_steps=4", "num_minibatches=1", "reward_funcs=[test_signals:gated_constant]"]
    run = Run(repo, tmp_path, "run", args, env={"PYTHONPATH": TESTS_PATH})
    run.wait_for_step(1)
    run.proc.send_signal(signal.SIGTERM)
    run.wait_until(lambda: "align: SIGTERM received" in run.text(), "the first signal announced")
    run.proc.send_signal(signal.SIGTERM)
    assert run.finish() == 143
    text = run.text()
    assert RECEIVED.findall(text) == [("SIGTERM", "2")]
    assert text.count("align: second signal (SIGTERM); exiting at once without saving\n") == 1
    assert "align: stopped by" not in text and "Traceback" not in text
    assert checkpoints(run.out) == []


# --- a signal before training -------------------------------------------------------------------------------------

def catches_sigterm(pid: int) -> bool:
    """The process has a SIGTERM handler (bit 15 of SigCgt in /proc/<pid>/status): align's run has begun."""
    status = Path(f"/proc/{pid}/status").read_text()
    caught = int(re.search(r"^SigCgt:\s*([0-9a-f]+)$", status, re.M).group(1), 16)
    return bool(caught >> (signal.SIGTERM - 1) & 1)


@pytest.mark.slow
def test_signal_before_training_exits_at_once_with_one_line(repo, tmp_path, testbed):
    run = Run(repo, tmp_path, "run", [*DPO, "max_steps=4"])
    run.wait_until(lambda: catches_sigterm(run.proc.pid), "a SIGTERM handler")
    run.proc.send_signal(signal.SIGTERM)
    status = run.finish()
    text = run.text()
    assert status == 143, text[-3000:]
    lines = [x for x in text.splitlines() if x.startswith("align:")]
    assert lines == ["align: stopped by SIGTERM outside a training step; nothing saved by this stop"], text[-3000:]
    assert "Traceback" not in text
    assert not run.out.exists() or (checkpoints(run.out) == [] and not (run.out / "metrics.jsonl").exists())


# --- two processes ------------------------------------------------------------------------------------------------

def rank_pid(launcher: int, rank: int) -> int | None:
    """The pid of the worker with ``RANK=rank`` under the launcher process, once it runs."""
    for child in psutil.Process(launcher).children(recursive=True):
        try:
            if child.environ().get("RANK") == str(rank) and "LOCAL_RANK" in child.environ():
                return child.pid
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return None


@pytest.mark.slow
@pytest.mark.parametrize("target", ["rank 1", "launcher"])
def test_two_processes_stop_at_the_same_step(repo, tmp_path, testbed, target):
    """SIGTERM to rank 1 only (rank 0 learns of it in the step-end agreement), or to the launcher (what Kubernetes
    does; it forwards the signal to every worker): both ranks stop at the same step, with one checkpoint."""
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", "configs/accelerate/cpu2.yaml",
                "--num_processes", "2", "--main_process_port", str(free_port()), "recipes/dpo.py"]
    args = [*DPO[1:], "per_device_train_batch_size=2", "max_steps=40"]
    run = Run(repo, tmp_path, "run", args, launcher=launcher)
    run.wait_for_step(1)
    rank1 = rank_pid(run.proc.pid, 1)
    assert rank1 is not None and rank_pid(run.proc.pid, 0) is not None
    os.kill(rank1 if target == "rank 1" else run.proc.pid, signal.SIGTERM)
    assert run.finish() != 0  # a rank that missed the stop would wait in the next step's all-reduce until TIMEOUT
    text = run.text()
    ((name, step, folder),) = STOP.findall(text)  # printed by rank 0 only
    step = int(step)
    assert name == "SIGTERM" and 2 <= step < 40
    # The ranks that received it said so, each naming the step where both stopped.
    assert RECEIVED.findall(text) == [("SIGTERM", str(step))] * (1 if target == "rank 1" else 2)
    assert folder == str(run.out / f"checkpoint-{step}") and checkpoints(run.out) == [f"checkpoint-{step}"]
    saved = run.out / f"checkpoint-{step}"
    assert json.loads((saved / "trainer_state.json").read_text())["global_step"] == step
    assert (saved / "rng_state_0.pth").exists() and (saved / "rng_state_1.pth").exists()  # both ranks saved there
    if target == "rank 1":  # both workers left with 143 (the launcher's failure report gives each rank's status)
        ranks = re.findall(r"rank\s*:\s*(\d) \(local_rank: \d\)\s*\n\s*exitcode\s*:\s*143\b", text)
        assert sorted(ranks) == ["0", "1"], text[-3000:]


# --- the iterative driver (in-process: the signal is sent at an exact point) -----------------------------------

ITERATIVE = ["max_train_samples=16", "max_eval_samples=8", "eval_num_samples=2", "max_steps=8",
             "max_completion_length=12", "per_device_train_batch_size=8", "logging_steps=1", "iterations=2",
             "objective=dpo", "length_alpha=null"]


class SignalAt(TrainerCallback):
    """Sends this process SIGTERM at the end of step ``step`` of iteration ``t``'s round, or (``step`` None) as that
    round's loop ends."""

    def __init__(self, t: int, step: int | None):
        self.round, self.step = os.path.join(f"iter-{t}", "train"), step

    def on_step_end(self, args, state, control, **kwargs):
        if args.output_dir.endswith(self.round) and state.global_step == self.step:
            os.kill(os.getpid(), signal.SIGTERM)

    def on_train_end(self, args, state, control, **kwargs):
        if args.output_dir.endswith(self.round) and self.step is None:
            os.kill(os.getpid(), signal.SIGTERM)


def iterative(repo, out, callbacks=(), extra=()) -> int:
    from align.recipe import Recipe, main
    from align.recipes.iterative_dpo import RECIPE, run

    recipe = Recipe(RECIPE.name, RECIPE.summary, RECIPE.config_class, lambda c: run(c, callbacks=list(callbacks)))
    return main(recipe, ["--config", str(repo / "configs/iterative/testbed-ilr-dpo.yaml"), f"output_dir={out}",
                         *ITERATIVE, *extra])


@pytest.fixture(scope="module")
def iterative_run(repo, tmp_path_factory, testbed):
    out = tmp_path_factory.mktemp("iterative") / "out"
    assert iterative(repo, out) == 0
    return out


@pytest.mark.slow
@pytest.mark.parametrize("t,step,said,stop", [
    (1, 5, "finishing step 5, then saving a checkpoint",
     "at step 5; checkpoint in {out}/iter-1/train/checkpoint-5; resume with resume_from_checkpoint=true"),
    (0, None, "finishing the last step and the save after it, then stopping",
     "after iteration 0, complete in {out}/iter-0; resume with resume_from_checkpoint=true"),
], ids=["mid-round", "between-iterations"])
def test_iterative_driver_stops_cleanly_and_resumes_to_the_same_run(repo, tmp_path, capfd, iterative_run, t, step,
                                                                    said, stop):
    out = tmp_path / "out"
    assert iterative(repo, out, [SignalAt(t, step)]) == 143
    err = capfd.readouterr().err
    lines = [x for x in err.splitlines() if x.startswith("align:")]
    assert lines == [f"align: SIGTERM received; {said} (a second signal exits at once)",
                     "align: stopped by SIGTERM " + stop.format(out=out)], err[-3000:]
    assert (out / "iter-0" / "done").is_file() and not (out / "iter-1" / "done").exists()
    assert sorted(p.name for p in (out / f"iter-{t}" / "train").glob("checkpoint-*")) == (
        ["checkpoint-5"] if step else [])
    assert iterative(repo, out, extra=["resume_from_checkpoint=true"]) == 0
    assert (out / "iterations.jsonl").read_text() == (iterative_run / "iterations.jsonl").read_text()
    w1, w2 = (load_file(str(o / "iter-1" / "model.safetensors")) for o in (out, iterative_run))
    assert w1.keys() == w2.keys() and all(torch.equal(w1[k], w2[k]) for k in w1)
