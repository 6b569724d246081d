"""POST /v1/credits/bulk: many credits in one request."""
