"""Health and metrics: /healthz (the process answers), /readyz (the database
answers through PgBouncer), /metrics (Prometheus text, admin scope)."""

from __future__ import annotations

from litestar import Response, get

from app.api import metrics
from app.api.security import scope_required
from app.ledger import calls
from app.ledger.client import AsyncLedger


@get("/healthz", exclude_from_auth=True, summary="The process is alive")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@get("/readyz", exclude_from_auth=True, summary="The database answers through PgBouncer")
async def readyz(ledger: AsyncLedger) -> dict[str, str]:
    await ledger(calls.ping())
    return {"status": "ready"}


@get("/metrics", guards=[scope_required("admin")], summary="Prometheus metrics", media_type=metrics.CONTENT_TYPE,
     responses={})
async def prometheus_metrics() -> Response[bytes]:
    return Response(metrics.render(), media_type=metrics.CONTENT_TYPE)
