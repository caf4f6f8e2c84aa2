"""Providers turn an offer into a reachable machine and delete it again."""
