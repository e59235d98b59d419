"""A free TCP port on localhost, for the tests that start a launcher or a server (tests run in parallel workers, so
no test may count on a fixed port)."""

import socket


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
