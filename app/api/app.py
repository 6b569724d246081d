"""The ASGI application. Run with: uvicorn --factory app.api.app:create_app"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from litestar import Litestar, Router
from litestar.exceptions import HTTPException
from litestar.middleware import DefineMiddleware
from litestar.openapi import OpenAPIConfig
from litestar.plugins.problem_details import ProblemDetailsConfig, ProblemDetailsException, ProblemDetailsPlugin

from app import logs
from app.api import lifeline
from app.api.accounts.controllers import AccountsController
from app.api.bulk.controllers import BulkCreditsController
from app.api.actions.controllers import report_action
from app.api.callbacks.controllers import callback, refund_callback
from app.api.callbacks.verification import SourceCache
from app.api.refunds.controllers import refund
from app.api.admin.controllers import AdminController
from app.api.dependencies import DEPENDENCIES
from app.api.frontdoor import FrontDoor
from app.api.group_commit import GroupCommit
from app.api.health import healthz, prometheus_metrics, readyz
from app.api.pool import make_pool
from app.api.problems import from_http_exception, from_ledger_error, problem
from app.api.ratelimit import RateLimiter
from app.api.security import ApiKeyMiddleware, KeyCache
from app.ledger.client import AsyncLedger
from app.ledger.errors import LedgerError
from app.ledger.shards import Shards
from app.settings import Settings, load

log = logging.getLogger("rewards.api")


def _internal_error(exc: Exception) -> ProblemDetailsException:
    log.exception("unhandled error", exc_info=exc)
    return problem("internal", "the request failed; it wrote nothing")


def create_litestar(settings: Settings) -> Litestar:
    @asynccontextmanager
    async def resources(app: Litestar) -> AsyncIterator[None]:
        pool = make_pool(settings)
        app.state.ledger = AsyncLedger(pool)
        app.state.shards = Shards(app.state.ledger, settings.shard_map_seconds)
        app.state.credits = GroupCommit(
            app.state.ledger, app.state.shards, enabled=settings.group_commit,
            calls_per_group=settings.group_commit_calls, max_items=settings.group_commit_max_items,
            max_queued=settings.group_commit_max_queued, max_wait=settings.group_commit_wait_seconds)
        app.state.settings = settings
        app.state.key_cache = KeyCache(settings.auth_cache_seconds)
        app.state.source_cache = SourceCache(settings.auth_cache_seconds)
        app.state.rate_limiter = RateLimiter(settings)
        # Start even while the database is away: /readyz says so, requests get 503.
        await pool.open(wait=False)
        try:
            yield
        finally:
            await pool.close()
            await app.state.rate_limiter.close()

    return Litestar(
        route_handlers=[AccountsController, report_action, refund, callback, refund_callback, AdminController,
                        healthz, readyz, prometheus_metrics,
                        # Bulk bodies are larger than any single request's.
                        Router("/", route_handlers=[BulkCreditsController],
                               request_max_body_size=settings.max_bulk_body_bytes)],
        dependencies=DEPENDENCIES,
        middleware=[DefineMiddleware(ApiKeyMiddleware, exclude=["^/schema"])],
        plugins=[ProblemDetailsPlugin(ProblemDetailsConfig(exception_to_problem_detail_map={
            HTTPException: from_http_exception,
            LedgerError: from_ledger_error,
            Exception: _internal_error,
        }))],
        lifespan=[resources],
        request_max_body_size=settings.max_body_bytes,
        openapi_config=OpenAPIConfig(title="Rewards Ledger", version="1.0.0", path="/schema"),
        # Logging is ours: JSON lines (app.logs).
        logging_config=None,
        debug=False,
    )


def create_app() -> FrontDoor:
    lifeline.tie_to_parent()
    settings = load()
    logs.configure()
    return FrontDoor(create_litestar(settings), settings.max_in_flight)
