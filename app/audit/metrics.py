"""The audit consumer's metrics, served by `rewards audit run` on
REWARDS_AUDIT_METRICS_PORT (Prometheus text at /metrics)."""

from prometheus_client import Gauge

LAG_BYTES = Gauge("rewards_audit_lag_bytes", "WAL bytes the slot holds beyond what the history has", ["slot"])
LAG_SECONDS = Gauge("rewards_audit_lag_seconds",
                    "Age of the oldest ledger commit not yet in the history; 0 when none is pending", ["slot"])
