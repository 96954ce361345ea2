"""Spawn named child processes, wait for each to say it is ready, make them die with us.

Readiness protocol: a child prints one line `P3_READY {json}` on its stdout when it serves
(`announce_ready`), e.g. `P3_READY {"kind": "coordinator", "address": "tcp://127.0.0.1:41234"}`.
The parent reads each child's stdout and stderr on a thread (forwarding them, prefixed with
the child's name, and keeping the last stderr lines). A child may also have to answer an HTTP
probe (`ready_url`: the edge's GET /ready, which also means it has routes). A child that exits
or stays silent past the timeout fails the launch with its name and last stderr lines.

Dying with the parent: a child calls `watch_parent()` first thing (the CLI does when
$P3_PARENT_PID is set): prctl(PR_SET_PDEATHSIG, SIGTERM) on Linux, plus a watchdog thread
that notices a changed parent pid (covering the race before prctl, and other systems).
prctl runs in the child itself rather than in preexec_fn: preexec_fn is unsafe once the
parent runs threads (it does: two per child, forwarding output).
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.parse
import urllib.request
from collections import deque
from typing import TextIO

READY_MARKER = "P3_READY "
PARENT_PID_ENV = "P3_PARENT_PID"
PR_SET_PDEATHSIG = 1


class LaunchError(RuntimeError):
    pass


# -- child side ----------------------------------------------------------------------------


def announce_ready(kind: str, **info) -> None:
    """Tell a launching parent (or a script reading our stdout) that this process serves."""
    print(READY_MARKER + json.dumps({"kind": kind, **info}), flush=True)


def watch_parent() -> None:
    """SIGTERM this process when the launching parent dies (no-op when not launched)."""
    expected = os.environ.get(PARENT_PID_ENV)
    if not expected:
        return
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    thread = threading.Thread(
        target=_watchdog, args=(int(expected),), name="p3-parent-watchdog", daemon=True
    )
    thread.start()


def _watchdog(parent_pid: int, interval_s: float = 0.5, grace_s: float = 30.0) -> None:
    while os.getppid() == parent_pid:
        time.sleep(interval_s)
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(grace_s)  # the drain is bounded; this is the bound on the bound
    os._exit(1)


# -- parent side ---------------------------------------------------------------------------


class Child:
    """One named child process, its readiness, and the tail of its stderr."""

    def __init__(
        self,
        name: str,
        argv: list[str],
        ready_url: str | None = None,
        env: dict[str, str] | None = None,
        output: TextIO | None = None,
        ready_path: str | None = None,
    ):
        """output: where its lines go (default: ours, stdout and stderr), name-prefixed.
        ready_url: GET it until 200 once the child announced itself; ready_path: the same at
        the url the child announced (one that bound port 0 tells it only then)."""
        self.name = name
        self._output = output
        self.argv = argv
        self.ready_url = ready_url
        self.ready_path = ready_path
        self.info: dict | None = None  # what it announced
        self.probed = ready_url is None and ready_path is None
        self.tail: deque[str] = deque(maxlen=30)
        self.proc = subprocess.Popen(
            argv,
            env={**os.environ, **(env or {}), PARENT_PID_ENV: str(os.getpid())},
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            process_group=0,  # terminal signals reach the parent only; it stops children in order
            text=True,
            errors="replace",
        )
        self._pumps = [
            threading.Thread(target=self._pump_stdout, daemon=True),
            threading.Thread(target=self._pump_stderr, daemon=True),
        ]
        for pump in self._pumps:
            pump.start()

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def is_ready(self) -> bool:
        return self.info is not None and self.probed

    def _pump_stdout(self) -> None:
        for line in self.proc.stdout:
            if line.startswith(READY_MARKER) and self.info is None:
                with contextlib.suppress(ValueError):
                    self.info = json.loads(line[len(READY_MARKER) :])
                    continue
            (self._output or sys.stdout).write(f"[{self.name}] {line}")

    def _pump_stderr(self) -> None:
        for line in self.proc.stderr:
            self.tail.append(line.rstrip("\n"))
            (self._output or sys.stderr).write(f"[{self.name}] {line}")

    def probe(self) -> None:
        """GET ready_url once; 200 means ready."""
        if self.probed or self.info is None:
            return
        url = self.ready_url or dialable(f"{self.info.get('url', '')}{self.ready_path}")
        with contextlib.suppress(OSError, ValueError), urllib.request.urlopen(url, timeout=1) as r:
            self.probed = r.status == 200

    def describe_failure(self, what: str) -> str:
        if self.proc.poll() is not None:
            self._pumps[1].join(timeout=1.0)
        lines = "\n".join(f"    {line}" for line in self.tail) or "    (nothing)"
        return f"{self.name} (pid {self.pid}) {what}; its last stderr lines:\n{lines}"

    def signal(self, signum: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            self.proc.send_signal(signum)


def wait_ready(
    children: list[Child], timeout_s: float, poll_s: float = 0.05, num_spare: int = 0
) -> None:
    """Block until every child is ready, or all but num_spare of them (spare nodes announce
    nothing until they are placed); LaunchError naming the first that was not."""
    deadline = time.monotonic() + timeout_s
    pending = list(children)
    while len(pending) > num_spare:
        for child in list(pending):
            child.probe()
            if child.is_ready:
                pending.remove(child)
            elif child.proc.poll() is not None:
                what = f"exited with code {child.proc.returncode} before it was ready"
                raise LaunchError(child.describe_failure(what))
        if len(pending) > num_spare and time.monotonic() > deadline:
            raise LaunchError(pending[0].describe_failure(f"not ready after {timeout_s:g}s"))
        if len(pending) > num_spare:
            time.sleep(poll_s)  # a bounded poll of the children's state, not a readiness guess


def stop_all(children: list[Child], timeout_s: float = 30.0) -> None:
    """SIGTERM (drain) in order, wait up to timeout_s in all, then SIGKILL what is left.
    Nodes next to each other in the order stop together (each drains its own work)."""
    deadline = time.monotonic() + timeout_s
    for stage in _stages(children):
        for child in stage:
            child.signal(signal.SIGCONT)  # a stopped child cannot act on SIGTERM
            child.signal(signal.SIGTERM)
        for child in stage:
            with contextlib.suppress(subprocess.TimeoutExpired):
                child.proc.wait(timeout=max(0.0, deadline - time.monotonic()))
    for child in children:
        if child.proc.poll() is None:
            child.signal(signal.SIGKILL)
            child.proc.wait()


def _stages(children: list[Child]) -> list[list[Child]]:
    stages: list[list[Child]] = []
    for child in children:
        if stages and child.name.startswith("node-") and stages[-1][-1].name.startswith("node-"):
            stages[-1].append(child)
        else:
            stages.append([child])
    return stages


def dialable(url: str, host: str = "127.0.0.1") -> str:
    """url (tcp:// or http://) with a listen-on-all host (0.0.0.0, ::, *) replaced by host, one
    to dial (default: this machine's loopback); other urls as they are."""
    parts = urllib.parse.urlsplit(url)
    if parts.hostname not in ("0.0.0.0", "::", "*") or parts.port is None:
        return url
    return parts._replace(netloc=f"{host}:{parts.port}").geturl()


def free_port(host: str) -> int:
    """A port free now, for a process that must be told its port before it starts (another
    may take it meanwhile: where the process can bind port 0 itself and tell, let it)."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def python_m_p3(*args: str) -> list[str]:
    return [sys.executable, "-m", "p3", *args]
