"""The leaves: errors, units, the marker grammar, the catalog, labels, the wire models,
address grammars, environment names, GPU probes and the engine's event loop.

Imports nothing else of the package (checked by import-linter, see ``pyproject.toml``).
"""
