"""The leaves: errors, units, the marker grammar, the catalog, labels, the wire models,
address grammars, environment names, GPU probes, the engine's event loop, and asyncssh
imported without the warnings of its import (``sshlib``).

Imports nothing else of the package (checked by import-linter, see ``pyproject.toml``).
"""
