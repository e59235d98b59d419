"""A free TCP port on localhost, for the tests that start a launcher or a server (tests run in parallel workers, so
no test may count on a fixed port)."""

import socket

_GIVEN: set[int] = set()  # ports this process already handed out: the OS may offer a closed one again at once


def free_port() -> int:
    """A port free now and not handed out before in this process (a test that asks for two, say a launcher's and a
    weight group's, gets two different ones)."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port not in _GIVEN:
            _GIVEN.add(port)
            return port
