"""The one way this project picks a TCP port for a server or a rendezvous it starts."""

from __future__ import annotations

import os
import socket


def free_port(first: int = 20000, last: int = 32767, host: str = "127.0.0.1") -> int:
    """A port in ``[first, last)`` that is free now. The default range lies below Linux's
    ephemeral one (32768+): whoever uses the port binds it only later (a server after its
    start-up, torch's store after the launch), and a port from the ephemeral range could
    meanwhile be handed to any outgoing connection on the machine. The search starts at a
    point derived from the process id, so processes started together rarely collide."""
    start = first + os.getpid() % (last - first)
    for offset in range(last - first):
        port = first + (start - first + offset) % (last - first)
        with socket.socket() as sock:
            try:
                sock.bind((host, port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free port in {first}-{last - 1} on {host}")


__all__ = ["free_port"]
