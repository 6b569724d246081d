"""Health and metrics: /healthz (the process answers), /readyz (the database
answers through PgBouncer), /metrics (Prometheus text, admin scope)."""

from __future__ import annotations

from litestar import Request, Response, get
from litestar.response import Response as PlainResponse

from app import queries
from app.api import metrics
from app.api.database import fetch_one
from app.api.security import requires


@get("/healthz", exclude_from_auth=True, include_in_schema=True, summary="The process is alive")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@get("/readyz", exclude_from_auth=True, summary="The database answers through PgBouncer")
async def readyz(request: Request) -> dict[str, str]:
    await fetch_one(request.app.state.pool, queries.PING)
    return {"status": "ready"}


@get("/metrics", guards=[requires("admin")], summary="Prometheus metrics")
async def prometheus_metrics() -> Response[bytes]:
    body, content_type = metrics.render()
    return PlainResponse(body, media_type=content_type)
