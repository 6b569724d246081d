"""Signed callbacks: partners confirming actions, authenticated by a signature."""
