"""Every setting, read from the environment in this one place: each field
names its variable, its default and what it means, grouped by concern."""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from psycopg.conninfo import make_conninfo

PROJECT_ROOT = Path(__file__).resolve().parent.parent

GENERATED = "generated: `$REWARDS_DATA_DIR/secrets/` (below)"


@dataclass(frozen=True)
class Tier:
    """A token bucket: `rate` tokens a second, holding at most `burst`."""

    rate: float
    burst: int

    @classmethod
    def parse(cls, text: str) -> Tier:
        """'RATE/BURST', e.g. '10/20'."""
        rate, _, burst = text.partition("/")
        tier = cls(float(rate), int(burst or rate))
        if tier.rate <= 0 or tier.burst < 1:
            raise ValueError(f"a rate tier needs a positive rate and burst, not {text!r}")
        return tier

    def __str__(self) -> str:
        return f"{self.rate:g}/{self.burst}"


class NamedTiers(dict[str, Tier]):
    """Rate tiers by name, written 'NAME=RATE/BURST,...' (and shown back so)."""

    @classmethod
    def parse(cls, text: str) -> NamedTiers:
        tiers = cls()
        for item in filter(None, (part.strip() for part in text.split(","))):
            name, equals, tier = item.partition("=")
            if not equals or not name.strip():
                raise ValueError(f"a named rate tier is NAME=RATE/BURST, not {item!r}")
            tiers[name.strip()] = Tier.parse(tier.strip())
        return tiers

    def __str__(self) -> str:
        return ",".join(f"{name}={tier}" for name, tier in self.items())


class MissingSecret(RuntimeError):
    """A secret neither set in the environment nor made by `rewards up` yet."""


def setting(env: str, default: str | None, doc: str, parse: Callable[[str], Any] = str,
            shown: str | None = None, secret: str | None = None) -> Any:
    """A field read from the environment variable `env` (or `default`), parsed
    with `parse`; `doc` and `shown` (the default as the README shows it, when it
    is computed) make the README's settings table (tests/test_settings.py). A
    `secret` has no default: unset, it is read from the file of that name in
    the data folder's `secrets/`, which `rewards up` writes once (app.secrets)."""
    return field(metadata={"env": env, "default": default, "doc": doc, "parse": parse, "shown": shown,
                           "secret": secret})


