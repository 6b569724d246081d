"""Accounts: credits, debits, reservations, balance and history of one user."""
