"""What a server needs before it may join the Citus cluster, compared from the
facts it reports about itself (sql/queries.sql, node_facts) with the
coordinator's. Plain data in, one line per shortcoming out."""

from __future__ import annotations

# What `missing` checks, as `rewards cluster add-node` reports it.
CHECKED = (
    "Citus on the coordinator connects to it (as the superuser, and as each service role already there)",
    "the same PostgreSQL major version",
    "the citus extension in the service database, at the coordinator's version, preloaded first",
    "the extensions Citus copies to every node available at the coordinator's versions",
    "wal_level = logical (the audit slot, and shard moves by logical replication)",
    "citus.enable_change_data_capture = on (the history names tables, not shards; moves emit nothing)",
    "the decoders allowed where output_plugin_libraries exists (wal2json, pgoutput)",
    "two replication slots free (the audit slot, and a shard move off it later)",
)

# Decoders the node must allow: the audit stream's, and the one Citus' shard
# moves replicate with.
DECODERS = ("wal2json", "pgoutput")


def _names(setting: str | None) -> list[str]:
    return [name.strip() for name in (setting or "").split(",") if name.strip()]


def missing(here: dict, there: dict, extensions: list[dict], database: str) -> list[str]:
    """What `there` (the new server) lacks that `here` (the coordinator) has,
    for the distributed `extensions` ({name, version}) of `database`."""
    found = []
    if there["server_version_num"] // 10000 != here["server_version_num"] // 10000:
        found.append(f"PostgreSQL {there['server_version']} there, {here['server_version']} on the coordinator: "
                     "the major versions must be the same")
    preload = _names(there["preload"])
    if not preload or preload[0] != "citus":
        found.append(f"citus is not first in shared_preload_libraries there ('{there['preload']}'): set it and "
                     "restart that server")
    elif there["citus"] is None:
        found.append(f"the citus extension is not created in database {database} there: CREATE EXTENSION citus")
    elif there["citus"] != here["citus"]:
        found.append(f"Citus {there['citus']} there, {here['citus']} on the coordinator: the versions must be the same")
    for extension in extensions:
        name, version = extension["name"], extension["version"]
        if name in ("citus", "plpgsql"):
            continue
        available = there["available"].get(name, [])
        if version not in available:
            found.append(f"extension {name} {version} is not available there "
                         f"({'available: ' + ', '.join(available) if available else 'not installed'})")
        if name == "pg_cron" and name not in preload:
            found.append("pg_cron is not in shared_preload_libraries there (Citus creates the extension on every node)")
    if there["wal_level"] != "logical":
        found.append(f"wal_level is {there['wal_level']} there, not logical (no audit slot and no shard move without "
                     "it): set it and restart that server")
    if there["change_data_capture"] != "on":
        found.append(f"citus.enable_change_data_capture is {there['change_data_capture'] or 'unset'} there, not on "
                     "(the audit stream would see shards instead of tables, and every shard move as new entries)")
    if there["output_plugin_libraries"] is not None:
        allowed = _names(there["output_plugin_libraries"])
        refused = [decoder for decoder in DECODERS if decoder not in allowed]
        if refused:
            found.append(f"output_plugin_libraries there ('{there['output_plugin_libraries']}') does not allow "
                         f"{' and '.join(refused)}")
    if there["free_slots"] < 2:
        found.append(f"only {there['free_slots']} replication slots are free there (max_replication_slots): the "
                     "audit slot and a shard move off the node need 2")
    return found
