"""Coverage of the remote session, for the local ``--cov`` (pytest-cov).

Started before pytest imports anything, as pytest-cov starts it locally; its data travels
home in the worker's last frame, where the local side maps the paths and merges it into
pytest-cov's report. ``coverage`` is imported only when the local session asks for it: the
local side ships its own copy in the worker's package folder.
"""

from __future__ import annotations

import base64
from typing import Any

# Warnings that concern the merged report, not one instance's part of it.
QUIET = ["module-not-imported", "module-not-measured", "no-data-collected"]


class Measurement:
    """One ``coverage.Coverage`` over the whole remote session, data kept in memory."""

    def __init__(self, spec: dict[str, Any]) -> None:
        try:
            import coverage
        except ImportError as exc:
            raise RuntimeError(f"--cov needs coverage on the instance: {exc}") from None
        self._cov = coverage.Coverage(
            data_file=None,
            source=spec.get("source"),
            branch=bool(spec.get("branch")),
            config_file=spec.get("config_file", True),
        )
        self._cov.set_option("run:disable_warnings", QUIET)
        self._cov.start()

    def finish(self) -> str:
        """Stop measuring; the data, serialized by coverage and base64-encoded."""
        self._cov.stop()
        return base64.b64encode(self._cov.get_data().dumps()).decode("ascii")
