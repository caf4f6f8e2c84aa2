"""``cleanup`` for the ``ssh`` and ``local`` providers: their warm workspaces.

Those providers keep no instances beyond a session, but each project keeps a workspace on
every host (``ssh``) or GPU slot (``local``) it ran on; ``cleanup`` lists this user's and,
after confirmation, removes them. A host or slot leased by a running session answers
``busy`` and keeps its workspaces.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass

from pytest_gpucloud.config.settings import Settings
from pytest_gpucloud.providers.local import LocalProvider
from pytest_gpucloud.providers.static_hosts import SshProvider
from pytest_gpucloud.remote.workspaces import answer


@dataclass(frozen=True)
class Workspace:
    """One warm workspace: where (a host's address or a slot's folder), key, idle, size."""

    where: str
    key: str
    idle_s: float
    size: int

    def describe(self) -> str:
        return f"  {self.where}  {self.key}  idle {self.idle_s / 3600:.1f} h  {self.size >> 20} MiB"


class Places:
    """Where the workspaces of one provider live, and how to ask each of them."""

    def __init__(self, settings: Settings) -> None:
        ssh = settings.chosen_provider() == "ssh"
        self._ssh = SshProvider.from_settings(settings) if ssh else None

    async def ask(self, command: str, keys_by_place: dict[str, list[str]]) -> dict[str, str]:
        """Each place's answer to ``command`` (with its keys, for ``remove``)."""
        answers: dict[str, str] = {}
        if self._ssh is not None:
            for host in self._ssh.hosts:
                if host.address in keys_by_place or command == "list":
                    keys = keys_by_place.get(host.address, [])
                    answers[host.address] = await self._ssh.workspaces(host, command, *keys)
            return answers
        for home in LocalProvider.slot_homes():
            place = os.fspath(home)
            if place in keys_by_place or command == "list":
                answers[place] = answer(place, command, keys_by_place.get(place, []))
        return answers


async def find(places: Places) -> list[Workspace]:
    found = []
    for place, said in (await places.ask("list", {})).items():
        if said.startswith(("busy", "refused")):
            continue
        found += [Workspace(place, key, idle, size) for key, idle, size in json.loads(said)]
    return found


async def remove(places: Places, workspaces: list[Workspace]) -> dict[str, str]:
    """Remove ``workspaces``; each place's answer (``removed``, ``busy``, ``refused: ...``)."""
    keys: dict[str, list[str]] = {}
    for workspace in workspaces:
        keys.setdefault(workspace.where, []).append(workspace.key)
    return await places.ask("remove", keys)


async def clean(settings: Settings, *, confirm: Callable[[], int | None]) -> int:
    """List the workspaces, remove them unless ``confirm`` gives an exit status; the exit
    status."""
    places = Places(settings)
    found = await find(places)
    if not found:
        print("no warm workspaces")
        return 0
    print(f"{len(found)} warm workspace(s):")
    for workspace in found:
        print(workspace.describe())
    refused = confirm()
    if refused is not None:
        return refused
    status = 0
    for place, said in (await remove(places, found)).items():
        print(f"{place}: {said}")
        status = status or int(said != "removed")
    return status
