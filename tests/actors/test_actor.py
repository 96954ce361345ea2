"""The Actor base: lifecycle, drain versus abort, failure of a loop."""

from __future__ import annotations

import asyncio

import pytest
import structlog.testing

from p3.nodes.actor.base import Actor, Status

pytestmark = pytest.mark.timeout(10)


class Recorder(Actor):
    def __init__(self, fail: bool = False):
        super().__init__("rec")
        self.events: list[str] = []
        self.fail = fail

    async def setup(self):
        self.events.append("setup")

    def loops(self):
        return [self.tick()]

    async def tick(self):
        while True:
            await asyncio.sleep(0.001)
            if self.fail:
                raise RuntimeError("loop broke")

    async def drain(self):
        self.events.append("drain")

    async def teardown(self):
        self.events.append("teardown")


async def test_drain_stop_drains_then_tears_down():
    actor = Recorder()
    task = asyncio.create_task(actor.run())
    await actor.wait_ready()
    assert actor.status is Status.RUNNING
    actor.stop("drain")
    await task
    assert actor.events == ["setup", "drain", "teardown"]
    assert actor.status is Status.STOPPED


async def test_abort_stop_skips_drain():
    actor = Recorder()
    task = asyncio.create_task(actor.run())
    await actor.wait_ready()
    actor.stop("abort")
    await task
    assert actor.events == ["setup", "teardown"]


async def test_a_failing_loop_fails_the_actor_and_still_tears_down():
    actor = Recorder(fail=True)
    with pytest.raises(ExceptionGroup):
        await actor.run()
    assert actor.status is Status.FAILED
    assert actor.events[-1] == "teardown"


def test_unknown_stop_mode_is_refused():
    with pytest.raises(ValueError, match="drain"):
        Recorder().stop("later")


class BrokenTeardown(Recorder):
    async def teardown(self):
        raise OSError("socket already gone")


async def test_a_failure_is_logged_with_its_own_exception_not_the_group():
    actor = Recorder(fail=True)
    with structlog.testing.capture_logs() as logs, pytest.raises(ExceptionGroup):
        await actor.run()
    [failed] = [e for e in logs if e["event"] == "actor.failed"]
    assert failed["log_level"] == "error"
    assert failed["error_type"] == "RuntimeError" and failed["error"] == "loop broke"
    assert isinstance(failed["exc_info"], RuntimeError)  # the renderer prints its traceback
    assert actor.status is Status.FAILED


async def test_a_teardown_that_raises_is_logged_and_the_stop_completes():
    actor = BrokenTeardown()
    task = asyncio.create_task(actor.run())
    await actor.wait_ready()
    with structlog.testing.capture_logs() as logs:
        actor.stop("abort")
        await task
    assert actor.status is Status.STOPPED
    [failed] = [e for e in logs if e["event"] == "actor.teardown_failed"]
    assert failed["log_level"] == "error" and failed["error_type"] == "OSError"


async def test_a_stop_before_run_is_honoured():
    actor = Recorder()
    actor.stop("drain")
    async with asyncio.timeout(2):
        await actor.run()
    assert actor.status is Status.STOPPED and actor.events == []
    with pytest.raises(RuntimeError, match="did not start"):
        await actor.wait_ready(timeout_s=1)


async def test_wait_ready_fails_when_the_actor_fails_before_serving():
    class FailsInSetup(Recorder):
        async def setup(self):
            raise ValueError("bad config")

    actor = FailsInSetup()
    task = asyncio.create_task(actor.run())
    with pytest.raises(RuntimeError, match="did not start: failed"):
        await actor.wait_ready(timeout_s=5)
    with pytest.raises(ValueError):
        await task
