"""pytest hooks: options, the ``gpu`` marker, and the controller when ``--gpu-cloud`` is on.

Thin by design: settings live in settings.py, the grammar in request.py, and the running
of gpu tests in controller.py.
"""

from __future__ import annotations

import pytest

from pytest_gpucloud.controller import REQUEST_KEY, SKIP_REASON, Controller, GpuCloudHandle
from pytest_gpucloud.errors import ConfigError, MarkerError
from pytest_gpucloud.request import request_for_item
from pytest_gpucloud.settings import OPTIONS, Settings, from_config

SETTINGS_KEY = pytest.StashKey[Settings]()
CONTROLLER_KEY = pytest.StashKey[Controller]()
MARKER_DOC = (
    "gpu(spec=None, *, count=1, vram=None, image=None, timeout=None, env=(), data=None): "
    "run this test on a cloud GPU instance with pytest --gpu-cloud (skipped without it)"
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
        else:
            group.addoption(
                option.flag,
                dest=option.dest,
                default=None,
                metavar=option.metavar,
                help=help_text,
            )
            parser.addini(option.ini, option.help, default="")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", MARKER_DOC)
    try:
        settings = from_config(config)
        provider = settings.chosen_provider() if settings.enabled else None
    except ConfigError as exc:
        raise pytest.UsageError(str(exc)) from None
    config.stash[SETTINGS_KEY] = settings
    if provider is not None:
        controller = Controller(config, settings, provider)
        config.stash[CONTROLLER_KEY] = controller
        config.pluginmanager.register(controller, "gpucloud-controller")


def pytest_unconfigure(config: pytest.Config) -> None:
    controller = config.stash.get(CONTROLLER_KEY, None)
    if controller is not None:
        controller.close()
        config.pluginmanager.unregister(controller)
        del config.stash[CONTROLLER_KEY]


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(
    session: pytest.Session, config: pytest.Config, items: list[pytest.Item]
) -> None:
    """Parse every gpu marker; a bad one becomes a collection error naming test and argument."""
    enabled = CONTROLLER_KEY in config.stash
    kept: list[pytest.Item] = []
    for item in items:
        try:
            request = request_for_item(item)
        except MarkerError as exc:
            report = pytest.CollectReport(item.nodeid, "failed", str(exc), [])
            session.ihook.pytest_collectreport(report=report)
            continue
        if request is not None:
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
