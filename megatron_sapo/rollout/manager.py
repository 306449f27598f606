"""Starts, watches, restarts and stops a set of SGLang servers; never leaves one behind.

Each server runs in its own session (process group) with its output in a log file. Health is
polled on ``/health`` with a time limit; a server that dies during start-up fails the start with
the tail of its log. On shutdown the whole process group is terminated, then killed if it has
not exited within a grace period. Orphans are prevented three ways: :meth:`ServerManager.stop`
runs on exit (``atexit``) and on SIGTERM/SIGINT (unless the caller handles those itself, as the
trainer does: it stops its servers when the run ends), and on Linux each server is started with a
parent-death signal, so even a SIGKILL of the trainer takes its servers down (SGLang's own
workers exit with their parent). Linux sends that signal when the *thread* that started the
server ends, not the process, so servers are always started from a thread that lives as long
as the process: a restart requested from a rollout thread must not die with that thread.
"""

from __future__ import annotations

import atexit
import ctypes
import queue
import os
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path

import requests

from megatron_sapo.rollout.server import ServerOptions, check_servable, server_command, server_env

_PR_SET_PDEATHSIG = 1


class ServerStartError(RuntimeError):
    """A server exited or did not become healthy in time."""


def _die_with_parent() -> None:
    if sys.platform.startswith("linux"):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


class _LastingLauncher:
    """Runs ``subprocess.Popen`` on the main thread or on one daemon thread that is never
    joined, so the parent-death signal of a server fires only when the process ends."""

    def __init__(self) -> None:
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._pid = 0
        self._lock = threading.Lock()

    def popen(self, *args, **kwargs) -> subprocess.Popen:
        if threading.current_thread() is threading.main_thread():
            return subprocess.Popen(*args, **kwargs)
        with self._lock:
            if self._pid != os.getpid():  # first use, or a forked child, which has no such thread
                self._jobs = queue.SimpleQueue()
                threading.Thread(target=self._serve, name="sglang-launcher", daemon=True).start()
                self._pid = os.getpid()
        started: Future = Future()
        self._jobs.put((args, kwargs, started))
        return started.result()

    def _serve(self) -> None:
        jobs = self._jobs
        while True:
            args, kwargs, started = jobs.get()
            try:
                started.set_result(subprocess.Popen(*args, **kwargs))
            except BaseException as err:
                started.set_exception(err)


_launcher = _LastingLauncher()


@dataclass
class _Running:
    options: ServerOptions
    log_path: Path
    process: subprocess.Popen | None = None
    restarts: int = 0


