"""Scheduling: the async orchestration of the fleet, the plan, the cost model, expected
durations, failover and progress events. Knows no pytest hooks.

May import: ``machine``, ``features``, ``providers``, ``transport``, ``config``, ``core``,
``remote`` (its wire protocol).
"""
