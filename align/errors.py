"""The errors `align` raises for bad input: each message is one line naming the culprit."""

import os
import sys


class AlignError(Exception):
    """Base class: the CLI and recipes print ``error: <message>`` and exit with status 2."""


class ConfigError(AlignError):
    """A config key that does not exist, a value of the wrong type, or an impossible combination."""


class DataError(AlignError):
    """A dataset that is missing, malformed, or has a bad row (the message names row and column)."""


class TrainingError(AlignError):
    """Training cannot go on (e.g. a non-finite loss); the message names the step."""


class ServerUnavailable(TrainingError):
    """The rollout server did not answer (down, dead, silent past the timeout, busy past the request's bound, or a
    weight broadcast to it broke off); the message names the server and what was being waited for."""


class HubError(AlignError):
    """A push to the Hugging Face Hub failed (no network, no token, refused, server down); the message names the
    repository and the cause, and the run's local output is intact."""


def print_error(err: BaseException) -> None:
    """Print ``error: <message>`` as one write of one line: the processes of a launch share the terminal's stderr,
    and a line written in pieces (``print`` writes the text and the newline apart) can interleave with another
    process's copy of it. A write of under 4 KiB to a pipe is atomic."""
    sys.stderr.flush()
    data = f"error: {err}\n".encode()
    try:
        os.write(sys.stderr.fileno(), data)
    except (AttributeError, OSError, ValueError):  # a stderr without a file descriptor (pytest's capsys)
        sys.stderr.write(data.decode())
        sys.stderr.flush()