@dataclass(frozen=True)
class Settings:
    # --- The project's own PostgreSQL cluster ---------------------------------
    data_dir: Path = setting("REWARDS_DATA_DIR", None, "the cluster's data, socket and log folders",
                             lambda text: Path(text).resolve(), shown="`.data` in the clone")
    pg_port: int = setting("REWARDS_PG_PORT", "25432", "the cluster's port (it listens on 127.0.0.1 and a Unix "
                           "socket in `$REWARDS_DATA_DIR/run`); keep it and the next ports under 32768, outside Linux's "
                           "ephemeral range, where any outbound connection may already hold it", int)
    pg_os_user: str = setting("REWARDS_PG_OS_USER", "rewards", "OS user that runs PostgreSQL (created when missing)")
    pg_bin: Path = setting("REWARDS_PG_BIN", "/usr/lib/postgresql/15/bin", "PostgreSQL's programs", Path)
    pg_superuser: str = setting("REWARDS_PG_SUPERUSER", "postgres", "the cluster's superuser")
    pg_host: str | None = setting(
        "REWARDS_PG_HOST", None, "where the superuser connects; set it (with `PGPASSWORD`) to migrate a server "
        "elsewhere, such as the Docker Compose coordinator", shown="the socket folder")
    database: str = setting("REWARDS_DATABASE", "rewards", "the service database, also where pg_cron runs jobs")
    api_password: str | None = setting(
        "REWARDS_API_DB_PASSWORD", None, "password of `rewards_api`, the role the API logs in as over TCP (the same "
        "on every node)", shown=GENERATED, secret="api-db-password")
    citus: str = setting(
        "REWARDS_CITUS", "auto", "`auto`: preload citus when installed; `on`: also create the extension in the "
        "service database so the migration distributes the tables; `off`: never")
    citus_workers: int = setting(
        "REWARDS_CITUS_WORKERS", "0", "with `REWARDS_CITUS=on`, local Citus workers started beside the coordinator, "
        "each a cluster of its own in `$REWARDS_DATA_DIR/worker-<i>` on port `REWARDS_PG_PORT + i`; with any, the "
        "coordinator holds no shards", int)
    start_seconds: float = setting(
        "REWARDS_START_SECONDS", "120", "how long `rewards up` waits for each service it starts (PostgreSQL, "
        "PgBouncer, Redis, the API) to answer before it gives up, showing the end of its log", float)
    ha: bool = setting(
        "REWARDS_HA", "off", "`on`: pg_auto_failover runs a monitor on `REWARDS_PG_PORT` and a primary and a "
        "synchronous standby on the next two ports (README \"HA\"); `off`: the one cluster", lambda text: text == "on")
    ha_metrics_port: int = setting("REWARDS_HA_METRICS_PORT", "9191",
                                   "where `rewards ha follow` serves its metrics (0: nowhere)", int)

    # --- PgBouncer and Redis, beside the cluster -------------------------------
    bouncer_host: str = setting(
        "REWARDS_BOUNCER_HOST", "127.0.0.1", "PgBouncer's address: where it listens and the API reaches it (a name "
        "is looked up by both, as docker-compose.yml's `pgbouncer` is)")
    bouncer_port: int = setting("REWARDS_BOUNCER_PORT", "64329", "PgBouncer's port", int)
    redis_url: str = setting("REWARDS_REDIS_URL", "redis://127.0.0.1:6379/0",
                             "Redis for the shared rate limits (started by `make run` when nothing answers there)")
    redis_prefix: str = setting("REWARDS_REDIS_PREFIX", "rewards", "prefix of the bucket keys")

    # --- The HTTP API ----------------------------------------------------------
    api_host: str = setting("REWARDS_API_HOST", "127.0.0.1", "the address the API listens on")
    api_port: int = setting("REWARDS_API_PORT", "8000", "the port the API listens on", int)
    api_workers: int = setting("REWARDS_API_WORKERS", None, "API worker processes",
                               int, shown="cores")
    api_server: str = setting("REWARDS_API_SERVER", "uvicorn",
                              "or `granian`; measured side by side in `bench/RESULTS.md`")
    api_worker_healthcheck_seconds: int = setting(
        "REWARDS_API_WORKER_HEALTHCHECK_SECONDS", "60", "uvicorn: how long an API worker process may take to answer "
        "its server's health check, while it starts too, before it is killed and started again (uvicorn's own 5 s "
        "killed workers importing slowly on a loaded machine)", int)
    auth_cache_seconds: float = setting("REWARDS_AUTH_CACHE_SECONDS", "2",
                                        "how long a process trusts a looked-up key (a revocation takes this long)",
                                        float)
    max_in_flight: int = setting("REWARDS_MAX_IN_FLIGHT", "256",
                                 "requests one process works on at once; more get 503", int)
    pool_min: int = setting("REWARDS_POOL_MIN", "2", "fewest database connections per process (to PgBouncer)", int)
    pool_max: int = setting("REWARDS_POOL_MAX", "16", "most database connections per process (to PgBouncer)", int)
    pool_wait_seconds: float = setting("REWARDS_POOL_WAIT_SECONDS", "0.5",
                                       "longest wait for a connection before 503", float)
    max_body_bytes: int = setting("REWARDS_MAX_BODY_BYTES", "16384", "larger bodies get 413", int)
    max_bulk_body_bytes: int = setting("REWARDS_MAX_BULK_BODY_BYTES", "1048576",
                                       "larger bodies of `POST /v1/credits/bulk` get 413", int)
    group_commit: bool = setting(
        "REWARDS_GROUP_COMMIT", "on", "`on`: credits that arrive while this process's calls are at the database "
        "go together as one call, one commit (README \"Group commit\"); `off`: one call per credit",
        lambda text: text == "on")
    group_commit_calls: int = setting(
        "REWARDS_GROUP_COMMIT_CALLS", "4", "group commit: calls in flight at once per process and Citus shard; a "
        "credit arriving while fewer are is sent at once, alone", int)
    group_commit_max_items: int = setting("REWARDS_GROUP_COMMIT_MAX_ITEMS", "64",
                                          "group commit: most credits in one call", int)
    group_commit_max_queued: int = setting(
        "REWARDS_GROUP_COMMIT_MAX_QUEUED", "256", "group commit: most credits waiting to be sent per process; "
        "more get 503", int)
    group_commit_wait_seconds: float = setting(
        "REWARDS_GROUP_COMMIT_WAIT_SECONDS", "0.5", "group commit: longest wait of a credit to be sent before 503",
        float)
    shard_map_seconds: float = setting("REWARDS_SHARD_MAP_SECONDS", "10",
                                       "how often a process reloads the Citus shard map it groups users by "
                                       "(a shard split is picked up within this)", float)

    # --- Rate limits: token buckets, 'RATE/BURST' -------------------------------
    rate_user_earn: Tier = setting("REWARDS_RATE_USER_EARN", "10/20",
                                   "per-user credits: rate a second / burst", Tier.parse)
    rate_user_redeem: Tier = setting("REWARDS_RATE_USER_REDEEM", "5/10",
                                     "per-user debits, reservations, commits, releases", Tier.parse)
    rate_api_key: Tier = setting("REWARDS_RATE_API_KEY", "5000/10000", "per API key, all requests", Tier.parse)
    rate_global: Tier = setting("REWARDS_RATE_GLOBAL", "20000/40000", "all requests together", Tier.parse)
    rate_tiers: NamedTiers = setting(
        "REWARDS_RATE_TIERS", "", "named per-key buckets, 'NAME=RATE/BURST,...': a key given a tier "
        "(`rewards keys limit --tier NAME`) takes its own bucket from it in place of REWARDS_RATE_API_KEY",
        NamedTiers.parse, shown="none")
    rate_key_lookup: Tier = setting(
        "REWARDS_RATE_KEY_LOOKUP", "20/40", "per client address: database lookups of API keys never seen valid "
        "(made-up keys past it get 429 before the database)", Tier.parse)

    # --- The audit stream and notifications ------------------------------------
    audit_metrics_port: int = setting("REWARDS_AUDIT_METRICS_PORT", "9187",
                                      "where `rewards audit run` serves its lag metrics (0: nowhere)", int)
    notify_url: str | None = setting("REWARDS_NOTIFY_URL", None,
                                     "the app's notification endpoint; no sender runs while unset", shown="unset")
    notify_secret: str | None = setting("REWARDS_NOTIFY_SECRET", None, "the HMAC key for the signature",
                                        shown=GENERATED, secret="notify-secret")
    notify_metrics_port: int = setting("REWARDS_NOTIFY_METRICS_PORT", "9188",
                                       "where `rewards notify run` serves its metrics (0: nowhere)", int)
    notify_max_attempts: int = setting("REWARDS_NOTIFY_MAX_ATTEMPTS", "8",
                                       "deliveries tried before a notification is parked", int)

    # --- Signed callbacks from partners (README "Signed callbacks") ------------
    callback_master_key: str | None = setting(
        "REWARDS_CALLBACK_MASTER_KEY", None, "the key every callback source's secret is derived from (with the "
        "source's salt in the database); changing it invalidates every source's secret", shown=GENERATED,
        secret="callback-master-key")
    callback_tolerance_seconds: int = setting(
        "REWARDS_CALLBACK_TOLERANCE_SECONDS", "300", "a callback's timestamp may be this many seconds before or "
        "after the API's clock; others are refused as stale", int)

    def environment(self) -> dict[str, str]:
        """The variables that make load() give back these settings: what a
        process started on their behalf (by supervisord) is given. A secret
        that load() reads from its file is left to be read there."""
        return {spec.metadata["env"]: _text(value) for spec in fields(self)
                if (value := getattr(self, spec.name)) is not None
                and not (spec.metadata["secret"] and value == _read_secret(self.secrets_dir / spec.metadata["secret"]))}

    @property
    def pg_data(self) -> Path:
        return self.data_dir / "pg"

    @property
    def socket_dir(self) -> Path:
        return self.data_dir / "run"

    @property
    def log_dir(self) -> Path:
        return self.data_dir / "log"

    @property
    def log_file(self) -> Path:
        return self.log_dir / "postgresql.log"

    @property
    def secrets_dir(self) -> Path:
        return self.data_dir / "secrets"

    def superuser_conninfo(self, dbname: str | None = None) -> str:
        """libpq conninfo for the superuser over the cluster's Unix socket."""
        return self.local_conninfo(self.pg_superuser, dbname)

    @property
    def db_ports(self) -> tuple[int, ...]:
        """Where the service database answers: the cluster's port, or with
        REWARDS_HA=on both nodes' ports, of which libpq picks the primary."""
        return (self.pg_port + 1, self.pg_port + 2) if self.ha else (self.pg_port,)

    def local_conninfo(self, role: str, dbname: str | None = None) -> str:
        """A role over the cluster's Unix socket (trusted: only root and the
        cluster's OS user can reach it), as the audit consumer and sender connect."""
        return self._conninfo(str(self.pg_host or self.socket_dir), self.db_ports, role, dbname)

    def _conninfo(self, host: str, ports: tuple[int, ...], role: str, dbname: str | None, **extra: str) -> str:
        # With REWARDS_HA=on, every node's port on the same host, and libpq
        # takes the first one that accepts writes (it tries them in turn).
        if self.ha and len(ports) > 1:
            extra["target_session_attrs"] = "read-write"
        return make_conninfo(host=",".join([host] * len(ports)), port=",".join(map(str, ports)), user=role,
                             dbname=dbname or self.database, **extra)

    def api_conninfo(self, dbname: str | None = None) -> str:
        """The API's role, straight to PostgreSQL over TCP."""
        return self._api_role_over_tcp("127.0.0.1", self.db_ports, dbname)

    def bouncer_conninfo(self, dbname: str | None = None) -> str:
        """The API's role through PgBouncer, as the API connects."""
        return self._api_role_over_tcp(self.bouncer_host, (self.bouncer_port,), dbname)

    def _api_role_over_tcp(self, host: str, ports: tuple[int, ...], dbname: str | None) -> str:
        return self._conninfo(host, ports, "rewards_api", dbname, password=self.required("api_password"))

    def required(self, name: str) -> str:
        """A secret's value, or a refusal saying where it comes from."""
        value = getattr(self, name)
        if not value:
            spec = next(spec for spec in fields(self) if spec.name == name)
            raise MissingSecret(f"{spec.metadata['env']} is not set and {self.secrets_dir / spec.metadata['secret']} "
                                "does not exist: `rewards up` makes it, or set the variable")
        return value



