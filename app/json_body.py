"""Reading a JSON request body with bounds: size (413), depth, and no NaN or Infinity (422)."""

from __future__ import annotations

import json
from typing import Any

from fastapi import HTTPException, Request, status

from modelpress.specs import is_finite_json

MAX_JSON_BODY = 1024 * 1024
MAX_DEPTH = 32


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a valid JSON number; send finite numbers only")


def _depth(value: Any, limit: int) -> int:
    stack = [(value, 1)]
    deepest = 0
    while stack:
        item, depth = stack.pop()
        deepest = max(deepest, depth)
        if deepest > limit:
            return deepest
        if isinstance(item, dict):
            stack.extend((v, depth + 1) for v in item.values())
        elif isinstance(item, list):
            stack.extend((v, depth + 1) for v in item)
    return deepest


def _has_nul(value: Any) -> bool:
    """True when a string or key anywhere holds U+0000, which PostgreSQL text cannot store."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str) and "\x00" in item:
            return True
        if isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return False


async def read_json(request: Request) -> Any:
    """The parsed body; 415 when it is not JSON, 413 past 1 MiB, 422 for invalid, NaN/Infinity, deep JSON or NULs."""
    content_type = request.headers.get("content-type", "application/json").split(";")[0].strip().lower()
    if content_type != "application/json" and not content_type.endswith("+json"):
        raise HTTPException(status.HTTP_415_UNSUPPORTED_MEDIA_TYPE, "send the body as application/json")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_JSON_BODY:
            raise HTTPException(
                status.HTTP_413_REQUEST_ENTITY_TOO_LARGE, f"the JSON body is larger than {MAX_JSON_BODY} bytes"
            )
    try:
        value = json.loads(bytes(body), parse_constant=_reject_constant)
    except RecursionError as exc:
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_ENTITY, "the JSON body is nested too deeply") from exc
    except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_ENTITY, f"the body is not valid JSON: {exc}") from exc
    if not is_finite_json(value):
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_ENTITY, "NaN and Infinity are not valid JSON numbers")
    if _depth(value, MAX_DEPTH) > MAX_DEPTH:
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_ENTITY, f"the JSON body is nested deeper than {MAX_DEPTH}")
    if _has_nul(value):
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_ENTITY, "strings in the JSON body may not contain \\u0000")
    return value
