"""Expected seconds, learnt from earlier runs and kept in pytest's cache.

Two tables: each test's duration (setup + call + teardown, by nodeid; local and remote
tests alike) under ``gpucloud/durations``, and each GPU type's boot (from the create call
to a remote worker that has collected) under ``gpucloud/boot``. The last observation
wins. Unknown values: :data:`DEFAULT_TEST_S` and :data:`DEFAULT_BOOT_S` where a cost is
estimated, nothing (0 s) where a start time is (see :mod:`pytest_gpucloud.scheduling.planner`).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import pytest

DURATIONS_KEY = "gpucloud/durations"
BOOTS_KEY = "gpucloud/boot"
DEFAULT_TEST_S = 30.0
DEFAULT_BOOT_S = 90.0
# A cache that grows past this forgets its oldest entries.
MAX_ENTRIES = 50_000


class Durations:
    """Expected test and boot seconds; the engine thread records boots, the main thread
    tests (plain dict updates)."""

    def __init__(
        self, tests: dict[str, float] | None = None, boots: dict[str, float] | None = None
    ) -> None:
        self.tests = dict(tests or {})
        self.boots = dict(boots or {})
        self._seen: dict[str, float] = {}

    @classmethod
    def load(cls, cache: pytest.Cache | None) -> Durations:
        """The tables in ``cache`` (None: no cacheprovider); a damaged entry is ignored."""
        if cache is None:
            return cls()
        return cls(_table(cache.get(DURATIONS_KEY, {})), _table(cache.get(BOOTS_KEY, {})))

    def save(self, cache: pytest.Cache | None) -> None:
        """Merge this session's observations into the cache."""
        if cache is None:
            return
        for nodeid, seconds in self._seen.items():
            self.tests.pop(nodeid, None)  # re-inserted last: the newest are kept
            self.tests[nodeid] = seconds
        cache.set(DURATIONS_KEY, _bounded(self.tests))
        cache.set(BOOTS_KEY, _bounded(self.boots))

    def known(self, nodeid: str) -> float | None:
        """The test's duration in the last run that ran it, if any."""
        return self.tests.get(nodeid)

    def test_s(self, nodeid: str) -> float:
        """Expected seconds of a test, for costs: known, else :data:`DEFAULT_TEST_S`."""
        known = self.tests.get(nodeid)
        return DEFAULT_TEST_S if known is None else known

    def boot_s(self, gpu: str) -> float:
        """Expected seconds from create to ready for a GPU type."""
        return self.boots.get(gpu, DEFAULT_BOOT_S)

    def add_phase(self, nodeid: str, seconds: float) -> None:
        """Add one phase (setup, call or teardown) of a test run in this session."""
        self._seen[nodeid] = self._seen.get(nodeid, 0.0) + max(0.0, seconds)

    def record_boot(self, gpu: str, seconds: float) -> None:
        self.boots[gpu] = round(seconds, 3)


def _table(value: object) -> dict[str, float]:
    if not isinstance(value, dict):
        return {}
    return {
        str(key): float(seconds)
        for key, seconds in value.items()
        if isinstance(seconds, (int, float))
        and not isinstance(seconds, bool)
        and math.isfinite(seconds)
        and seconds >= 0
    }


def _bounded(table: dict[str, float]) -> dict[str, float]:
    items = list(table.items())[-MAX_ENTRIES:]
    return {key: round(seconds, 3) for key, seconds in items}
