"""Leaves: errors, units, the marker grammar, the catalog, labels and the wire models.

Imports nothing else of the package (stdlib and libraries only).
"""
