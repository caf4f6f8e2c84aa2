"""Code that runs on the instance. Imports only the standard library and pytest.

It is shipped to the instance as a top-level package of its own, so every import inside
it is relative.
"""

from __future__ import annotations

import os

_SOURCES: dict[str, str] = {}


def source(module: str) -> str:
    """The source of one of this package's standalone modules (``receive``, ``boot``,
    ``filepipe``), sent as the ``python3 -c`` program of an exec, before anything of ours is
    on the instance. (No pathlib or functools here: the worker imports this package.)"""
    if module not in _SOURCES:
        path = os.path.join(os.path.dirname(__file__), f"{module}.py")
        with open(path, encoding="utf-8") as f:
            _SOURCES[module] = f.read()
    return _SOURCES[module]
