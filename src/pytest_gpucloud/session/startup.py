"""Making the session's fleet: its provider, its artifact store, the remote workers' start."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from pytest_gpucloud.config.settings import OPTIONS
from pytest_gpucloud.features import coverage
from pytest_gpucloud.features.artifacts import ArtifactStore, new_run_id
from pytest_gpucloud.scheduling.fleet import Fleet
from pytest_gpucloud.session.other_plugins import forwarded_args, option_packages
from pytest_gpucloud.session.replay import remote_pytest_args
from pytest_gpucloud.session.stash import PROVIDERS_KEY

if TYPE_CHECKING:
    import pytest

    from pytest_gpucloud.config.settings import Settings
    from pytest_gpucloud.providers.base import Provider
    from pytest_gpucloud.scheduling.durations import Durations
    from pytest_gpucloud.transport.worker_link import WorkerStart

#: The variables by which pytest knows it runs on CI (see _pytest.assertion.util).
CI_MARKERS = ("CI", "BUILD_NUMBER")


class FleetStarter:
    """Makes the fleet when the front desk first needs it; keeps the provider to close."""

    def __init__(
        self,
        config: pytest.Config,
        settings: Settings,
        provider_name: str,
        durations: Durations,
        workers: int,
    ) -> None:
        self.config = config
        self.settings = settings
        self.provider_name = provider_name
        self.durations = durations
        self.workers = workers
        self.provider: Provider | None = None

    async def __call__(self) -> Fleet:
        self.provider = await self.config.stash[PROVIDERS_KEY].make(
            self.provider_name, self.settings
        )
        artifacts = self._artifact_store()
        start = self._worker_start(artifacts.remote_root)
        return Fleet(
            self.provider,
            self.settings,
            rootdir=self.config.rootpath,
            start=start,
            project=self.config.rootpath.name,
            durations=self.durations,
            workers=self.workers,
            artifacts=artifacts,
            # coverage travels to the instances only with --cov
            packages=coverage.package_files() if start["coverage"] is not None else {},
        )

    def _artifact_store(self) -> ArtifactStore:
        run_id = new_run_id()
        settings = self.settings
        if settings.artifacts_dir is not None:
            given = os.path.expanduser(settings.artifacts_dir)
            root = self.config.invocation_params.dir / given
        else:
            root = self.config.rootpath / ".gpucloud" / "artifacts" / run_id
        return ArtifactStore(
            root,
            run_id,
            max_bytes=settings.artifacts_max,
            timeout=settings.timeout,
            s3_url=settings.artifacts_s3,
            s3_endpoint=settings.s3_endpoint,
        )

    def _worker_start(self, artifacts: str) -> WorkerStart:
        return {
            "args": [*remote_pytest_args(self.config), *forwarded_args(self.config)],
            "options": [{"name": o.flag, "takes_value": not o.is_switch} for o in OPTIONS],
            "ini": [o.ini for o in OPTIONS],
            # pytest shows full assertion diffs on CI; the remote session must too.
            "environ": {name: os.environ[name] for name in CI_MARKERS if name in os.environ},
            "artifacts": artifacts,
            "coverage": coverage.remote_request(self.config),
            "live_output": self.config.option.capture == "no",
            "plugin_options": option_packages(),
        }
