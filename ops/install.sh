#!/usr/bin/env bash
# Installs what the project needs on Debian 12, as root: PostgreSQL 15 with
# pg_partman, wal2json, pg_cron and pg_auto_failover (for REWARDS_HA=on), PgBouncer,
# Redis, supervisor, promtool (Debian's prometheus package, for the alert rules' tests),
# and the Python environment.
# Installs only what is missing, so it is quick and safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."

packages=(
    postgresql-15 postgresql-15-partman postgresql-15-wal2json postgresql-15-cron postgresql-15-auto-failover
    pgbouncer redis-server supervisor acl wrk prometheus
)

missing=()
for package in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "install ok installed" || missing+=("$package")
done

if ((${#missing[@]})); then
    if [[ $EUID -ne 0 ]]; then
        echo "ops/install.sh: missing ${missing[*]}; run as root to install them" >&2
        exit 1
    fi
    # The project runs its own cluster; Debian's default one would only sit on port 5432.
    if [[ ! -e /etc/postgresql-common/createcluster.conf ]]; then
        mkdir -p /etc/postgresql-common
        echo "create_main_cluster = false" > /etc/postgresql-common/createcluster.conf
    fi
    echo "ops/install.sh: installing ${missing[*]}"
    before=$(dpkg-query -W -f='${Version}' postgresql-15 2>/dev/null || true)
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}"
    # An extension package may bring a newer postgresql-15 (a minor release):
    # running clusters keep the old binaries until restarted.
    after=$(dpkg-query -W -f='${Version}' postgresql-15)
    if [[ -n "$before" && "$before" != "$after" ]]; then
        echo "ops/install.sh: postgresql-15 went from $before to $after; restart running clusters (make stop; make run)" >&2
    fi
fi

if ! command -v uv >/dev/null 2>&1; then
    echo "ops/install.sh: installing uv"
    python3 -m pip install --quiet uv 2>/dev/null \
        || python3 -m pip install --quiet --break-system-packages uv
fi

uv sync --frozen --quiet
