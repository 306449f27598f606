"""Disaggregated servers the trainer cannot restart: it waits for their supervisor to restart
them (``RemoteServers``), and its update groups reach them from the right address
(``route_address``). Real HTTP servers on this machine."""

from __future__ import annotations

import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from megatron_sapo.parallel.ports import free_port
from megatron_sapo.rollout.manager import RemoteServers, ServerStartError
from megatron_sapo.rollout.weight_sync import route_address


class Health(BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200 if self.path == "/health" else 404)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args):
        pass


def serve_after(port: int, delay_s: float) -> ThreadingHTTPServer:
    """Start answering /health on ``port`` after ``delay_s`` (a supervisor restarting a server)."""
    holder = {}

    def run():
        time.sleep(delay_s)
        holder["server"] = ThreadingHTTPServer(("127.0.0.1", port), Health)
        holder["server"].serve_forever()

    threading.Thread(target=run, daemon=True).start()
    deadline = time.monotonic() + delay_s + 10
    while "server" not in holder and time.monotonic() < deadline:
        time.sleep(0.05)
    return holder


def test_waits_for_a_server_that_comes_back(capsys):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    watcher = RemoteServers(startup_timeout_s=30, poll_s=0.2)
    started = time.monotonic()
    threading.Thread(target=lambda: serve_after(port, 1.5), daemon=True).start()
    callers = [threading.Thread(target=watcher.ensure_alive, args=(url,)) for _ in range(3)]
    for caller in callers:
        caller.start()
    for caller in callers:
        caller.join(30)
    waited = time.monotonic() - started
    assert 1.4 < waited < 10, waited
    err = capsys.readouterr().err
    # Concurrent callers wait together: one message each way, not one per caller.
    assert err.count(f"rollout server {url} is not answering") == 1
    assert err.count(f"rollout server {url} answers again") == 1
    watcher.ensure_alive(url)  # answering now: returns at once
    assert capsys.readouterr().err == ""


def test_a_server_that_stays_down_stops_the_run_naming_it():
    url = f"http://127.0.0.1:{free_port()}"
    watcher = RemoteServers(startup_timeout_s=1, poll_s=0.2)
    with pytest.raises(ServerStartError, match=f"rollout server {url} did not answer /health for 1 s"):
        watcher.ensure_alive(url)


def test_route_address_is_the_local_end_of_the_route():
    assert route_address("http://127.0.0.1:30000") == "127.0.0.1"
    assert route_address("http://localhost:1") == "127.0.0.1"
