"""One error shape for every 4xx: `{"detail": "<what to fix>"}`; validation errors add the structured `errors`.

The shape is the `Error` component of the OpenAPI schema, and `declare_errors` makes every 4xx response of
every operation point at it, so what the schema promises is what the service sends.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from fastapi import FastAPI, Request, status
from fastapi.exception_handlers import http_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, Field, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

ERROR_REF = "#/components/schemas/Error"


class FieldError(BaseModel):
    """One problem in the request, as pydantic found it."""

    loc: list[str | int] = Field(description="where: `query`/`path`/`header` and the name, or the body's key path")
    msg: str = Field(description="what is wrong there")
    type: str = Field(description="a stable machine-readable kind, such as `greater_than_equal` or `missing`")


class Error(BaseModel):
    """The body of every 4xx answer."""

    detail: str = Field(description="what went wrong and what to change, in one line a person can act on")
    errors: list[FieldError] = Field(
        default_factory=list, description="only on a 422 from request validation: each problem on its own (at most 20)"
    )


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


HTTP_METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "TRACE")


def allowed_methods(request: Request) -> list[str]:
    """Every method some route serves at this request's path; Starlette's own 405 names only the first route's.

    Each method is asked of the router's routes through their public `matches`, so nested included routers
    answer for themselves.
    """
    return [
        method
        for method in HTTP_METHODS
        if any(
            route.matches({**request.scope, "method": method})[0] is Match.FULL for route in request.app.router.routes
        )
    ]


def install(app: FastAPI) -> None:
    async def on_validation_error(_request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError | ValidationError)
        return validation_response(exc)

    async def on_http_error(request: Request, exc: Exception) -> Response:
        """HTTP errors as `Error`; a 405 lists in `Allow` every method the path serves."""
        assert isinstance(exc, StarletteHTTPException)
        if exc.status_code == status.HTTP_405_METHOD_NOT_ALLOWED:
            methods = allowed_methods(request)
            exc = StarletteHTTPException(
                exc.status_code,
                f"{request.method} is not served at {request.url.path}; use {' or '.join(methods)}",
                headers={**(exc.headers or {}), "Allow": ", ".join(methods)},
            )
        elif not isinstance(exc.detail, str):
            exc = StarletteHTTPException(exc.status_code, str(exc.detail), headers=exc.headers)
        return await http_exception_handler(request, exc)

    app.add_exception_handler(RequestValidationError, on_validation_error)
    app.add_exception_handler(StarletteHTTPException, on_http_error)


def declare_errors(schema: dict[str, Any]) -> None:
    """Point every 4xx response in `schema` at the `Error` component, in place of FastAPI's list-shaped 422."""
    components = schema.setdefault("components", {}).setdefault("schemas", {})
    components.pop("HTTPValidationError", None)
    components.pop("ValidationError", None)
    definition = Error.model_json_schema(ref_template="#/components/schemas/{model}")
    for name, nested in definition.pop("$defs", {}).items():
        components[name] = nested
    components["Error"] = definition
    for operations in schema.get("paths", {}).values():
        for operation in operations.values():
            for code, response in operation.get("responses", {}).items():
                if str(code).startswith("4"):
                    if response.get("description") == "Validation Error":
                        response["description"] = "the request does not match this schema; `errors` lists each problem"
                    response["content"] = {"application/json": {"schema": {"$ref": ERROR_REF}}}
