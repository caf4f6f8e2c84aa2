"""Scheduling: the fleet's async orchestration, the pure policy it applies, the plan, the cost
model, expected durations and progress events. Knows no pytest hooks.

May import: ``features``, ``machine``, ``providers``, ``transport``, ``config``, ``core``,
``remote`` (its wire protocol).
"""
