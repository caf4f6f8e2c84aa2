"""Options, ini keys and environment turned into one ``Settings``: pytest is read here.

May import: ``core``.
"""
