"""Run one actor as this process's main: uvloop, signals, readiness, exit code.

SIGTERM stops with "drain" (the actor bounds it); a second SIGTERM, or SIGINT, stops with
"abort". When the actor is serving, its ready_info() is announced to a launching parent
(p3.nodes.actor.launch). Exit code 0 after a clean stop, 1 if the actor failed.
"""

from __future__ import annotations

import asyncio
import signal
from typing import Any

from p3.log import get_logger
from p3.nodes.actor.launch import announce_ready

log = get_logger(__name__)


def run_actor(actor: Any) -> int:
    """Blocks until the actor stops; `actor` has run(), stop(mode), serving and ready_info()."""
    try:
        import uvloop

        runner = asyncio.Runner(loop_factory=uvloop.new_event_loop)
    except ImportError:
        runner = asyncio.Runner()
    with runner:
        return runner.run(_main(actor))


async def _main(actor: Any) -> int:
    _install_signal_handlers(actor)
    run = asyncio.create_task(actor.run(), name=f"{actor.name}.run")
    announce = asyncio.create_task(_announce_when_serving(actor), name=f"{actor.name}.announce")
    try:
        await run
        return 0
    except Exception as exc:
        log.error(f"{actor.kind}.exit", name=actor.name, error=repr(exc))
        return 1
    finally:
        announce.cancel()


async def _announce_when_serving(actor: Any) -> None:
    await actor.serving.wait()
    info = actor.ready_info()
    log.info(f"{actor.kind}.serving", name=actor.name, **info)
    announce_ready(actor.kind, **info)


def _install_signal_handlers(actor: Any) -> None:
    loop = asyncio.get_running_loop()
    num_terms = 0

    def on_term() -> None:
        nonlocal num_terms
        num_terms += 1
        mode = "drain" if num_terms == 1 else "abort"
        log.info(f"{actor.kind}.signal", name=actor.name, signal="SIGTERM", mode=mode)
        actor.stop(mode)

    def on_int() -> None:
        log.info(f"{actor.kind}.signal", name=actor.name, signal="SIGINT", mode="abort")
        actor.stop("abort")

    loop.add_signal_handler(signal.SIGTERM, on_term)
    loop.add_signal_handler(signal.SIGINT, on_int)
