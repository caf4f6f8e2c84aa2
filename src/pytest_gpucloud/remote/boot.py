"""The worker's bootstrap; runs on the instance as ``python3 -c <source>`` in the workspace.

It lets the worker start while the code sync is still running. It imports pytest, the
slow part of a worker's start, says ``{"type": "loaded"}`` on stdout (with ``probe``, the
output of the GPU check run in the same exec, when there was one), then waits for one
byte on stdin. On ``g`` (the sync is done) it imports the worker from the now complete
workspace (``PYTHONPATH`` names the synced package folder) and runs it, which says
``hello``. Anything else, or EOF: the local side gave up; exit 0.

The workspace is still arriving while pytest is imported, so the current folder is left
out of ``sys.path`` until then: nothing half-written is ever imported. Plugins are not
imported early: pytest would no longer rewrite their asserts, and would warn so. Standard
library and pytest only.
"""

import sys

# ``-c`` put the current folder first on sys.path; nothing may be imported from it before
# the go (a file planted there, or a half-synced one).
if sys.path[:1] == [""]:
    del sys.path[0]

import importlib
import os
import runpy

GO = b"g"  # the byte the local side sends once the sync is complete
# What the GPU check printed, run in the same exec just before: told with ``loaded``.
PROBE_ENV = "GPUCLOUD_GPU_PROBE"


def main() -> int:
    import pytest  # noqa: F401  (the slow part of a start, done while the sync runs)

    probe = os.environ.pop(PROBE_ENV, None)
    if probe is None:
        os.write(1, b'{"type":"loaded"}\n')
    else:
        import json

        os.write(1, json.dumps({"type": "loaded", "probe": probe}).encode() + b"\n")
    if os.read(0, 1) != GO:
        return 0
    sys.path.insert(0, "")  # the complete workspace, as ``-c`` had it
    # Folders that did not exist or were half-filled when pytest was imported.
    sys.path_importer_cache.clear()
    importlib.invalidate_caches()
    runpy.run_module("gpucloud_remote", run_name="__main__", alter_sys=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
