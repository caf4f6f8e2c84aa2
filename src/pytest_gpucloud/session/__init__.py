"""The ``--gpu-cloud`` pytest session: the controller's hooks and its roles (making the fleet,
the order of gpu tests, replaying their results, signals, the summary and the report).
Only this layer (and ``plugin.py``) calls pytest hooks.

May import: every layer below it (``desk`` and down).
"""
