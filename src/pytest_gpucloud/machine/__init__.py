"""One machine: create with failover, boot, prepare (container, setup, GPU check), the
container runtimes' command lines, deletion. Knows one machine, not the fleet.

May import: ``providers``, ``transport``, ``config``, ``core``, ``remote`` (its sources).
"""
