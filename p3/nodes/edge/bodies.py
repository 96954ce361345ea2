"""What a client sends before any model work: its JSON body, read within a deadline and
bounded in depth, and its API key, compared in constant time; and a JSON answer's body."""

from __future__ import annotations

import asyncio
import hmac
from typing import Any

import msgspec
from aiohttp import web

from p3.nodes.cluster.generation import RequestFailed
from p3.nodes.edge.schemas import ApiError, bad_request


def json_response(body: Any, status: int = 200) -> web.Response:
    return web.Response(
        body=msgspec.json.encode(body), status=status, content_type="application/json"
    )


def failure_error(failure: RequestFailed) -> ApiError:
    return ApiError(failure.http_status, failure.message, code=failure.code.value)


MAX_JSON_DEPTH = 64  # arrays and objects in a body; msgspec itself stops near the stack's limit


async def read_json(request: web.Request, timeout_s: float) -> Any:
    try:
        async with asyncio.timeout(timeout_s):
            raw = await request.read()
    except TimeoutError:
        message = f"the body did not arrive within {timeout_s:g} s"
        raise ApiError(408, message, code="timeout") from None
    try:
        body = msgspec.json.decode(raw)
    except msgspec.DecodeError as exc:
        raise bad_request(None, f"the body is not valid JSON: {exc}", "invalid_json") from None
    except RecursionError:
        raise _too_deep() from None
    if raw.count(b"[") + raw.count(b"{") > MAX_JSON_DEPTH and _deeper_than(body, MAX_JSON_DEPTH):
        raise _too_deep()
    return body


def _too_deep() -> ApiError:
    message = f"the body nests arrays and objects more than {MAX_JSON_DEPTH} deep"
    return bad_request(None, message, "invalid_json")


def _deeper_than(value: Any, limit: int) -> bool:
    """Whether arrays and objects nest more than limit deep in value; level by level, so a
    deep value cannot exhaust the stack that measures it."""
    level = [value] if isinstance(value, list | dict) else []
    for _ in range(limit):
        level = [
            child
            for node in level
            for child in (node.values() if isinstance(node, dict) else node)
            if isinstance(child, list | dict)
        ]
    return bool(level)


def key_ok(request: web.Request, keys: tuple[str, ...]) -> bool:
    """Compared as bytes, with every key: a header that is not UTF-8 reaches us as surrogate
    escapes, which surrogateescape turns back into its bytes (a plain encode() raised)."""
    header = request.headers.get("Authorization", "")
    scheme, _, key = header.partition(" ")
    if scheme.lower() != "bearer":
        return False
    given = key.strip().encode("utf-8", "surrogateescape")
    return any([hmac.compare_digest(given, k.encode()) for k in keys])
