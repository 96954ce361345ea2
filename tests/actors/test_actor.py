"""The Actor base: lifecycle, drain versus abort, failure of a loop."""

from __future__ import annotations

import asyncio

import pytest

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
