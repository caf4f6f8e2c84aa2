"""The fleet's front desk: ``FleetService`` in the controlling process, the IPC channel for
xdist workers. Callers above use the desk, never the fleet's internals.

May import: ``scheduling`` and the layers below it.
"""
