"""The HTTP API: Litestar over PgBouncer, one SQL function call per request."""
