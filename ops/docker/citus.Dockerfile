# A Citus node of docker-compose.yml: the Citus image with what the migrations
# and the audit stream need besides, the builds `make run` installs (Debian
# 12's, preferred with -t bookworm over the image's PostgreSQL repository, whose
# pg_partman 5 no longer takes the migrations' p_type 'native' and 'monthly'):
# pg_partman 4.7 (audit history partitions), pg_cron (expiry, partition
# upkeep) and wal2json (the audit stream's decoder); and the project's
# PostgreSQL settings (ops/postgresql.conf, which docker-compose.yml names as
# config_file). Built by docker-compose.yml from the repository's root.
FROM citusdata/citus:13.2-pg15
RUN apt-get update \
    && apt-get install -y --no-install-recommends -t bookworm \
        postgresql-15-partman postgresql-15-cron postgresql-15-wal2json \
    && rm -rf /var/lib/apt/lists/*
COPY ops/postgresql.conf /etc/rewards/postgresql.conf
