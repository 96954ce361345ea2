"""The Actor base: a status lifecycle, a TaskGroup of loops, drain or abort on stop.

    created -> starting -> running -> stopping -> stopped
                                   \\-> failed (a loop raised; logged with its cause)

A subclass opens what it needs in `setup`, names its loops in `loops`, finishes in-flight work
in `drain` (stop mode "drain"; skipped on "abort") and closes what it opened, in reverse
order, in `teardown` (always called). Every status change is logged with its cause; a failure
is logged at error level with the exception that caused it (the first of a TaskGroup's, not
the group), its type, message and traceback; a teardown that raises is logged too.

Readiness is one thing: `serving`, an Event, with `ready_info()` saying where (what a
launching parent is told, p3.nodes.actor.process). An actor serves once `setup` returns,
unless it sets `serves_after_setup = False` and calls `mark_serving()` itself (a node: once
its engine is loaded and Ready sent). A stop() before run() is kept: run() then stops at once.
Background work lives in `loops`, the TaskGroup: a loop that raises fails the actor, loudly.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from enum import Enum
from typing import Any, get_args

from p3.log import get_logger, log_exception
from p3.protocol.messages import StopMode

log = get_logger(__name__)

STOP_MODES: tuple[StopMode, ...] = get_args(StopMode)


class Status(Enum):
    CREATED = "created"
    STARTING = "starting"
    RUNNING = "running"
    STOPPING = "stopping"
    STOPPED = "stopped"
    FAILED = "failed"


class Actor:
    kind = "actor"
    serves_after_setup = True

    def __init__(self, name: str):
        self.name = name
        self.status = Status.CREATED
        self.stop_mode: StopMode = "drain"
        self.serving = asyncio.Event()  # the one readiness signal (see mark_serving)
        self._stop_requested = asyncio.Event()  # binds to a loop only when first awaited
        self._ended = asyncio.Event()

    # -- for subclasses -------------------------------------------------------------------

    async def setup(self) -> None:
        """Open sockets, start threads: whatever the loops need."""

    def loops(self) -> list[Coroutine[Any, Any, None]]:
        return []

    async def drain(self) -> None:
        """Finish in-flight work (stop mode "drain")."""

    async def teardown(self) -> None:
        """Close what setup opened, in reverse order. Always called, also after a failure."""

    def ready_info(self) -> dict[str, Any]:
        """What a launching parent is told once this actor serves (its address, say)."""
        return {}

    # -- lifecycle ------------------------------------------------------------------------

    def mark_serving(self) -> None:
        self.serving.set()

    async def run(self) -> None:
        """Run until stop() or a loop fails; teardown always runs once setup began."""
        if self._stop_requested.is_set():  # stopped before it ran: nothing to open or close
            self._set_status(Status.STOPPED, f"stop ({self.stop_mode}) before run")
            self._ended.set()
            return
        self._set_status(Status.STARTING, "run")
        try:
            await self.setup()
            self._set_status(Status.RUNNING, "setup done")
            if self.serves_after_setup:
                self.mark_serving()
            await self._run_loops()
        except BaseException as exc:
            self._record_failure(exc)
            raise
        finally:
            await self._teardown()
            self._ended.set()
        self._set_status(Status.STOPPED, f"stop ({self.stop_mode})")

    async def wait_ready(self, timeout_s: float = 30.0) -> None:
        """Until the actor serves; RuntimeError if it ended first."""
        async with asyncio.timeout(timeout_s):
            serving = asyncio.ensure_future(self.serving.wait())
            ended = asyncio.ensure_future(self._ended.wait())
            try:
                await asyncio.wait((serving, ended), return_when=asyncio.FIRST_COMPLETED)
            finally:
                serving.cancel()
                ended.cancel()
        if not self.serving.is_set():
            raise RuntimeError(f"{self.kind} {self.name} did not start: {self.status.value}")

    def stop(self, mode: StopMode = "drain") -> None:
        """Ask the actor to stop: "drain" finishes in-flight work first, "abort" does not."""
        if mode not in STOP_MODES:
            raise ValueError(f"stop mode must be 'drain' or 'abort', got {mode!r}")
        self.stop_mode = mode
        self._stop_requested.set()

    @property
    def stop_requested(self) -> bool:
        return self._stop_requested.is_set()

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

    def _record_failure(self, exc: BaseException) -> None:
        cause = root_cause(exc)
        self._set_status(Status.FAILED, f"{type(cause).__name__}: {cause}")
        if isinstance(cause, Exception):  # not a cancellation or an interpreter exit
            log_exception(log, f"{self.kind}.failed", cause, name=self.name)

    async def _teardown(self) -> None:
        try:
            await self.teardown()
        except Exception as exc:  # noqa: BLE001 - logged, and the stop goes on
            log_exception(log, f"{self.kind}.teardown_failed", exc, name=self.name)

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


def root_cause(exc: BaseException) -> BaseException:
    """The first leaf exception of (nested) exception groups; exc itself otherwise."""
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        exc = exc.exceptions[0]
    return exc
