"""``python3 -m gpucloud_remote``: the remote worker (see :mod:`.worker`)."""

from __future__ import annotations

import sys

from .worker import main

sys.exit(main())
