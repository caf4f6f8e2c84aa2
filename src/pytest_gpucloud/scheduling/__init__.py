"""Scheduling: which instances a session needs, where each test runs, and what it costs."""
