"""structlog set-up: console or JSON lines on stderr; event names like "engine.ready"."""

from __future__ import annotations

import logging
import sys

import structlog


def setup_logging(level: str = "info", json: bool = False) -> None:
    renderer = (
        structlog.processors.JSONRenderer()
        if json
        else structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelName(level.upper())),
        logger_factory=structlog.PrintLoggerFactory(file=_CurrentStderr()),
        cache_logger_on_first_use=False,
    )


class _CurrentStderr:
    """sys.stderr as it is when a line is written, not when logging was set up: a caller that
    swaps stderr and closes it (pytest's capsys around p3.cli.main) leaves no dead stream
    behind for later log lines."""

    def write(self, text: str) -> int:
        return sys.stderr.write(text)

    def flush(self) -> None:
        sys.stderr.flush()


def get_logger(name: str) -> structlog.typing.FilteringBoundLogger:
    return structlog.get_logger(name)


def log_exception(
    logger: structlog.typing.FilteringBoundLogger, event: str, exc: BaseException, **context
) -> None:
    """At error level, with the exception's type, message and (rendered) traceback."""
    logger.error(event, **context, error_type=type(exc).__name__, error=str(exc), exc_info=exc)


if not structlog.is_configured():  # library use stays quiet; entry points call setup_logging
    setup_logging("warning")
