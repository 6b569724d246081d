"""`rewards rules ...`, `rewards campaigns ...` and `rewards refunds ...`: the
earning rules from the command line, each change recorded in the history under
the OS user who ran it (`rewards rules history` lists them), and refunds of
what verified actions earned. `app.cli` registers these commands."""

from __future__ import annotations

import argparse
import getpass
import json
import sys
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import asdict
from datetime import datetime

from app.ledger import calls
from app.ledger.client import Ledger
from app.ledger.errors import InvalidArgument
from app.ledger.results import Campaign, Outcome, Rule, Status

Connect = Callable[[], AbstractContextManager[Ledger]]


def _actor() -> str:
    return f"cli {getpass.getuser()}"


def _names(text: str | None) -> list[str] | None:
    """'a,b' as a list; None (any) when not given."""
    if text is None:
        return None
    names = [name.strip() for name in text.split(",") if name.strip()]
    if not names:
        raise InvalidArgument("give at least one name, or leave the option out for any")
    return names


def _time(text: str) -> datetime:
    try:
        moment = datetime.fromisoformat(text)
    except ValueError as exc:
        raise InvalidArgument(f"not an ISO 8601 time: {text}") from exc
    if moment.tzinfo is None:
        raise InvalidArgument(f"give the time zone of {text} (e.g. {text}Z or {text}+00:00)")
    return moment


def _or_any(value: object) -> str:
    return "any" if value is None else ",".join(value) if isinstance(value, list) else str(value)


def _seconds(what: str, seconds: int | None) -> str:
    return f"{what} {seconds} s" if seconds is not None else f"{what} never"


def _print_rule(rule: Rule) -> None:
    earns = (f"{rule.fixed_points} points" if rule.fixed_points is not None
             else f"{rule.points_per_unit} per {rule.unit_value} of value")
    print(f"{rule.action_type}\t{earns}\tdaily cap {_or_any(rule.daily_cap)}\tlifetime cap "
          f"{_or_any(rule.lifetime_cap)}\t{_seconds('pending', rule.pending_seconds)}\t"
          f"{_seconds('expires after', rule.expiry_seconds)}\t{'enabled' if rule.enabled else 'disabled'}")


def _print_campaign(campaign: Campaign) -> None:
    adds = (f"x{campaign.multiplier_percent / 100:g}" if campaign.multiplier_percent is not None
            else f"+{campaign.bonus_points}")
    budget = "no budget" if campaign.budget is None else f"budget {campaign.budget} (spent {campaign.spent or 0})"
    print(f"{campaign.campaign_id}\t{campaign.name}\t{adds}\t{campaign.starts_at:%Y-%m-%dT%H:%M%z}.."
          f"{campaign.ends_at:%Y-%m-%dT%H:%M%z}\ttypes {_or_any(campaign.action_types)}\tsources "
          f"{_or_any(campaign.sources)}\t{budget}\t{'enabled' if campaign.enabled else 'disabled'}")


# What each refusal of a refund says, after the action it names.
_REFUND_REFUSALS = {
    Status.ACTION_NOT_FOUND: "the user has no credit of it: nothing to refund",
    Status.ACTION_ALREADY_REFUNDED: "refunded already, under another key",
    Status.ACTION_POINTS_EXPIRED: "every point it earned has expired: nothing to reverse",
    Status.IDEMPOTENCY_KEY_REUSED: "the key was used for another request",
}

# ledger.settings.refund_shortfall: what a refund does with points already spent.
_SHORTFALLS = {
    "owe": "owed by the user, paid off first by later credits",
    "write_off": "written off: recorded as lost, nothing owed",
}


def _print_refund(outcome: Outcome, action: str) -> None:
    replayed = " (a replay: refunded before under this key)" if outcome.replayed else ""
    print(f"{outcome.user_id}\t{action}\trefunded {outcome.amount} points (last entry {outcome.entry_id})\t"
          f"available {outcome.available}\treserved {outcome.reserved}{replayed}")


