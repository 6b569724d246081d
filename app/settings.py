"""Every setting, read from the environment in this one place."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parent.parent


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

    @property
    def pg_data(self) -> Path:
        return self.data_dir / "pg"

    @property
    def socket_dir(self) -> Path:
        return self.data_dir / "run"

    @property
    def log_file(self) -> Path:
        return self.data_dir / "log" / "postgresql.log"

    def superuser_conninfo(self, dbname: str | None = None) -> str:
        """libpq conninfo for the superuser over the cluster's Unix socket."""
        return (
            f"host={self.pg_host or self.socket_dir} port={self.pg_port} user={self.pg_superuser} "
            f"dbname={dbname or self.database}"
        )

    def api_conninfo(self, dbname: str | None = None) -> str:
        return (
            f"host=127.0.0.1 port={self.pg_port} user=rewards_api "
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
    )
