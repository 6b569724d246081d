# The project's own image, for docker-compose.yml: the `rewards` package with
# its locked Python dependencies, and PgBouncer and Redis, all as `make run`
# installs them on Debian 12 (ops/install.sh). Each container runs one of the
# programs `rewards up` supervises, as the unprivileged user `rewards`, with
# the data folder (secrets, PgBouncer's files) on a volume at /var/lib/rewards.
FROM debian:12-slim
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-pip pgbouncer redis-server \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m pip install --no-cache-dir --break-system-packages uv \
    && useradd --system --home-dir /var/lib/rewards --shell /usr/sbin/nologin rewards \
    && install -d -o rewards -g rewards /var/lib/rewards
WORKDIR /opt/rewards
ENV UV_COMPILE_BYTECODE=1 UV_NO_CACHE=1 UV_PYTHON_DOWNLOADS=never
# The locked dependencies first, a layer that changes only with uv.lock.
COPY pyproject.toml uv.lock README.md ./
RUN uv sync --frozen --no-dev --no-install-project
COPY alembic.ini ./
COPY app app
COPY migrations migrations
COPY sql sql
RUN uv sync --frozen --no-dev
ENV PATH=/opt/rewards/.venv/bin:$PATH
USER rewards
