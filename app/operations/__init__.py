"""Running the service: the PostgreSQL cluster, the processes beside it, migrations."""
