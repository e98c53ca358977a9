"""`GET /metrics` beside the API, for Prometheus: behind `MODELPRESS_METRICS_TOKEN`, or open in development only.

With `MODELPRESS_METRICS_PORT` set the metrics are served on that port instead (app.metrics) and this route
answers 404. It is left out of the OpenAPI schema: it is for operators, not API clients, and speaks Prometheus's
text format rather than JSON.
"""

from __future__ import annotations

from fastapi import APIRouter, HTTPException, Request, Response, status
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from app.deps import SettingsDep
from app.metrics import bearer_token_ok

router = APIRouter()


@router.get("/metrics", include_in_schema=False)
def metrics(request: Request, settings: SettingsDep) -> Response:
    if not settings.metrics_on_api_port:
        where = (
            f"on port {settings.metrics_port} (MODELPRESS_METRICS_PORT)"
            if settings.metrics_port is not None
            else "nowhere: set MODELPRESS_METRICS_TOKEN or MODELPRESS_METRICS_PORT"
        )
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"metrics are not served on this port; they are served {where}")
    if settings.metrics_token and not bearer_token_ok(request.headers.get("authorization"), settings.metrics_token):
        raise HTTPException(
            status.HTTP_401_UNAUTHORIZED,
            "missing or wrong metrics token: send 'Authorization: Bearer <MODELPRESS_METRICS_TOKEN>'",
            headers={"WWW-Authenticate": "Bearer"},
        )
    return Response(generate_latest(request.app.state.metrics.registry), media_type=CONTENT_TYPE_LATEST)
