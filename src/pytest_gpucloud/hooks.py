"""pytest-gpucloud's own hooks, for conftest.py files and plugins.

Implement a hook as a plain function of that name. Mark it
``@pytest.hookimpl(optionalhook=True)`` where the plugin may be absent or disabled
(``-p no:gpucloud``), or pytest stops at the unknown hook.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pytest_gpucloud.providers import ProviderFactory


def pytest_gpucloud_register_providers() -> Mapping[str, ProviderFactory]:  # type: ignore[empty-body]
    """Return the GPU providers this plugin or conftest adds, by name.

    A factory is ``async def factory(settings) -> Provider``: it gets the session's
    :class:`~pytest_gpucloud.Settings` and returns an object that follows
    :class:`~pytest_gpucloud.Provider`. ``--gpu-provider NAME`` picks one.
    The built-in providers (``rest``, ``sim``, ``local``, ``ssh``) register through this
    hook too; a name registered twice is a usage error. Called once, in
    ``pytest_configure``; only initial conftests (those next to the rootdir or the
    arguments) are seen that early.

    Example::

        from pytest_gpucloud import RestProvider

        async def make_mycloud(settings):
            return RestProvider("https://api.mycloud.example", os.environ["MYCLOUD_KEY"])

        @pytest.hookimpl(optionalhook=True)
        def pytest_gpucloud_register_providers():
            return {"mycloud": make_mycloud}

    Packages can register providers without a hook, in the entry-point group
    ``pytest_gpucloud.providers`` (``mycloud = "mypackage.cloud:make_mycloud"``).
    """
