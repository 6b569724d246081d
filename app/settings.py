"""Every setting, read from the environment in this one place."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parent.parent


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


@dataclass(frozen=True)
class Settings:
    # The project's own PostgreSQL cluster.
    data_dir: Path
    pg_bin: Path
    pg_port: int
    pg_os_user: str
    pg_superuser: str
    # Where the superuser connects: the cluster's socket folder unless set (a
    # host name reaches a server elsewhere, with PGPASSWORD as libpq reads it).
    pg_host: str | None
    database: str
    # "auto": preload citus when the extension is installed; "on": also create it in
    # the service database so the migration distributes the tables; "off": never.
    citus: str
    # Password the API's role logs in with (over TCP; the superuser uses the socket).
    api_password: str

    # PgBouncer, in front of the cluster for the API.
    bouncer_port: int
    # Redis, for the rate limits every API process shares.
    redis_url: str
    redis_prefix: str

    # The HTTP API.
    api_host: str
    api_port: int
    api_workers: int
    # "uvicorn" or "granian": both run the same app.
    api_server: str
    # How long a process trusts a key it looked up: revocation takes this long.
    auth_cache_seconds: float
    # Requests one process works on at once; more are refused with 503.
    max_in_flight: int
    # Database connections per process, and how long a request may wait for one.
    pool_min: int
    pool_max: int
    pool_wait_seconds: float
    max_body_bytes: int
    # Token buckets: per user for earning and for redeeming, per API key, global.
    rate_user_earn: Tier
    rate_user_redeem: Tier
    rate_api_key: Tier
    rate_global: Tier

    # Where `rewards audit run` serves its lag metrics (0: not at all).
    audit_metrics_port: int
    # Notifications to the app's notification service (none sent while unset).
    notify_url: str | None
    notify_secret: str
    notify_max_attempts: int

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

    def superuser_conninfo(self, dbname: str | None = None) -> str:
        """libpq conninfo for the superuser over the cluster's Unix socket."""
        return self.local_conninfo(self.pg_superuser, dbname)

    def local_conninfo(self, role: str, dbname: str | None = None) -> str:
        """A role over the cluster's Unix socket (trusted: only root and the
        cluster's OS user can reach it), as the audit consumer and sender connect."""
        return (
            f"host={self.pg_host or self.socket_dir} port={self.pg_port} user={role} "
            f"dbname={dbname or self.database}"
        )

    def api_conninfo(self, dbname: str | None = None) -> str:
        """The API's role, straight to PostgreSQL over TCP."""
        return self._api_role_over_tcp(self.pg_port, dbname)

    def bouncer_conninfo(self, dbname: str | None = None) -> str:
        """The API's role through PgBouncer, as the API connects."""
        return self._api_role_over_tcp(self.bouncer_port, dbname)

    def _api_role_over_tcp(self, port: int, dbname: str | None) -> str:
        return (
            f"host=127.0.0.1 port={port} user=rewards_api "
            f"password={self.api_password} dbname={dbname or self.database}"
        )


def load() -> Settings:
    env = os.environ
    return Settings(
        data_dir=Path(env.get("REWARDS_DATA_DIR", PROJECT_ROOT / ".data")).resolve(),
        pg_bin=Path(env.get("REWARDS_PG_BIN", "/usr/lib/postgresql/15/bin")),
        pg_port=int(env.get("REWARDS_PG_PORT", "54329")),
        pg_os_user=env.get("REWARDS_PG_OS_USER", "rewards"),
        pg_superuser=env.get("REWARDS_PG_SUPERUSER", "postgres"),
        pg_host=env.get("REWARDS_PG_HOST") or None,
        database=env.get("REWARDS_DATABASE", "rewards"),
        citus=env.get("REWARDS_CITUS", "auto"),
        api_password=env.get("REWARDS_API_DB_PASSWORD", "rewards-api-dev"),
        bouncer_port=int(env.get("REWARDS_BOUNCER_PORT", "64329")),
        redis_url=env.get("REWARDS_REDIS_URL", "redis://127.0.0.1:6379/0"),
        redis_prefix=env.get("REWARDS_REDIS_PREFIX", "rewards"),
        api_host=env.get("REWARDS_API_HOST", "127.0.0.1"),
        api_port=int(env.get("REWARDS_API_PORT", "8000")),
        api_workers=int(env.get("REWARDS_API_WORKERS", str(os.cpu_count() or 2))),
        api_server=env.get("REWARDS_API_SERVER", "uvicorn"),
        auth_cache_seconds=float(env.get("REWARDS_AUTH_CACHE_SECONDS", "2")),
        max_in_flight=int(env.get("REWARDS_MAX_IN_FLIGHT", "256")),
        pool_min=int(env.get("REWARDS_POOL_MIN", "2")),
        pool_max=int(env.get("REWARDS_POOL_MAX", "16")),
        pool_wait_seconds=float(env.get("REWARDS_POOL_WAIT_SECONDS", "0.5")),
        max_body_bytes=int(env.get("REWARDS_MAX_BODY_BYTES", "16384")),
        rate_user_earn=Tier.parse(env.get("REWARDS_RATE_USER_EARN", "10/20")),
        rate_user_redeem=Tier.parse(env.get("REWARDS_RATE_USER_REDEEM", "5/10")),
        rate_api_key=Tier.parse(env.get("REWARDS_RATE_API_KEY", "5000/10000")),
        rate_global=Tier.parse(env.get("REWARDS_RATE_GLOBAL", "20000/40000")),
        audit_metrics_port=int(env.get("REWARDS_AUDIT_METRICS_PORT", "9187")),
        notify_url=env.get("REWARDS_NOTIFY_URL") or None,
        notify_secret=env.get("REWARDS_NOTIFY_SECRET", "rewards-notify-dev"),
        notify_max_attempts=int(env.get("REWARDS_NOTIFY_MAX_ATTEMPTS", "8")),
    )
