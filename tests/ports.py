"""Free loopback ports for the servers the tests start (Ray heads and nodes, moto, Serve)."""

from __future__ import annotations

import contextlib
import socket


def free_ports(count: int) -> list[int]:
    """``count`` distinct free ports on 127.0.0.1. Every socket stays bound until all are chosen: a port
    picked and released at once may be handed out again by the next pick (a Ray head once got the same
    port for its GCS and its dashboard agent, and died)."""
    with contextlib.ExitStack() as stack:
        sockets = [stack.enter_context(socket.socket()) for _ in range(count)]
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]


def free_port() -> int:
    return free_ports(1)[0]
