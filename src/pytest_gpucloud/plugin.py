"""pytest hooks: options, the ``gpu`` marker, and the controller when ``--gpu-cloud`` is on.

Thin by design: settings live in config/settings.py, the grammar in core/request.py, and the
running of gpu tests in session/controller.py.
"""

from __future__ import annotations

import dataclasses
import os
from typing import TYPE_CHECKING, Any

import pytest

from pytest_gpucloud import hooks
from pytest_gpucloud.config.settings import OPTIONS, from_config
from pytest_gpucloud.core.environment import SECRET_ENV
from pytest_gpucloud.core.errors import PREFIX, ConfigError, MarkerError
from pytest_gpucloud.core.request import GpuRequest, request_for_item
from pytest_gpucloud.providers import BUILTIN, ProviderFactory, ProviderRegistry, vendors
from pytest_gpucloud.session.stash import (
    PROVIDERS_KEY,
    REQUEST_KEY,
    SETTINGS_KEY,
    SKIP_REASON,
    WORKERINPUT_KEY,
)

if TYPE_CHECKING:
    from collections.abc import Iterator

    from pytest_gpucloud.desk.ipc import Handoff
    from pytest_gpucloud.features.gpu_service import ServiceFactory
    from pytest_gpucloud.session.controller import Controller
    from pytest_gpucloud.session.handle import GpuCloudHandle
# The --gpu-cloud session's controller; named here, so the stash needs no controller import.
CONTROLLER_KEY: pytest.StashKey[Controller] = pytest.StashKey()
CI_OUTPUTS = "gpucloud-ci-outputs"
MARKER_DOC = (
    "gpu(spec=None, *, count=1, vram=None, image=None, timeout=None, env=(), data=None, "
    "spot=False): run this test on a cloud GPU instance with pytest --gpu-cloud (skipped "
    "without it)"
)


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("gpu-cloud", "run gpu-marked tests on cloud GPU instances")
    for option in OPTIONS:
        env = f" [env {option.env}]" if option.env else ""
        help_text = f"{option.help}{env} [ini {option.ini}]"
        if option.is_switch:
            group.addoption(
                option.flag, dest=option.dest, action="store_true", default=None, help=help_text
            )
            parser.addini(option.ini, option.help, type="bool", default=False)
        elif option.repeatable:
            group.addoption(
                option.flag,
                dest=option.dest,
                action="append",
                default=None,
                metavar=option.metavar,
                help=help_text,
            )
            parser.addini(option.ini, option.help, type="args", default=[])
        else:
            group.addoption(
                option.flag,
                dest=option.dest,
                default=None,
                metavar=option.metavar,
                help=help_text,
            )
            parser.addini(option.ini, option.help, default="")


def pytest_addhooks(pluginmanager: pytest.PytestPluginManager) -> None:
    pluginmanager.add_hookspecs(hooks)


def pytest_gpucloud_register_providers() -> dict[str, ProviderFactory]:
    return BUILTIN


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", MARKER_DOC)
    workerinput: dict[str, Any] | None = getattr(config, "workerinput", None)
    # An xdist worker reaches the controller's fleet; it has no provider of its own.
    handoff: Handoff | None = (workerinput or {}).get(WORKERINPUT_KEY)
    try:
        registry = ProviderRegistry.collect(config.hook.pytest_gpucloud_register_providers())
        settings = from_config(config, registry.names)
        provider = None
        if settings.enabled:
            provider = handoff["provider"] if handoff else settings.chosen_provider()
            vendors.check(provider, settings)
    except ConfigError as exc:
        raise pytest.UsageError(str(exc)) from None
    config.stash[SETTINGS_KEY] = settings
    config.stash[PROVIDERS_KEY] = registry
    if provider is None:
        return
    if workerinput is not None and handoff is None:
        raise pytest.UsageError(
            f"{PREFIX}this xdist worker got no fleet from its controller: run the controller "
            "with the same --gpu-cloud options"
        )
    # Imported here: a session without --gpu-cloud never loads SSH, HTTP or the fleet.
    from pytest_gpucloud.session.controller import Controller

    controller = Controller(config, settings, provider, handoff)
    config.stash[CONTROLLER_KEY] = controller
    config.pluginmanager.register(controller, "gpucloud-controller")
    if workerinput is None:
        from pytest_gpucloud.session.ci_outputs import CiOutputs

        config.pluginmanager.register(CiOutputs(controller), CI_OUTPUTS)
    if settings.plan and workerinput is None:
        # --gpu-plan runs no test, so it starts no xdist worker (xdist configures after us)
        config.option.dist = "no"
    if workerinput is None and config.pluginmanager.hasplugin("xdist"):
        xdist_hooks = XdistControllerHooks(controller)
        config.stash[XDIST_HOOKS_KEY] = xdist_hooks
        config.pluginmanager.register(xdist_hooks, "gpucloud-xdist")


