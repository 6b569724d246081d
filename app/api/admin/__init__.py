"""The administration of earning: rules, campaigns and their change history (scope admin)."""