def register(groups: argparse._SubParsersAction, connect: Connect) -> None:
    def run(action: Callable[[argparse.Namespace, Ledger], int]) -> Callable[[argparse.Namespace], int]:
        def command(args: argparse.Namespace) -> int:
            with connect() as ledger:
                return action(args, ledger)
        return command

    def rules_list(args: argparse.Namespace, ledger: Ledger) -> int:
        for rule in ledger(calls.list_rules()):
            _print_rule(rule)
        return 0

    def rules_set(args: argparse.Namespace, ledger: Ledger) -> int:
        _print_rule(ledger(calls.put_rule(
            _actor(), args.action_type, fixed_points=args.points, points_per_unit=args.per_unit,
            unit_value=args.unit_value if args.per_unit is not None else None, daily_cap=args.daily_cap,
            lifetime_cap=args.lifetime_cap, enabled=not args.disabled, pending_seconds=args.pending_seconds,
            expiry_seconds=args.expiry_seconds)))
        return 0

    def rules_switch(args: argparse.Namespace, ledger: Ledger) -> int:
        rule = ledger(calls.enable_rule(_actor(), args.action_type, args.enabled))
        if rule is None:
            raise InvalidArgument(f"no rule for {args.action_type}", "action_type")
        _print_rule(rule)
        return 0

    def rules_history(args: argparse.Namespace, ledger: Ledger) -> int:
        for change in ledger(calls.list_changes(args.before, args.limit)):
            print(json.dumps(asdict(change), default=str, sort_keys=True))
        return 0

    def campaigns_list(args: argparse.Namespace, ledger: Ledger) -> int:
        for campaign in ledger(calls.list_campaigns()):
            _print_campaign(campaign)
        return 0

    def campaigns_put(args: argparse.Namespace, ledger: Ledger) -> int:
        campaign = ledger(calls.put_campaign(
            _actor(), getattr(args, "campaign_id", None), args.name, _time(args.starts), _time(args.ends),
            multiplier_percent=args.multiplier, bonus_points=args.bonus, action_types=_names(args.types),
            sources=_names(args.sources), budget=args.budget, enabled=not args.disabled))
        if campaign is None:
            raise InvalidArgument(f"no campaign {args.campaign_id}", "campaign_id")
        _print_campaign(campaign)
        return 0

    def campaigns_budget(args: argparse.Namespace, ledger: Ledger) -> int:
        report = ledger(calls.budget_report(args.campaign_id))
        if report is None:
            raise InvalidArgument(f"no campaign {args.campaign_id} with a budget", "campaign_id")
        print(f"{report.campaign_id}\t{report.name}\t{'ended' if report.ended else 'running'} (ends "
              f"{report.ends_at:%Y-%m-%dT%H:%M%z})\tbudget {report.budget}\tawarded {report.awarded}\t"
              f"left {report.left_points} ({report.in_slices} in slices, {report.unallocated} unallocated)")
        return 0

    def campaigns_switch(args: argparse.Namespace, ledger: Ledger) -> int:
        campaign = ledger(calls.enable_campaign(_actor(), args.campaign_id, args.enabled))
        if campaign is None:
            raise InvalidArgument(f"no campaign {args.campaign_id}", "campaign_id")
        _print_campaign(campaign)
        return 0

    def refunds_create(args: argparse.Namespace, ledger: Ledger) -> int:
        key = args.key or calls.action_idempotency_key("cli-refund", args.source, args.external_id)
        outcome = ledger(calls.refund(args.user_id, key, args.source, args.external_id, args.reason))
        action = f"{args.source} {args.external_id}"
        if args.json:
            print(json.dumps(asdict(outcome), default=str, sort_keys=True))
        elif outcome.ok:
            _print_refund(outcome, action)
        if not outcome.ok:
            print(f"rewards: {action} of {args.user_id}: {_REFUND_REFUSALS[outcome.status]} ({outcome.status})",
                  file=sys.stderr)
            return 2
        return 0

    def refunds_shortfall(args: argparse.Namespace, ledger: Ledger) -> int:
        if args.set:
            ledger(calls.set_refund_shortfall(args.set))
        shortfall = ledger(calls.refund_shortfall())["refund_shortfall"]
        print(f"refund shortfall: {shortfall} (what the user already spent is {_SHORTFALLS[shortfall]})")
        return 0

    rules = groups.add_parser("rules", help="what each action type earns").add_subparsers(
        dest="command", required=True)
    rules.add_parser("list", help="every rule").set_defaults(func=run(rules_list))
    put = rules.add_parser("set", help="create or change the rule of an action type")
    put.add_argument("action_type")
    earns = put.add_mutually_exclusive_group(required=True)
    earns.add_argument("--points", type=int, help="fixed points per action")
    earns.add_argument("--per-unit", type=int, help="points per --unit-value of the action's value (rounded down)")
    put.add_argument("--unit-value", type=int, default=100, help="value units per --per-unit points (default 100)")
    put.add_argument("--daily-cap", type=int, help="most points a user earns from the type per UTC day")
    put.add_argument("--lifetime-cap", type=int, help="most points a user earns from the type in all")
    put.add_argument("--pending-seconds", type=int,
                     help="each credit of the type stays pending this long (e.g. a return window)")
    put.add_argument("--expiry-seconds", type=int, help="each credit of the type expires this long after it")
    put.add_argument("--disabled", action="store_true", help="store it disabled")
    put.set_defaults(func=run(rules_set))
    for name, enabled in (("disable", False), ("enable", True)):
        switch = rules.add_parser(name, help=f"{name} the rule of an action type")
        switch.add_argument("action_type")
        switch.set_defaults(func=run(rules_switch), enabled=enabled)
    history = rules.add_parser("history", help="every change of a rule or campaign, newest first (JSON lines)")
    history.add_argument("--before", type=int, help="only changes older than this change id")
    history.add_argument("--limit", type=int, default=50)
    history.set_defaults(func=run(rules_history))

    campaigns = groups.add_parser("campaigns", help="promotions on top of the rules").add_subparsers(
        dest="command", required=True)
    campaigns.add_parser("list", help="every campaign, with what its budget paid").set_defaults(
        func=run(campaigns_list))
    budget = campaigns.add_parser("budget", help="a budgeted campaign's budget, what it awarded and what is left")
    budget.add_argument("campaign_id", type=int)
    budget.set_defaults(func=run(campaigns_budget))
    for name, text in (("create", "create a campaign"), ("change", "change a campaign (every field anew)")):
        command = campaigns.add_parser(name, help=text)
        if name == "change":
            command.add_argument("campaign_id", type=int)
        command.add_argument("--name", required=True)
        command.add_argument("--starts", required=True, help="ISO 8601 with a time zone")
        command.add_argument("--ends", required=True, help="ISO 8601 with a time zone (excluded)")
        adds = command.add_mutually_exclusive_group(required=True)
        adds.add_argument("--multiplier", type=int, help="percent of the base points: 200 doubles them")
        adds.add_argument("--bonus", type=int, help="fixed points added")
        command.add_argument("--types", help="comma-separated action types (default: any)")
        command.add_argument("--sources", help="comma-separated sources (default: any)")
        command.add_argument("--budget", type=int, help="most points the campaign adds in all (default: no limit)")
        command.add_argument("--disabled", action="store_true", help="store it disabled")
        command.set_defaults(func=run(campaigns_put))
    for name, enabled in (("disable", False), ("enable", True)):
        switch = campaigns.add_parser(name, help=f"{name} a campaign")
        switch.add_argument("campaign_id", type=int)
        switch.set_defaults(func=run(campaigns_switch), enabled=enabled)

    refunds = groups.add_parser("refunds", help="reverse what verified actions earned").add_subparsers(
        dest="command", required=True)
    refund = refunds.add_parser("create", help="refund an action: pending points cancelled, available ones taken "
                                               "back, spent ones owed or written off")
    refund.add_argument("user_id")
    refund.add_argument("source")
    refund.add_argument("external_id")
    refund.add_argument("--reason", default="refund", help="the entries' reason (default: refund)")
    refund.add_argument("--key", help="idempotency key (default: one made from the action, so the same command "
                                      "again replays the first answer)")
    refund.add_argument("--json", action="store_true", help="print the ledger's answer as JSON")
    refund.set_defaults(func=run(refunds_create))
    shortfall = refunds.add_parser("shortfall", help="show or set what a refund does with points already spent")
    shortfall.add_argument("--set", choices=sorted(_SHORTFALLS), help="owe (the default) or write_off")
    shortfall.set_defaults(func=run(refunds_shortfall))