def pytest_unconfigure(config: pytest.Config) -> None:
    xdist_hooks = config.stash.get(XDIST_HOOKS_KEY, None)
    if xdist_hooks is not None:
        xdist_hooks.restore()
        config.pluginmanager.unregister(xdist_hooks)
        del config.stash[XDIST_HOOKS_KEY]
    ci_outputs = config.pluginmanager.get_plugin(CI_OUTPUTS)
    if ci_outputs is not None:
        config.pluginmanager.unregister(ci_outputs)
    controller = config.stash.get(CONTROLLER_KEY, None)
    if controller is not None:
        controller.close()
        config.pluginmanager.unregister(controller)
        del config.stash[CONTROLLER_KEY]


def pytest_report_header(config: pytest.Config) -> str | None:
    """Options of this plugin given without ``--gpu-cloud`` do nothing: say so once."""
    if CONTROLLER_KEY in config.stash:
        return None
    given = [o.flag for o in OPTIONS if config.getoption(o.dest, None) not in (None, False)]
    if not given:
        return None
    return f"gpu-cloud: off (no --gpu-cloud): {', '.join(given)} do nothing; gpu tests are skipped"


class XdistControllerHooks:
    """pytest-xdist's controller hooks, registered only where xdist is installed: every
    worker gets the fleet's socket in its ``workerinput``; no worker gets an API key."""

    def __init__(self, controller: Controller) -> None:
        self._controller = controller
        self._hidden: dict[str, str] = {}

    def pytest_xdist_setupnodes(self) -> None:
        # Workers inherit this process's environment; the keys are in Settings already.
        self._hidden = {name: os.environ.pop(name) for name in SECRET_ENV if name in os.environ}

    def pytest_configure_node(self, node: Any) -> None:
        node.workerinput[WORKERINPUT_KEY] = self._controller.handoff()

    def restore(self) -> None:
        for name, value in self._hidden.items():
            os.environ.setdefault(name, value)


XDIST_HOOKS_KEY = pytest.StashKey[XdistControllerHooks]()


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(
    session: pytest.Session, config: pytest.Config, items: list[pytest.Item]
) -> None:
    """Parse every gpu marker; a bad one becomes a collection error naming test and argument."""
    enabled = CONTROLLER_KEY in config.stash
    kept: list[pytest.Item] = []
    known: dict[int, tuple[pytest.Mark, GpuRequest]] = {}  # a parametrized test's items share
    for item in items:
        try:
            request = request_for_item(item, known)
        except MarkerError as exc:
            report = pytest.CollectReport(item.nodeid, "failed", str(exc), [])
            session.ihook.pytest_collectreport(report=report)
            continue
        if request is not None:
            if enabled and config.stash[CONTROLLER_KEY].settings.spot and not request.spot:
                request = dataclasses.replace(request, spot=True)  # --gpu-spot
            item.stash[REQUEST_KEY] = request
            if not enabled:
                item.add_marker(pytest.mark.skip(reason=f"{SKIP_REASON} ({request.canonical()})"))
        kept.append(item)
    items[:] = kept


@pytest.fixture(scope="session")
def gpu_cloud(request: pytest.FixtureRequest) -> GpuCloudHandle:
    """The session's fleet: its instances, their states and the cost so far."""
    controller = request.config.stash.get(CONTROLLER_KEY, None)
    if controller is None:
        pytest.skip(SKIP_REASON)
    return controller.handle()


@pytest.fixture(scope="session")
def gpu_service(request: pytest.FixtureRequest) -> Iterator[ServiceFactory]:
    """``gpu_service(cmd, port=8000, spec="L4")``: a server started on a GPU instance for
    the session, health-checked, its port forwarded here; ``.url``, ``.base_url``,
    ``.logs()``, ``.openai_client()``. Skipped without ``--gpu-cloud``."""
    controller = request.config.stash.get(CONTROLLER_KEY, None)
    if controller is None:
        pytest.skip(SKIP_REASON)
    factory = controller.service_factory()
    yield factory
    factory.close()


def _remote_only(name: str) -> Any:
    @pytest.fixture(name=name)
    def fixture() -> None:
        """Lives on the instances only: say so rather than 'fixture not found'."""
        pytest.fail(
            f"{PREFIX}the {name} fixture lives on the instance, for gpu-marked tests: mark "
            f"this test @pytest.mark.gpu(...) to run it there, or drop {name}",
            pytrace=False,
        )

    return fixture


gpu_artifacts = _remote_only("gpu_artifacts")
gpu_data = _remote_only("gpu_data")
