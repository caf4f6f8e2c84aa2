"""Getting to instances and getting code onto them: SSH connections, the code sync, the
worker link, file pipes, and the one SSH exec server (of sim instances and ``local`` slots).

Knows no cloud and no pytest. May import: ``core``, ``remote`` (its sources and protocol).
"""
