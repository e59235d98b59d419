import os

# No network, ever: every test runs on the embedded testbed.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("DISABLE_MLFLOW_INTEGRATION", "TRUE")
os.environ.setdefault("WANDB_DISABLED", "true")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def testbed():
    """The cached testbed (built once per machine and spec; shared by all tests and processes)."""
    from align.testbed.build import ensure_testbed

    return ensure_testbed(progress=False)


@pytest.fixture(scope="session")
def repo():
    return REPO


def pytest_sessionfinish(session, exitstatus):
    # An empty selection (-k that matches nothing) is not a failure of the suite.
    if exitstatus == pytest.ExitCode.NO_TESTS_COLLECTED:
        session.exitstatus = pytest.ExitCode.OK
