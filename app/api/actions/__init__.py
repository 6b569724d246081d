"""Verified actions: POST /v1/actions earns what the rules give."""
