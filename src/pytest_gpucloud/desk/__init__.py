"""The fleet's front desk: ``FleetService`` for this process, the IPC channel for xdist workers.

May import: ``features``, ``scheduling``, ``machine``, ``transport``, ``config``, ``core``,
``remote`` (its wire protocol).
"""
