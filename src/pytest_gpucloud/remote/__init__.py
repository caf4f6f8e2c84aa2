"""Code that runs on the instance. Imports only the standard library and pytest.

It is shipped to the instance as a top-level package of its own, so every import inside
it is relative.
"""

import functools
import pathlib


@functools.cache
def source(module: str) -> str:
    """The source of one of this package's standalone modules (``receive``, ``boot``), sent
    as the ``python3 -c`` program of an exec, before anything of ours is on the instance."""
    return (pathlib.Path(__file__).parent / f"{module}.py").read_text()