def _text(value: Any) -> str:
    """A setting's value as its variable spells it."""
    if isinstance(value, bool):
        return "on" if value else "off"
    return str(value)


# Defaults computed on the machine that reads them.
_COMPUTED = {
    "REWARDS_DATA_DIR": lambda: str(PROJECT_ROOT / ".data"),
    "REWARDS_API_WORKERS": lambda: str(os.cpu_count() or 2),
}


def load(env: Mapping[str, str] = os.environ) -> Settings:
    values: dict[str, Any] = {}
    for spec in fields(Settings):
        meta = spec.metadata
        text = env.get(meta["env"]) or meta["default"]
        if text is None and meta["env"] in _COMPUTED:
            text = _COMPUTED[meta["env"]]()
        if text is None and meta["secret"]:
            text = _read_secret(values["data_dir"] / "secrets" / meta["secret"])
        values[spec.name] = None if text is None else meta["parse"](text)
    return Settings(**values)


def _read_secret(path: Path) -> str | None:
    try:
        return path.read_text().strip() or None
    except FileNotFoundError:
        return None


def readme_table() -> str:
    """The README's settings table, made from the fields above."""
    lines = ["| variable | default | meaning |", "|---|---|---|"]
    for spec in fields(Settings):
        meta = spec.metadata
        default = meta["shown"] or f"`{meta['default']}`"
        lines.append(f"| `{meta['env']}` | {default} | {meta['doc']} |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(readme_table())
