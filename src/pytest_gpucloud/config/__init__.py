"""Options, ini keys and environment turned into one ``Settings``: pytest is read here. It
reads, never builds providers.

May import: ``core``.
"""
