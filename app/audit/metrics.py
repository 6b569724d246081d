"""The audit consumer's metrics, served by `rewards audit run` on
REWARDS_AUDIT_METRICS_PORT (Prometheus text at /metrics): its own lag, set as
it streams, and what the alert rules (ops/prometheus/alerts.yml) read of each
node it streams from, read by `NodeCollector` when Prometheus scrapes.

The consumer exports the nodes' state because it is already the one process
that knows every node (it finds the Citus workers itself) and runs as a role
that may read their slots; an exporter of its own would be one more process to
supervise and one more port, for the same queries."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator

from prometheus_client import Counter, Gauge
from prometheus_client.core import GaugeMetricFamily, Metric
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from app.ledger import queries
from app.ledger.client import Call, Ledger, Shape
from app.ledger.errors import LedgerError

log = logging.getLogger("rewards.audit")

LAG_BYTES = Gauge("rewards_audit_lag_bytes", "WAL bytes the slot holds beyond what the history has", ["slot"])
LAG_SECONDS = Gauge("rewards_audit_lag_seconds",
                    "Age of the oldest ledger commit not yet in the history; 0 when none is pending", ["slot"])
SLOT_INVALIDATIONS = Counter(
    "rewards_audit_slot_invalidations", "Times the slot was found invalidated by max_slot_wal_keep_size and made "
    "again, the history backfilled from the ledger", ["slot"])

# A scrape must answer even when a node does not: it waits this long for one.
CONNECT_TIMEOUT_SECONDS = 3


class NodeCollector:
    """Reads, at each scrape, every source node's replication slots and
    standbys and the history's parked notifications, on connections of its own
    (the stream's belong to its thread). A node that does not answer is
    `rewards_node_up 0` and its other series are absent until it answers again."""

    def __init__(self, sources: Callable[[], list[str]], history: str) -> None:
        self.sources = sources
        self.history = history
        self._ledgers: dict[str, Ledger] = {}
        self._lock = threading.Lock()  # scrapes arrive on threads of their own

    def describe(self) -> list[Metric]:
        return []  # registering must not reach the database

    def _ledger(self, conninfo: str) -> Ledger:
        ledger = self._ledgers.get(conninfo)
        if ledger is None or ledger.closed:
            ledger = Ledger.open(make_conninfo(conninfo, connect_timeout=str(CONNECT_TIMEOUT_SECONDS)))
            self._ledgers[conninfo] = ledger
        return ledger

    def _read(self, conninfo: str, reads: list[Callable[[Ledger, str], None]]) -> tuple[str, bool]:
        """The node's name (host:port where the connection landed, which under a
        multi-host conninfo is the node that answered) and whether all went well."""
        try:
            ledger = self._ledger(conninfo)
            node = f"{ledger.conn.info.host}:{ledger.conn.info.port}"
            for read in reads:
                read(ledger, node)
            return node, True
        except LedgerError as exc:
            log.warning("could not read a node for the metrics", extra={"fields": {"error": str(exc)}})
            stale = self._ledgers.pop(conninfo, None)
            if stale is not None:
                stale.close()
            params = conninfo_to_dict(conninfo)
            return f"{params.get('host', '')}:{params.get('port', '5432')}", False

    def collect(self) -> Iterator[Metric]:
        node_up = GaugeMetricFamily("rewards_node_up", "1 when the consumer could read the node for these metrics",
                                    labels=["node"])
        retained = GaugeMetricFamily("rewards_slot_wal_retained_bytes",
                                     "WAL a replication slot keeps on the node's disk (from its restart_lsn)",
                                     labels=["node", "slot", "type"])
        safe = GaugeMetricFamily("rewards_slot_safe_wal_bytes",
                                 "WAL that can still be written before max_slot_wal_keep_size invalidates the slot",
                                 labels=["node", "slot", "type"])
        active = GaugeMetricFamily("rewards_slot_active", "1 while a process reads the slot",
                                   labels=["node", "slot", "type"])
        standbys = GaugeMetricFamily("rewards_replication_standbys", "Physical standbys streaming from the node",
                                     labels=["node"])
        sync_standbys = GaugeMetricFamily("rewards_replication_sync_standbys",
                                          "Streaming standbys the node's commits wait for (sync or quorum)",
                                          labels=["node"])
        synchronous = GaugeMetricFamily("rewards_replication_synchronous",
                                        "1 when synchronous_standby_names is set, so commits wait for a standby",
                                        labels=["node"])
        lag_bytes = GaugeMetricFamily("rewards_replication_lag_bytes",
                                      "WAL bytes the node has written that the standby has not replayed",
                                      labels=["node", "standby"])
        lag_seconds = GaugeMetricFamily("rewards_replication_lag_seconds",
                                        "Time the standby took to replay the latest WAL (0 when caught up)",
                                        labels=["node", "standby"])
        dead = GaugeMetricFamily("rewards_notifications_dead",
                                 "Notifications parked after REWARDS_NOTIFY_MAX_ATTEMPTS failed deliveries")

        def read_node(ledger: Ledger, node: str) -> None:
            slots = ledger(Call(queries.METRICS_SLOTS, shape=Shape.MANY))
            streaming = ledger(Call(queries.METRICS_STANDBYS, shape=Shape.MANY))
            waits = ledger(Call(queries.METRICS_SYNCHRONOUS))["synchronous"]
            for slot in slots:
                labels = [node, slot["slot"], slot["type"]]
                active.add_metric(labels, int(slot["active"]))
                if slot["retained_bytes"] is not None:  # NULL: no WAL reserved yet, or lost
                    retained.add_metric(labels, slot["retained_bytes"])
                if slot["safe_wal_bytes"] is not None:
                    safe.add_metric(labels, slot["safe_wal_bytes"])
            live = [row for row in streaming if row["state"] == "streaming"]
            standbys.add_metric([node], len(live))
            sync_standbys.add_metric([node], sum(row["sync_state"] in ("sync", "quorum") for row in live))
            synchronous.add_metric([node], int(waits))
            for row in streaming:
                if row["lag_bytes"] is not None:
                    lag_bytes.add_metric([node, row["standby"]], row["lag_bytes"])
                lag_seconds.add_metric([node, row["standby"]], row["lag_seconds"])

        def read_history(ledger: Ledger, node: str) -> None:
            dead.add_metric([], ledger(Call(queries.METRICS_NOTIFICATIONS_DEAD))["dead"])

        with self._lock:
            sources = self.sources()
            for conninfo in dict.fromkeys([*sources, self.history]):
                reads = [read_node] if conninfo in sources else []
                if conninfo == self.history:
                    reads.append(read_history)
                node, ok = self._read(conninfo, reads)
                node_up.add_metric([node], int(ok))
        yield from (node_up, retained, safe, active, standbys, sync_standbys, synchronous, lag_bytes,
                    lag_seconds, dead)

