"""Refunds: POST /v1/refunds reverses what a verified action earned."""
