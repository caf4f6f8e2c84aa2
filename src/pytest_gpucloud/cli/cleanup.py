"""``python -m pytest_gpucloud cleanup``: find this project's stale instances and delete them.

The backstop for sessions that could not delete their instances (killed with SIGKILL, a
machine that lost power, an API that failed every delete): every instance carries the
labels of :mod:`pytest_gpucloud.core.labels`, so the project's instances past their expiry (or
older than ``--older-than``) can be listed and, after confirmation, deleted. ``--session ID``
takes every live instance of one session instead, expired or not: the teardown of a CI job
whose pytest process was killed.

Settings are read as the plugin reads them, less the command line: the ``GPUCLOUD_*``
environment, then the ``gpu_cloud_*`` keys of the project's pytest configuration file. That
file is found as pytest finds it without arguments: in the current directory, then each
parent, the first of pytest.toml, .pytest.toml, pytest.ini, .pytest.ini, pyproject.toml,
tox.ini and setup.cfg that holds a pytest section (else the nearest pyproject.toml, with no
settings); its directory is the project's rootdir, whose name the instances are labelled
with. Without any, the current directory is the rootdir.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import iniconfig

from pytest_gpucloud.config.settings import Settings, resolve
from pytest_gpucloud.core import labels
from pytest_gpucloud.core.errors import ConfigError, GpuCloudError
from pytest_gpucloud.core.units import parse_duration
from pytest_gpucloud.machine.deletion import delete_verified
from pytest_gpucloud.providers import BUILTIN, ProviderRegistry
from pytest_gpucloud.providers.base import Instance, KeyKeeper, Provider

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - declared in pyproject.toml for Python 3.10
    import tomli as tomllib  # type: ignore[import-not-found, unused-ignore]

PROG = "python -m pytest_gpucloud cleanup"
# Providers whose instances end with the session that made them: nothing to clean up.
_NOTHING_TO_CLEAN = frozenset({"sim", "local", "ssh"})


@dataclass(frozen=True)
class Project:
    """Where the project's pytest settings come from, and the name its instances carry."""

    rootdir: Path
    inifile: Path | None
    ini: dict[str, Any]

    @property
    def label(self) -> str:
        return labels.project_label(self.rootdir.name)


def find_project(start: Path) -> Project:
    """The project as pytest would see it when run in ``start`` without arguments."""
    first_pyproject: Path | None = None
    for base in (start, *start.parents):
        for name, read in _CONFIG_FILES:
            path = base / name
            if not path.is_file():
                continue
            if name == "pyproject.toml" and first_pyproject is None:
                first_pyproject = path
            section = read(path)
            if section is not None:
                return Project(base, path, section)
    if first_pyproject is not None:
        return Project(first_pyproject.parent, first_pyproject, {})
    return Project(start, None, {})


def _ini_section(section: str) -> Callable[[Path], dict[str, Any] | None]:
    def read(path: Path) -> dict[str, Any] | None:
        try:
            parsed = iniconfig.IniConfig(str(path))
        except iniconfig.ParseError as exc:
            raise ConfigError(f"{path} is not a valid ini file: {exc}") from None
        return dict(parsed[section].items()) if section in parsed else None

    return read


def _toml_table(*keys: str) -> Callable[[Path], dict[str, Any] | None]:
    def read(path: Path) -> dict[str, Any] | None:
        try:
            table: Any = tomllib.loads(path.read_text(encoding="utf-8"))
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{path} is not valid TOML: {exc}") from None
        for key in keys:
            table = table.get(key) if isinstance(table, dict) else None
        if not isinstance(table, dict):
            return None
        return dict(table.get("ini_options", table))

    return read


_CONFIG_FILES: tuple[tuple[str, Callable[[Path], dict[str, Any] | None]], ...] = (
    ("pytest.toml", _toml_table("pytest")),
    (".pytest.toml", _toml_table("pytest")),
    ("pytest.ini", lambda path: _ini_section("pytest")(path) or {}),
    (".pytest.ini", lambda path: _ini_section("pytest")(path) or {}),
    ("pyproject.toml", _toml_table("tool", "pytest")),
    ("tox.ini", _ini_section("pytest")),
    ("setup.cfg", _ini_section("tool:pytest")),
)


def load_settings(project: Project, environ: dict[str, str]) -> Settings:
    """The plugin's settings from the environment and the project's ini keys."""
    return resolve(lambda dest: None, project.ini.get, environ)


def stale(instances: Sequence[Instance], now: float, older_than: float | None) -> list[Instance]:
    """Those past their expiry label or, with ``older_than``, created longer ago than that."""
    found = []
    for instance in instances:
        if instance.status == "terminated":
            continue
        if older_than is not None:
            if now - instance.created_at >= older_than:
                found.append(instance)
            continue
        expires = labels.expires_at(instance.labels)
        if expires is not None and expires <= now:
            found.append(instance)
    return found


def describe(instance: Instance, now: float) -> str:
    created = datetime.fromtimestamp(instance.created_at, timezone.utc)
    expires = labels.expires_at(instance.labels)
    expiry = "" if expires is None else f", expiry {_ago(now - expires)}"
    age = _ago(now - instance.created_at)
    return (
        f"  {instance.id}  {instance.gpu_type}:{instance.count}  {instance.region}  "
        f"{instance.status}  created {created:%Y-%m-%d %H:%M} UTC ({age}{expiry})  "
        f"session {instance.labels.get(labels.SESSION, '?')}  "
        f"owner {instance.labels.get(labels.OWNER, '?')}"
    )


