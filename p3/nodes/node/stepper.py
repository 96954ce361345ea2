"""The node's compute thread: builds the engine, then runs Engine.step while there is work and
sleeps on an Event when not.

Every torch op of the node runs on this one thread. libgomp gives each thread that enters a
parallel region its own team; with a second live team in the process (the main thread's, or
an executor thread's that loaded the model) every region on this thread ran 1.6-2.7x slower
(measured: a 15-token prefill 41-62 ms against 25 ms, a one-row packed linear 85 against 32
us). So the engine is built here, and the event loop only reads its counters.

The event loop never steps the engine; it calls `wake()` after add/cancel. Each step's
outputs go back to the loop with `call_soon_threadsafe`. An exception inside a step is
fatal: it is handed to the loop (which sends Fatal and exits) and the thread ends.

Fault points for chaos and tests (real code paths, not mocks): `faults.hang()` blocks the
thread inside its next step until `faults.release()`, `faults.raise_next()` raises inside
it; env P3_FAULT_HANG_STEP=N and P3_FAULT_RAISE_STEP=N hang or raise at step N. A node
started with P3_FAULT_SIGNALS=1 arms them at run time: SIGUSR1 raises in the next step,
SIGUSR2 hangs it (chaos runs use both).
"""

from __future__ import annotations

import asyncio
import os
import threading
import time
from collections.abc import Callable

import torch

from p3.engine.engine import Engine
from p3.engine.sequence import StepOutput
from p3.log import get_logger

log = get_logger(__name__)


class StepFaults:
    def __init__(self, hang_at_step: int | None = None, raise_at_step: int | None = None):
        self.hang_at_step = hang_at_step
        self.raise_at_step = raise_at_step
        self._hang = threading.Event()
        self._release = threading.Event()
        self._raise = threading.Event()

    @classmethod
    def from_env(cls) -> StepFaults:
        def step(name: str) -> int | None:
            value = os.environ.get(name)
            return int(value) if value else None

        return cls(step("P3_FAULT_HANG_STEP"), step("P3_FAULT_RAISE_STEP"))

    def hang(self) -> None:
        """Block the step thread inside its next step (until release)."""
        self._release.clear()
        self._hang.set()

    def raise_next(self) -> None:
        """Raise inside the next step (as a kernel or engine bug would)."""
        self._raise.set()

    def release(self) -> None:
        self._hang.clear()
        self._release.set()

    def before_step(self, step: int) -> None:
        if self._hang.is_set() or step == self.hang_at_step:
            log.warning("node.fault_hang", step=step)
            self._release.wait()
        if step == self.raise_at_step or self._raise.is_set():
            raise RuntimeError(f"injected fault at step {step}")


ALLOWANCE_FACTOR = 4.0  # a step may take this many times what its tokens should
MAX_ALLOWANCE_S = 600.0


class StepSpeed:
    """Seconds per token this node's steps take (a moving average of the steps that ran
    tokens), and so how long a step of a given token budget may take before it is a hang."""

    def __init__(self, weight: float = 0.2):
        self.weight = weight
        self.seconds_per_token: float | None = None

    def record(self, num_tokens: int, seconds: float) -> None:
        if num_tokens <= 0:
            return
        rate = seconds / num_tokens
        old = self.seconds_per_token
        self.seconds_per_token = rate if old is None else old + self.weight * (rate - old)

    def allowance_s(self, budget_tokens: int) -> float:
        """0 until measured; then ALLOWANCE_FACTOR x the budget at the measured rate."""
        if self.seconds_per_token is None:
            return 0.0
        return min(MAX_ALLOWANCE_S, ALLOWANCE_FACTOR * budget_tokens * self.seconds_per_token)


