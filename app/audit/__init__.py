"""The audit side: the change stream into history, notifications, reconciliation."""