class ServerManager:
    def __init__(self, servers: list[ServerOptions], log_dir: str | Path, *, startup_timeout_s: float = 600.0,
                 max_restarts: int = 3, grace_s: float = 20.0, handle_signals: bool = True) -> None:
        """``handle_signals``: stop the servers on SIGTERM/SIGINT, then exit (or call the handler
        that was installed before); off for a caller that handles those signals itself."""
        if not servers:
            raise ValueError("ServerManager needs at least one server")
        ports = [(s.host, s.port) for s in servers]
        if len(set(ports)) != len(ports):
            raise ValueError(f"two servers share an address: {ports}")
        self.log_dir = Path(log_dir)
        self.startup_timeout_s = startup_timeout_s
        self.max_restarts = max_restarts
        self.grace_s = grace_s
        self._servers = [_Running(s, self.log_dir / f"sglang-{s.port}.log") for s in servers]
        self._lock = threading.Lock()
        self.handle_signals = handle_signals
        self._previous_handlers: dict[int, object] = {}

    @property
    def urls(self) -> list[str]:
        return [s.options.url for s in self._servers]

    # ---- lifecycle ------------------------------------------------------------------------------

    def start(self) -> "ServerManager":
        """Launch every server and wait until all are healthy."""
        for server in self._servers:
            check_servable(server.options.model)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        atexit.register(self.stop)
        self._install_signal_handlers()
        for server in self._servers:
            self._launch(server)
        try:
            for server in self._servers:
                self._wait_healthy(server)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """Terminate every server (idempotent)."""
        with self._lock:
            for server in self._servers:
                self._terminate(server)
        self._restore_signal_handlers()

    def __enter__(self) -> "ServerManager":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # ---- failures -------------------------------------------------------------------------------

    def alive(self, url: str) -> bool:
        server = self._by_url(url)
        return server.process is not None and server.process.poll() is None

    def ensure_alive(self, url: str) -> None:
        """Restart the server at ``url`` if its process has exited (the client's failure hook)."""
        with self._lock:
            server = self._by_url(url)
            if server.process is not None and server.process.poll() is None:
                return
            if server.restarts >= self.max_restarts:
                raise ServerStartError(f"{url} died again after {server.restarts} restarts; see {server.log_path}")
            server.restarts += 1
            self._launch(server)
            self._wait_healthy(server)

    def pids(self) -> list[int]:
        return [s.process.pid for s in self._servers if s.process is not None]

    # ---- internals ------------------------------------------------------------------------------

    def _by_url(self, url: str) -> _Running:
        for server in self._servers:
            if server.options.url == url.rstrip("/"):
                return server
        raise KeyError(f"no managed server at {url}")

    def _launch(self, server: _Running) -> None:
        opts = server.options
        with open(server.log_path, "a") as log:
            log.write(f"\n==== megatron-sapo: starting {' '.join(server_command(opts))}\n")
            log.flush()
            server.process = _launcher.popen(
                server_command(opts), env=server_env(opts), stdout=log, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL, start_new_session=True, preexec_fn=_die_with_parent)

    def _wait_healthy(self, server: _Running) -> None:
        deadline = time.monotonic() + self.startup_timeout_s
        url = server.options.url
        while time.monotonic() < deadline:
            if server.process.poll() is not None:
                raise ServerStartError(f"SGLang server {url} exited with code {server.process.returncode} during "
                                       f"start-up; last lines of {server.log_path}:\n{self._tail(server)}")
            if _healthy(url):
                return
            time.sleep(1.0)
        raise ServerStartError(f"SGLang server {url} not healthy after {self.startup_timeout_s:.0f} s; last lines "
                               f"of {server.log_path}:\n{self._tail(server)}")

    def _terminate(self, server: _Running) -> None:
        process = server.process
        if process is None:
            return
        server.process = None
        if process.poll() is None:
            self._signal_group(process.pid, signal.SIGTERM)
            try:
                process.wait(timeout=self.grace_s)
            except subprocess.TimeoutExpired:
                pass
        # SGLang's workers share the server's process group; take down any that outlived it.
        self._signal_group(process.pid, signal.SIGKILL)
        try:
            process.wait(timeout=self.grace_s)
        except subprocess.TimeoutExpired:
            pass

    @staticmethod
    def _signal_group(pgid: int, sig: int) -> None:
        try:
            os.killpg(pgid, sig)
        except ProcessLookupError:
            pass

    @staticmethod
    def _tail(server: _Running, lines: int = 30) -> str:
        try:
            return "\n".join(server.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def _install_signal_handlers(self) -> None:
        if not self.handle_signals or threading.current_thread() is not threading.main_thread():
            return
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous_handlers[sig] = signal.signal(sig, self._on_signal)

    def _restore_signal_handlers(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        for sig, handler in self._previous_handlers.items():
            signal.signal(sig, handler)
        self._previous_handlers.clear()

    def _on_signal(self, signum, frame) -> None:
        previous = self._previous_handlers.get(signum)
        self.stop()
        if callable(previous):
            previous(signum, frame)
        else:
            raise SystemExit(128 + signum)


class RemoteServers:
    """Servers someone else runs (``rollout.mode = "disaggregated"``): the trainer cannot restart
    them, but their supervisor can (``examples/slurm/serve_node.sh`` restarts a server that
    exits). :meth:`ensure_alive`, the client's failure hook and the check before each weight
    sync, waits for a server that stopped answering to come back, so a restarted rollout node
    costs the run a wait, not the run; the restarted server serves its start weights, which the
    trainer detects (weight versions) and replaces before sampling again."""

    def __init__(self, startup_timeout_s: float, poll_s: float = 2.0) -> None:
        self.startup_timeout_s = startup_timeout_s
        self.poll_s = poll_s
        self._locks: dict[str, threading.Lock] = {}
        self._guard = threading.Lock()

    def ensure_alive(self, url: str) -> None:
        """Return once ``url`` answers ``/health``; ServerStartError, naming it, after
        ``startup_timeout_s`` without an answer. Concurrent callers for one server wait together."""
        with self._guard:
            lock = self._locks.setdefault(url, threading.Lock())
        with lock:
            if _healthy(url):
                return
            print(f"rollout server {url} is not answering: waiting up to {self.startup_timeout_s:.0f} s "
                  "(rollout.startup_timeout_s) for it to come back", file=sys.stderr, flush=True)
            start = time.monotonic()
            while time.monotonic() - start < self.startup_timeout_s:
                time.sleep(self.poll_s)
                if _healthy(url):
                    print(f"rollout server {url} answers again after {time.monotonic() - start:.0f} s",
                          file=sys.stderr, flush=True)
                    return
            raise ServerStartError(f"rollout server {url} did not answer /health for {self.startup_timeout_s:.0f} s "
                                   "(rollout.startup_timeout_s); see the logs of the node that runs it")

    def stop(self) -> None:
        """Nothing to stop: the servers belong to whoever started them."""


def _healthy(url: str) -> bool:
    try:
        return requests.get(f"{url}/health", timeout=5).status_code == 200
    except requests.RequestException:
        return False
