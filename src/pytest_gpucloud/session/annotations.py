"""GitHub Actions annotations: a failed remote test as ``::error`` at its local file and
line, an infrastructure error as ``::warning`` naming the instance.

Workflow commands are lines on standard output; their text is escaped as the runner
expects (``%``, CR and LF in the message; also ``:`` and ``,`` in property values).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from pytest_gpucloud.session.outcomes import Record

#: The environment variable by which GitHub Actions says it runs the job.
GITHUB_ACTIONS = "GITHUB_ACTIONS"


def on_github(environ: Mapping[str, str]) -> bool:
    return environ.get(GITHUB_ACTIONS) == "true"


def escape_data(text: str) -> str:
    return text.replace("%", "%25").replace("\r", "%0D").replace("\n", "%0A")


def escape_property(text: str) -> str:
    return escape_data(text).replace(":", "%3A").replace(",", "%2C")


def command(kind: str, message: str, **properties: str | int) -> str:
    """One workflow command line, e.g. ``::error file=a.py,line=3,title=x::message``."""
    shown = ",".join(f"{name}={escape_property(str(value))}" for name, value in properties.items())
    return f"::{kind}{' ' + shown if shown else ''}::{escape_data(message)}"


def annotation_lines(
    records: Iterable[Record], instance_ids: Iterable[str], *, prefix: str = ""
) -> list[str]:
    """The lines for a session's remote tests that failed or could not run. ``instance_ids``:
    the session's instances, in which the one an infrastructure error names is looked up;
    ``prefix``: the rootdir's path in the repository (``""`` or ``"sub/dir/"``)."""
    ids = list(instance_ids)
    lines = []
    for record in records:
        if record.outcome == "infrastructure error":
            named = [i for i in ids if i in record.message] or ["none"]
            title = f"gpu-cloud infrastructure error (instance {', '.join(named)})"
            lines.append(command("warning", f"{record.nodeid}: {record.message}", title=title))
        elif record.instance is not None and record.outcome in ("failed", "error"):
            path, line = record.crash or record.location
            title = f"{record.nodeid} {record.outcome} on {record.instance}"
            message = record.message or record.outcome
            lines.append(command("error", message, file=prefix + path, line=line, title=title))
    return lines
