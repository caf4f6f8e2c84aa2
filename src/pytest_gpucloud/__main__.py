"""``python -m pytest_gpucloud COMMAND``: the plugin's commands outside a pytest session.

``cleanup``: list this project's stale instances and delete them (see :mod:`.cleanup`).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from importlib import metadata

from pytest_gpucloud.cli import cleanup

COMMANDS = {"cleanup": cleanup.main}
USAGE = "usage: python -m pytest_gpucloud {cleanup} [--help] | --version"


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["--version"]:
        print(f"pytest-gpucloud {metadata.version('pytest-gpucloud')}")
        return 0
    if not args or args[0] in ("-h", "--help"):
        print(f"{USAGE}\n\n  cleanup  delete this project's instances past their expiry")
        return 0 if args else 2
    command = COMMANDS.get(args[0])
    if command is None:
        print(f"{USAGE}\ngpu-cloud: unknown command {args[0]!r}", file=sys.stderr)
        return 2
    return command(args[1:])


if __name__ == "__main__":
    sys.exit(main())