class StepThread:
    def __init__(
        self,
        build: Callable[[], Engine],
        loop: asyncio.AbstractEventLoop,
        on_ready: Callable[[Engine], None],
        on_outputs: Callable[[int, list[StepOutput], float], None],  # step, outputs, its start
        on_fatal: Callable[[BaseException], None],
        on_released: Callable[[], None] | None = None,  # a follower's leader let it go
        faults: StepFaults | None = None,
    ):
        self.engine: Engine | None = None
        self._build = build
        self._on_ready = on_ready
        self.on_released = on_released
        self.faults = faults or StepFaults()
        self.in_step = False
        self.last_step_at = time.monotonic()
        self.speed = StepSpeed()
        self._loop = loop
        self._on_outputs = on_outputs
        self._on_fatal = on_fatal
        self._wake = threading.Event()
        self._stopping = False
        self._threads_wanted = 0  # 0: as the engine set them
        self.threads_in_use = 0  # once the engine is built
        self._thread = threading.Thread(target=self._run, name="p3-step", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def wake(self) -> None:
        self._wake.set()

    def set_threads(self, num_threads: int) -> None:
        """Compute with num_threads from the next step on (set on this thread: libgomp's
        thread count is the calling thread's)."""
        self._threads_wanted = num_threads
        self._wake.set()

    def stop(self, timeout_s: float = 5.0) -> None:
        """Ask the thread to end after its current step (blocking: call it off the loop)."""
        self._stopping = True
        self.faults.release()
        self._wake.set()
        if self.engine is not None and not self.engine.shard.is_leader:
            return  # blocked in its leader's next broadcast: it ends with the process
        self._thread.join(timeout_s)
        if self._thread.is_alive():
            log.warning("node.step_thread_stuck", timeout_s=timeout_s)

    def _run(self) -> None:
        try:
            self.engine = self._build()
        except BaseException as exc:  # noqa: BLE001 - a model that cannot load fails the node
            self._hand_to_loop(self._on_fatal, exc)
            return
        self.threads_in_use = torch.get_num_threads()
        self._hand_to_loop(self._on_ready, self.engine)
        try:
            if not self.engine.shard.is_leader:
                self._follow()
                return
            while not self._stopping:
                self._wake.clear()
                self._apply_threads()
                if not self.engine.has_unfinished():
                    self._wake.wait()
                    continue
                self._step_once()
            self._release_followers()
        except BaseException as exc:  # noqa: BLE001 - any error in a step is node-fatal
            log.exception("node.step_failed", error=repr(exc))
            self._hand_to_loop(self._on_fatal, exc)

    def _release_followers(self) -> None:
        """A tensor-parallel leader that stops lets its followers go (those still there)."""
        try:
            self.engine.close()
        except RuntimeError as exc:  # a follower left first: nothing to release
            log.info("node.followers_gone", error=str(exc)[:200])

    def _follow(self) -> None:
        """A tensor-parallel follower runs its leader's steps until the leader stops."""
        num_steps = self.engine.follow()
        log.info("node.released", num_steps=num_steps)
        if self.on_released is not None:
            self._hand_to_loop(self.on_released)

    def _apply_threads(self) -> None:
        wanted = self._threads_wanted
        if wanted and wanted != self.threads_in_use:
            log.info("node.threads", before=self.threads_in_use, now=wanted)
            torch.set_num_threads(wanted)
            self.threads_in_use = wanted

    def _step_once(self) -> None:
        self.in_step = True
        started, before = time.monotonic(), self.engine.num_tokens_processed
        try:
            self.faults.before_step(self.engine.num_steps)
            outputs = self.engine.step()
        finally:
            self.in_step = False
        self.last_step_at = time.monotonic()
        self.speed.record(self.engine.num_tokens_processed - before, self.last_step_at - started)
        if outputs and not self._stopping:
            self._hand_to_loop(self._on_outputs, self.engine.num_steps, outputs, started)

    def _hand_to_loop(self, callback: Callable, *args) -> None:
        try:
            self._loop.call_soon_threadsafe(callback, *args)
        except RuntimeError:  # the loop has closed: the node is gone already
            self._stopping = True
