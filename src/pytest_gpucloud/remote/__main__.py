"""The remote worker (see :mod:`.worker`), run by the bootstrap (``boot.py``) or as
``python3 -m gpucloud_remote``."""

from __future__ import annotations

import sys

from .worker import main

sys.exit(main())
