"""Liveness for operators: the database and the broker, each checked with a short timeout (no auth)."""

from __future__ import annotations

import logging

import redis
from fastapi import APIRouter, status
from fastapi.responses import JSONResponse
from sqlalchemy import text
from sqlalchemy.exc import SQLAlchemyError

from app.deps import SettingsDep
from modelpress.db import get_engine

logger = logging.getLogger(__name__)
router = APIRouter(tags=["health"])
TIMEOUT_S = 1.0


def check_database() -> str:
    try:
        with get_engine().connect() as connection:
            connection.execute(text("SELECT 1"))
    except SQLAlchemyError as exc:
        logger.warning("health: database is down: %s", exc)
        return "down"
    return "ok"


def check_broker(url: str | None) -> str:
    if not url:
        return "down (REDIS_URL is not set)"
    client = redis.Redis.from_url(url, socket_connect_timeout=TIMEOUT_S, socket_timeout=TIMEOUT_S)
    try:
        client.ping()
    except (redis.RedisError, OSError, ValueError) as exc:
        logger.warning("health: broker is down: %s", exc)
        return "down"
    finally:
        client.close()
    return "ok"


@router.get(
    "/healthz",
    responses={200: {"description": "everything answers"}, 503: {"description": "the database or broker is down"}},
)
def healthz(settings: SettingsDep) -> JSONResponse:
    checks = {"database": check_database(), "broker": check_broker(settings.redis_url)}
    down = [name for name, state in checks.items() if state != "ok"]
    if down:
        return JSONResponse(
            {"status": "unavailable", "checks": checks, "detail": f"down: {', '.join(down)}"},
            status_code=status.HTTP_503_SERVICE_UNAVAILABLE,
        )
    return JSONResponse({"status": "ok", "checks": checks})
