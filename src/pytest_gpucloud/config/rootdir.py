"""The rootdir a ``--gpu-cloud`` session mirrors to its instances, checked before it starts.

pytest chooses the rootdir before it knows this plugin's options, so in
``--gpu-ssh-key ~/keys/ci_key`` it takes the key's path for a test path, and the rootdir
becomes the common parent of the project and the key's folder: a tree the sync would send
whole. So a session refuses to start when one of its options' values was taken for a test
path, when the rootdir is not the one the test paths alone give, or when the rootdir lies
above the project's root (the git top level, or the folder of the ini file).
"""

from __future__ import annotations

import inspect
import itertools
import os
import subprocess
from collections.abc import Iterable, Sequence
from pathlib import Path

import pytest
from _pytest.config.findpaths import determine_setup

from pytest_gpucloud.core.errors import ConfigError


def check_rootdir(config: pytest.Config, flags: Iterable[str]) -> None:
    """ConfigError unless ``config.rootpath`` is what the user's test paths give and lies
    within the project's root. ``flags``: this plugin's options that take a value."""
    invocation = config.invocation_params.dir
    spaced = _spaced_path_values(config.invocation_params.args, set(flags), invocation)
    if spaced:
        flag, value = spaced[0]
        raise ConfigError(
            f"{flag} {value}: pytest took {value!r} for a test path too, before it knew "
            f"{flag}, and chose the rootdir by it; write {flag}={value}"
        )
    expected = _rootdir_from(config, config.option.file_or_dir or [])
    if expected != config.rootpath:
        raise ConfigError(
            f"the rootdir {config.rootpath} is not the one the test paths give ({expected}): "
            "an option's value was taken for a test path, so the sync would send that whole "
            "tree; write options with '=', as in --opt=value"
        )
    root = config.rootpath.resolve()
    top = project_root(root, config.inipath, invocation)
    if root != top and top not in root.parents:
        raise ConfigError(
            f"the rootdir {root} lies above the project's root {top}, and GPU "
            "instances get a copy of the rootdir; run pytest with --rootdir at or below "
            f"{top}, or put the ini file there"
        )


def project_root(rootdir: Path, inipath: Path | None, invocation_dir: Path) -> Path:
    """The folder no sync goes above: the git top level of the rootdir or, when the rootdir
    is in no git work tree, itself where it holds the ini file, else the git top level of
    the current folder, else the ini file's folder, else the rootdir."""
    top = _git_top(rootdir)
    if top is not None:
        return top
    ini_dir = None if inipath is None or str(inipath) == os.devnull else inipath.parent
    if ini_dir is not None and ini_dir.resolve() == rootdir:
        return rootdir
    return _git_top(invocation_dir) or ini_dir or rootdir


def _spaced_path_values(
    args: Sequence[str], flags: set[str], invocation: Path
) -> list[tuple[str, str]]:
    """``(flag, value)`` where a value given as a separate word names an existing path:
    pytest's first look at the arguments took it for a test path."""
    found = []
    for flag, value in itertools.pairwise(args):
        if flag in flags and not value.startswith("-") and (invocation / value).exists():
            found.append((flag, value))
    return found


def _rootdir_from(config: pytest.Config, args: Sequence[str]) -> Path:
    option = config.option
    kwargs = {
        "inifile": option.inifilename,
        "args": [str(arg) for arg in args],
        "rootdir_cmd_arg": option.rootdir or None,
        "invocation_dir": config.invocation_params.dir,
    }
    if "override_ini" in inspect.signature(determine_setup).parameters:
        kwargs["override_ini"] = option.override_ini
    return Path(determine_setup(**kwargs)[0])


def _git_top(folder: Path) -> Path | None:
    try:
        done = subprocess.run(
            ["git", "rev-parse", "--show-toplevel"],
            cwd=folder,
            capture_output=True,
            text=True,
            check=False,
        )
    except OSError:
        return None
    top = done.stdout.strip()
    return Path(top).resolve() if done.returncode == 0 and top else None


def untrusted_ini(config: pytest.Config) -> str | None:
    """Why the ini file may not choose where the API key goes (None: it may): it lies
    outside the rootdir (a file planted in a parent folder such as /tmp is found too), or
    another user owns it."""
    inipath = config.inipath
    if inipath is None or str(inipath) == os.devnull:
        return None
    root = config.rootpath.resolve()
    where = inipath.resolve()
    if root not in where.parents:
        return f"{inipath} lies outside the rootdir {root}"
    owner = where.stat().st_uid
    if owner != os.getuid():
        return f"{inipath} belongs to another user (uid {owner})"
    return None
