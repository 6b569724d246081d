#!/usr/bin/env bash
# The second pass of `make test`: the whole suite again, on a Citus coordinator
# with two workers (three clusters of their own under .data/citus-pass, on ports
# of their own), started like `REWARDS_CITUS=on REWARDS_CITUS_WORKERS=2 make run`
# and stopped afterwards. Without the citus extension it says why, in one line.
set -euo pipefail
cd "$(dirname "$0")/.."

pkglibdir=$("${REWARDS_PG_BIN:-/usr/lib/postgresql/15/bin}/pg_config" --pkglibdir)
if [[ ! -e "$pkglibdir/citus.so" ]]; then
    echo "Citus pass skipped: the citus extension is not installed in this PostgreSQL ($pkglibdir has no citus.so)"
    exit 0
fi

export REWARDS_DATA_DIR="$PWD/.data/citus-pass" REWARDS_PG_PORT=25442 REWARDS_BOUNCER_PORT=64339 \
    REWARDS_API_PORT=8009 REWARDS_REDIS_URL=redis://127.0.0.1:6389/0 REWARDS_AUDIT_METRICS_PORT=9189 \
    REWARDS_NOTIFY_METRICS_PORT=9190 \
    REWARDS_CITUS=on REWARDS_CITUS_WORKERS=2
trap 'uv run rewards down' EXIT
uv run rewards up
uv run pytest "$@"
