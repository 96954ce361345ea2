"""The Actor base: a status lifecycle, a TaskGroup of loops, drain or abort on stop.

    created -> starting -> running -> stopping -> stopped
                                   \\-> failed (a loop raised; logged with its cause)

A subclass opens what it needs in `setup`, names its loops in `loops`, finishes in-flight work
in `drain` (stop mode "drain"; skipped on "abort") and closes what it opened, in reverse
order, in `teardown` (always called). Every status change is logged with its cause.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Coroutine
from enum import Enum
from typing import Any

from p3.log import get_logger

log = get_logger(__name__)


class Status(Enum):
    CREATED = "created"
    STARTING = "starting"
    RUNNING = "running"
    STOPPING = "stopping"
    STOPPED = "stopped"
    FAILED = "failed"


class Actor:
    kind = "actor"

    def __init__(self, name: str):
        self.name = name
        self.status = Status.CREATED
        self.stop_mode = "drain"
        self._stop_requested: asyncio.Event | None = None
        self._ready = asyncio.Event()

    # -- for subclasses -------------------------------------------------------------------

    async def setup(self) -> None:
        """Open sockets, start threads: whatever the loops need."""

    def loops(self) -> list[Coroutine[Any, Any, None]]:
        return []

    async def drain(self) -> None:
        """Finish in-flight work (stop mode "drain")."""

    async def teardown(self) -> None:
        """Close what setup opened, in reverse order. Always called, also after a failure."""

    # -- lifecycle ------------------------------------------------------------------------

    async def run(self) -> None:
        """Run until stop() or a loop fails; teardown always runs."""
        self._stop_requested = asyncio.Event()
        self._set_status(Status.STARTING, "run")
        try:
            await self.setup()
            self._set_status(Status.RUNNING, "setup done")
            self._ready.set()
            await self._run_loops()
        except BaseException as exc:
            self._set_status(Status.FAILED, f"{type(exc).__name__}: {exc}")
            raise
        finally:
            self._ready.set()
            with contextlib.suppress(Exception):
                await self.teardown()
        self._set_status(Status.STOPPED, f"stop ({self.stop_mode})")

    async def wait_ready(self, timeout_s: float = 30.0) -> None:
        async with asyncio.timeout(timeout_s):
            await self._ready.wait()
        if self.status is not Status.RUNNING:
            raise RuntimeError(f"{self.kind} {self.name} did not start: {self.status.value}")

    def stop(self, mode: str = "drain") -> None:
        """Ask the actor to stop: "drain" finishes in-flight work first, "abort" does not."""
        if mode not in ("drain", "abort"):
            raise ValueError(f"stop mode must be 'drain' or 'abort', got {mode!r}")
        self.stop_mode = mode
        if self._stop_requested is not None:
            self._stop_requested.set()

    @property
    def is_running(self) -> bool:
        return self.status is Status.RUNNING

    async def _run_loops(self) -> None:
        async with asyncio.TaskGroup() as group:
            tasks = [
                group.create_task(loop, name=f"{self.name}.{loop.__name__}")
                for loop in self.loops()
            ]
            stop = group.create_task(self._stop_requested.wait(), name=f"{self.name}.stop")
            await stop
            self._set_status(Status.STOPPING, f"stop requested ({self.stop_mode})")
            if self.stop_mode == "drain":
                await self.drain()
            for task in tasks:
                task.cancel()

    def _set_status(self, status: Status, cause: str) -> None:
        if status is self.status:
            return
        log.info(
            f"{self.kind}.status",
            name=self.name,
            old=self.status.value,
            new=status.value,
            cause=cause,
        )
        self.status = status
