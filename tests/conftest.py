import os

# No network, ever: every test runs on the embedded testbed.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("DISABLE_MLFLOW_INTEGRATION", "TRUE")
os.environ.setdefault("WANDB_DISABLED", "true")
# Under pytest-xdist (the README's `-n 2`) each worker, and every process it launches, computes on one thread: two
# workers with torch's default of one OpenMP thread per core oversubscribe the cores, and spinning OpenMP threads
# then slow every test several-fold.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ["OMP_NUM_THREADS"] = "1"  # (not MKL_NUM_THREADS: vLLM's CPU attention then disagrees on threads)

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def testbed():
    """The cached testbed (built once per machine and spec; shared by all tests and processes)."""
    from align.testbed.build import ensure_testbed

    return ensure_testbed(progress=False)


@pytest.fixture(scope="session")
def tiny_classifier(testbed, tmp_path_factory):
    """A 1-label sequence classifier with the testbed's tokenizer and random weights, saved as a model folder (a
    ``model:`` reward, a ``pairwise:`` judge)."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForSequenceClassification

    tok = AutoTokenizer.from_pretrained(testbed.policy)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=2, num_labels=1, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("rm")
    LlamaForSequenceClassification(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def repo():
    return REPO


@pytest.fixture(scope="module")
def single_thread():
    """One intra-op thread for a module of tiny forwards: they only lose to thread hand-offs on a shared 2-core
    machine (idle OpenMP threads cost up to 20x on a busy one)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def no_model_loads(monkeypatch):
    """Any attempt to load weights fails the test: errors must come first."""
    import align.modeling

    def boom(*a, **k):
        raise AssertionError("a model was loaded before the bad input was reported")

    monkeypatch.setattr(align.modeling, "load_model", boom)
    monkeypatch.setattr(align.modeling, "load_tokenizer", boom)


FOLDER_MARKS = {"unit": ("unit",), "integration": ("integration",), "distributed": ("distributed", "slow"),
                "vllm": ("vllm", "slow")}


def pytest_collection_modifyitems(config, items):
    """Each test carries its folder's markers (tests/<folder>/...): ``-m unit``, ``-m "not slow"`` (the fast lane:
    unit tests and the quick integration tests; distributed and vLLM tests are all slow)."""
    tests = Path(__file__).resolve().parent
    for item in items:
        try:
            folder = Path(str(item.fspath)).resolve().relative_to(tests).parts[0]
        except ValueError:
            continue
        for name in FOLDER_MARKS.get(folder, ()):
            item.add_marker(getattr(pytest.mark, name))
        if folder == "vllm":  # under pytest-xdist (-n 2 --dist loadgroup): one worker, so one engine and one server
            item.add_marker(pytest.mark.xdist_group("vllm"))


def pytest_sessionfinish(session, exitstatus):
    # An empty selection (-k that matches nothing) is not a failure of the suite.
    if exitstatus == pytest.ExitCode.NO_TESTS_COLLECTED:
        session.exitstatus = pytest.ExitCode.OK


def pytest_configure(config):
    if os.environ.get("PYTEST_XDIST_WORKER"):  # see OMP_NUM_THREADS above; torch may already be imported
        import torch

        torch.set_num_threads(1)
