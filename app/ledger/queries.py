"""The named queries of sql/queries.sql. Python never builds SQL text: it runs
these, by name, with parameters."""

from __future__ import annotations

import re
from pathlib import Path

from app.settings import PROJECT_ROOT

_NAME = re.compile(r"^-- name: (\w+)\s*$", re.MULTILINE)


def named(path: Path) -> dict[str, str]:
    """The queries of a file in this format, by name (bench/ keeps its own)."""
    parts = _NAME.split(path.read_text())  # [preamble, name1, body1, name2, body2, ...]
    return {name: body.strip() for name, body in zip(parts[1::2], parts[2::2], strict=True)}


_QUERIES = named(PROJECT_ROOT / "sql" / "queries.sql")

VERIFY_CHAIN = _QUERIES["verify_chain"]
EXPIRE_RESERVATIONS = _QUERIES["expire_reservations"]
CREDIT = _QUERIES["credit"]
DEBIT = _QUERIES["debit"]
RESERVE = _QUERIES["reserve"]
COMMIT_RESERVATION = _QUERIES["commit_reservation"]
RELEASE_RESERVATION = _QUERIES["release_reservation"]
BALANCE = _QUERIES["balance"]
ENTRIES_PAGE = _QUERIES["entries_page"]
RESERVATION = _QUERIES["reservation"]
AUTHENTICATE = _QUERIES["authenticate"]
CREATE_KEY = _QUERIES["create_key"]
LIST_KEYS = _QUERIES["list_keys"]
REVOKE_KEY = _QUERIES["revoke_key"]
PING = _QUERIES["ping"]
SLOT_STATUS = _QUERIES["slot_status"]
CREATE_SLOT = _QUERIES["create_slot"]
DROP_SLOT = _QUERIES["drop_slot"]
PEEK_CHANGES = _QUERIES["peek_changes"]
CONFIRM_CHANGES = _QUERIES["confirm_changes"]
AUDIT_INSERT_ENTRY = _QUERIES["audit_insert_entry"]
AUDIT_INSERT_RESERVATION_EVENT = _QUERIES["audit_insert_reservation_event"]
AUDIT_INSERT_NOTIFICATION = _QUERIES["audit_insert_notification"]
AUDIT_SAVE_PROGRESS = _QUERIES["audit_save_progress"]
AUDIT_IS_CITUS = _QUERIES["audit_is_citus"]
AUDIT_NODES = _QUERIES["audit_nodes"]
AUDIT_LAG = _QUERIES["audit_lag"]
AUDIT_PROGRESS = _QUERIES["audit_progress"]
METRICS_SLOTS = _QUERIES["metrics_slots"]
METRICS_STANDBYS = _QUERIES["metrics_standbys"]
METRICS_SYNCHRONOUS = _QUERIES["metrics_synchronous"]
METRICS_NOTIFICATIONS_DEAD = _QUERIES["metrics_notifications_dead"]
RECONCILE_ACCOUNTS_AFTER = _QUERIES["reconcile_accounts_after"]
RECONCILE = _QUERIES["reconcile"]
RECONCILE_LAST_SEQS = _QUERIES["reconcile_last_seqs"]
STREAM_BARRIER = _QUERIES["stream_barrier"]
STREAM_BEHIND = _QUERIES["stream_behind"]
REPAIR_HISTORY = _QUERIES["repair_history"]
COUNT_ACCOUNTS = _QUERIES["count_accounts"]
NOTIFICATIONS_CLAIM = _QUERIES["notifications_claim"]
NOTIFICATION_DELIVERED = _QUERIES["notification_delivered"]
NOTIFICATION_FAILED = _QUERIES["notification_failed"]
NOTIFICATIONS_DEAD = _QUERIES["notifications_dead"]
NOTIFICATION_RESEND = _QUERIES["notification_resend"]
AUDIT_RETENTION = _QUERIES["audit_retention"]
AUDIT_SET_RETENTION = _QUERIES["audit_set_retention"]
AUDIT_BACKFILL = _QUERIES["audit_backfill"]
DATABASE_EXISTS = _QUERIES["database_exists"]
CREATE_CITUS = _QUERIES["create_citus"]
CITUS_SET_COORDINATOR = _QUERIES["citus_set_coordinator"]
CITUS_WORKER_COUNT = _QUERIES["citus_worker_count"]
CITUS_COORDINATOR_HOLDS_SHARDS = _QUERIES["citus_coordinator_holds_shards"]
CITUS_ADD_NODE = _QUERIES["citus_add_node"]
CITUS_VERSION = _QUERIES["citus_version"]
CLUSTER_NODES = _QUERIES["cluster_nodes"]
NODE_SLOTS = _QUERIES["node_slots"]
CLUSTER_SLOTS = _QUERIES["cluster_slots"]
WRITE_FUNCTIONS_DISTRIBUTION = _QUERIES["write_functions_distribution"]
HA_PRIMARY = _QUERIES["ha_primary"]
HA_NODES = _QUERIES["ha_nodes"]
HA_PERFORM_FAILOVER = _QUERIES["ha_perform_failover"]
HA_LISTEN = _QUERIES["ha_listen"]
HA_NODE_ROLE = _QUERIES["ha_node_role"]
HA_REPLICATION = _QUERIES["ha_replication"]
HA_LOGICAL_SLOTS = _QUERIES["ha_logical_slots"]
HA_SERVER_PORT = _QUERIES["ha_server_port"]