def _ago(seconds: float) -> str:
    if seconds < 0:
        return f"in {_span(-seconds)}"
    return f"{_span(seconds)} ago"


def _span(seconds: float) -> str:
    minutes = int(seconds // 60)
    if minutes < 1:
        return f"{int(seconds)}s"
    return f"{minutes // 60}h{minutes % 60:02d}m" if minutes >= 60 else f"{minutes}m"


async def _provider(settings: Settings) -> Provider:
    name = settings.chosen_provider()
    if name in _NOTHING_TO_CLEAN:
        raise ConfigError(
            f"provider {name} keeps no instances beyond a session: nothing to clean up "
            "(cleanup is for cloud providers such as rest)"
        )
    return await ProviderRegistry.collect([BUILTIN]).make(name, settings)


async def _list(settings: Settings, selector: dict[str, str]) -> list[Instance]:
    provider = await _provider(settings)
    try:
        return await provider.list_instances(selector)
    finally:
        await provider.aclose()


async def _delete(settings: Settings, ids: list[str]) -> list[tuple[str, str]]:
    """Delete all at once; the ``(id, why)`` of those that may still be alive."""
    provider = await _provider(settings)
    try:
        results = await asyncio.gather(
            *(delete_verified(provider, i) for i in ids), return_exceptions=True
        )
    finally:
        await provider.aclose()
    return [
        (instance_id, str(result))
        for instance_id, result in zip(ids, results, strict=True)
        if isinstance(result, BaseException)
    ]


async def _delete_stale_keys(settings: Settings, now: float) -> list[str]:
    """The SSH keys of dead sessions deleted from the account, where a provider keeps any."""
    provider = await _provider(settings)
    try:
        return await provider.delete_stale_keys(now) if isinstance(provider, KeyKeeper) else []
    finally:
        await provider.aclose()


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="List this project's GPU instances past their expiry (or older than "
        "--older-than) and delete them after confirmation. Reads the plugin's settings from "
        "the GPUCLOUD_* environment and the project's pytest ini file.",
    )
    parser.add_argument(
        "--older-than",
        metavar="DURATION",
        type=_duration,
        help="instead of the expiry: every instance of the project created longer ago than "
        "this, e.g. 2h, 90m, 0",
    )
    parser.add_argument(
        "--session",
        metavar="ID",
        help="instead of the expiry: every live instance of the session with this id "
        "(pytest's --gpu-session-id), e.g. in a CI job's always-run step",
    )
    parser.add_argument(
        "--yes", action="store_true", help="delete without asking (for CI and scripts)"
    )
    return parser


def _duration(text: str) -> float:
    try:
        seconds = parse_duration(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a duration (use seconds or e.g. 90s, 30m, 2h)"
        ) from None
    if seconds < 0:
        raise argparse.ArgumentTypeError(f"{text!r} is negative (use e.g. 0, 30m or 2h)")
    return seconds


def main(argv: Sequence[str] | None = None, cwd: Path | None = None) -> int:
    """Run the command; its exit status (0: nothing left to delete, 1: some may remain,
    2: a usage or settings error)."""
    args = _parser().parse_args(argv)
    try:
        project = find_project((cwd or Path.cwd()).resolve())
        settings = load_settings(project, dict(os.environ))
        selector = (
            {labels.SESSION: args.session} if args.session else {labels.PROJECT: project.label}
        )
        instances = asyncio.run(_list(settings, selector))
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return 2
    except GpuCloudError as exc:
        print(exc, file=sys.stderr)
        return 1
    now = time.time()
    if args.session:
        found = [i for i in instances if i.status != "terminated"]
        what = f"of session {args.session}"
    else:
        found = stale(instances, now, args.older_than)
        when = "past their expiry" if args.older_than is None else "older than that"
        what = f"of project {project.label} {when}"
    if not found:
        print(f"no instances {what}")
        return _keys_cleaned(settings, now)
    print(f"{len(found)} instance(s) {what}:")
    for instance in found:
        print(describe(instance, now))
    if not args.yes:
        try:
            answer = input("Delete them? [y/N] ")
        except EOFError:
            print("\ngpu-cloud: nothing deleted: no answer (pass --yes to delete without asking)")
            return 1
        if answer.strip().lower() not in ("y", "yes"):
            print("nothing deleted")
            return 0
    try:
        failed = asyncio.run(_delete(settings, [i.id for i in found]))
    except GpuCloudError as exc:
        print(exc, file=sys.stderr)
        return 1
    for instance in found:
        if instance.id not in dict(failed):
            print(f"deleted {instance.id}")
    if failed:
        for instance_id, why in failed:
            print(f"{instance_id}: {why}", file=sys.stderr)
        print(
            "gpu-cloud: these instances could not be deleted and may still cost money: "
            + ", ".join(instance_id for instance_id, _ in failed),
            file=sys.stderr,
        )
        return 1
    return _keys_cleaned(settings, now)


def _keys_cleaned(settings: Settings, now: float) -> int:
    try:
        for name in asyncio.run(_delete_stale_keys(settings, now)):
            print(f"deleted SSH key {name}")
    except GpuCloudError as exc:
        print(exc, file=sys.stderr)
        return 1
    return 0
