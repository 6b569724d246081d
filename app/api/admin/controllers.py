"""/v1/admin/...: rules, campaigns and the history of their changes. Each
change is recorded with the API key that made it."""

from __future__ import annotations

from typing import Annotated

from litestar import Controller, Request, Response, get, post, put
from litestar.params import Parameter

from app.api.admin.schemas import CampaignRequest, RuleRequest
from app.api.body import StrictJson
from app.api.problems import documented, problem
from app.api.ratelimit import Decision
from app.api.security import scope_and_token
from app.ledger import calls, limits
from app.ledger.client import AsyncLedger
from app.ledger.results import BudgetReport, Campaign, Change, Rule

ActionType = Annotated[str, Parameter(pattern=limits.NAME_PATTERN, description="the action type")]
CampaignId = Annotated[int, Parameter(ge=1, le=2**63 - 1)]
ADMIN = [scope_and_token("admin", "read")]


def _actor(request: Request) -> str:
    return f"api key {request.user.key_id} ({request.user.name})"


def _found(value, what: str):
    if value is None:
        raise problem("not-found", f"no such {what}")
    return value


class AdminController(Controller):
    path = "/v1/admin"
    tags = ["admin"]

    @get("/rules", guards=ADMIN, summary="Every rule", responses=documented("forbidden"))
    async def rules(self, ledger: AsyncLedger, rate_limit: Decision) -> Response[list[Rule]]:
        return Response(await ledger(calls.list_rules()), headers=rate_limit.headers())

    @put("/rules/{action_type:str}", guards=ADMIN, dto=StrictJson[RuleRequest], return_dto=None,
         summary="Create or change the rule of an action type", responses=documented("forbidden"))
    async def put_rule(self, request: Request, ledger: AsyncLedger, rate_limit: Decision, action_type: ActionType,
                       data: RuleRequest) -> Response[Rule]:
        rule = await ledger(calls.put_rule(
            _actor(request), action_type, fixed_points=data.fixed_points, points_per_unit=data.points_per_unit,
            unit_value=data.unit_value, daily_cap=data.daily_cap, lifetime_cap=data.lifetime_cap,
            enabled=data.enabled, pending_seconds=data.pending_seconds, expiry_seconds=data.expiry_seconds))
        return Response(rule, headers=rate_limit.headers())

    @post("/rules/{action_type:str}/{switch:str}", guards=ADMIN, status_code=200,
          summary="Disable or enable a rule (switch: disable | enable)", responses=documented("forbidden", "not-found"))
    async def switch_rule(self, request: Request, ledger: AsyncLedger, rate_limit: Decision, action_type: ActionType,
                          switch: Annotated[str, Parameter(pattern="^(disable|enable)$")]) -> Response[Rule]:
        rule = await ledger(calls.enable_rule(_actor(request), action_type, switch == "enable"))
        return Response(_found(rule, "rule"), headers=rate_limit.headers())

    @get("/campaigns", guards=ADMIN, summary="Every campaign, with what its budget has paid",
         responses=documented("forbidden"))
    async def campaigns(self, ledger: AsyncLedger, rate_limit: Decision) -> Response[list[Campaign]]:
        return Response(await ledger(calls.list_campaigns()), headers=rate_limit.headers())

    @get("/campaigns/{campaign_id:int}/budget", guards=ADMIN,
         summary="A budgeted campaign's budget, what it awarded and what is left (unallocated and in its slices)",
         responses=documented("forbidden", "not-found"))
    async def campaign_budget(self, ledger: AsyncLedger, rate_limit: Decision,
                              campaign_id: CampaignId) -> Response[BudgetReport]:
        report = await ledger(calls.budget_report(campaign_id))
        return Response(_found(report, "campaign with a budget"), headers=rate_limit.headers())

    @post("/campaigns", guards=ADMIN, dto=StrictJson[CampaignRequest], return_dto=None, status_code=201,
          summary="Create a campaign", responses=documented("forbidden"))
    async def create_campaign(self, request: Request, ledger: AsyncLedger, rate_limit: Decision,
                              data: CampaignRequest) -> Response[Campaign]:
        return Response(await ledger(_put_campaign(_actor(request), None, data)), status_code=201,
                        headers=rate_limit.headers())

    @put("/campaigns/{campaign_id:int}", guards=ADMIN, dto=StrictJson[CampaignRequest], return_dto=None,
         summary="Change a campaign", responses=documented("forbidden", "not-found"))
    async def change_campaign(self, request: Request, ledger: AsyncLedger, rate_limit: Decision,
                              campaign_id: CampaignId, data: CampaignRequest) -> Response[Campaign]:
        campaign = await ledger(_put_campaign(_actor(request), campaign_id, data))
        return Response(_found(campaign, "campaign"), headers=rate_limit.headers())

    @post("/campaigns/{campaign_id:int}/{switch:str}", guards=ADMIN, status_code=200,
          summary="Disable or enable a campaign (switch: disable | enable)",
          responses=documented("forbidden", "not-found"))
    async def switch_campaign(self, request: Request, ledger: AsyncLedger, rate_limit: Decision,
                              campaign_id: CampaignId,
                              switch: Annotated[str, Parameter(pattern="^(disable|enable)$")]) -> Response[Campaign]:
        campaign = await ledger(calls.enable_campaign(_actor(request), campaign_id, switch == "enable"))
        return Response(_found(campaign, "campaign"), headers=rate_limit.headers())

    @get("/changes", guards=ADMIN, summary="Every change of a rule or campaign, newest first",
         responses=documented("forbidden"))
    async def changes(self, ledger: AsyncLedger, rate_limit: Decision,
                      before: Annotated[int | None, Parameter(ge=1, le=2**63 - 1)] = None,
                      limit: Annotated[int, Parameter(ge=1, le=limits.MAX_PAGE)] = 50) -> Response[list[Change]]:
        return Response(await ledger(calls.list_changes(before, limit)), headers=rate_limit.headers())


def _put_campaign(actor: str, campaign_id: int | None, data: CampaignRequest):
    return calls.put_campaign(
        actor, campaign_id, data.name, data.starts_at, data.ends_at, multiplier_percent=data.multiplier_percent,
        bonus_points=data.bonus_points, action_types=data.action_types, sources=data.sources, budget=data.budget,
        enabled=data.enabled)
