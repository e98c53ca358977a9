"""Every error is `{"detail": "<what to fix>"}`; validation errors add the structured list as `errors`."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from fastapi import FastAPI, Request, status
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError


def describe(errors: Sequence[Any]) -> str:
    """One readable line per pydantic error: `recipe.0.sparsity: Input should be less than 1`."""
    lines = []
    for error in errors[:20]:
        loc = [str(p) for p in error.get("loc", ()) if p not in ("body",)]
        lines.append(f"{'.'.join(loc)}: {error.get('msg', 'invalid')}" if loc else str(error.get("msg", "invalid")))
    return "; ".join(lines) or "invalid request"


def public_errors(errors: Sequence[Any]) -> list[dict[str, Any]]:
    return [{"loc": list(e.get("loc", ())), "msg": e.get("msg", ""), "type": e.get("type", "")} for e in errors[:20]]


def validation_response(exc: RequestValidationError | ValidationError) -> JSONResponse:
    errors = exc.errors()
    return JSONResponse(
        status_code=status.HTTP_422_UNPROCESSABLE_ENTITY,
        content={"detail": describe(errors), "errors": public_errors(errors)},
    )


def install(app: FastAPI) -> None:
    async def on_validation_error(_request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError | ValidationError)
        return validation_response(exc)

    app.add_exception_handler(RequestValidationError, on_validation_error)
