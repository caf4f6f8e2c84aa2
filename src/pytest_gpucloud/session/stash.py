"""What this plugin keeps in pytest's stashes and hands to xdist workers.

A module of its own so that ``plugin.py`` can name these without importing the machinery
(the controller, SSH, HTTP) that only a ``--gpu-cloud`` session needs.
"""

from __future__ import annotations

import pytest

from pytest_gpucloud.config.settings import Settings
from pytest_gpucloud.core.request import GpuRequest
from pytest_gpucloud.providers import ProviderRegistry

REQUEST_KEY = pytest.StashKey[GpuRequest]()
PROVIDERS_KEY = pytest.StashKey[ProviderRegistry]()
SETTINGS_KEY = pytest.StashKey[Settings]()
#: The key of the fleet's socket and token in an xdist worker's ``workerinput``.
WORKERINPUT_KEY = "gpucloud_fleet"
SKIP_REASON = "needs a GPU: run with --gpu-cloud"
