"""Frames between the local side and the remote worker: one JSON object per line.

Every frame is a JSON object with a ``"type"`` key naming it (``encode``/``decode``).

Local -> remote:
  start     {"args": [...], "options": [{"name": str, "takes_value": bool}], "ini": [str],
             "environ": {"CI": ...}}   environ: only the variables telling pytest it runs on CI
            sent once, first. ``args``: pytest arguments, relative to the workspace; they must
            not block cacheprovider or junitxml (the worker gives the session a throwaway
            cache and turns junitxml off itself, and blocks this plugin). ``options`` and
            ``ini``: the local plugin's own command-line options and ini keys; the worker
            registers them as inert, so an ``addopts = --gpu-cloud`` or ``gpu_cloud_*`` key in
            the shared ini file does not break the remote session. ``artifacts``: the
            folder, relative to the workspace, that holds one ``gpu_artifacts`` folder per
            test (named by remote/fixtures.py's ``artifacts_dir_name``)
            ``coverage``: present with the local ``--cov``: ``{"source": [str]|None, "branch":
            bool, "config_file": str|bool}`` for coverage.Coverage, paths relative to the
            workspace (see remote/measure.py). ``live_output``: true with the local ``-s``:
            the tests' output goes to stderr as it comes, the remote terminal's nowhere.
            ``plugin_options``: ``{option: package}`` of the options forwarded for other
            plugins, so a worker without one names the package
  run       {"nodeid": str, "nextid": str|None, "timeout": float|None, "env": {str: str}}
            run one collected test; ``nextid`` is the test the local session runs next on
            this worker (None: none, tear all down). ``timeout``: seconds after which the
            worker writes where the test hangs to stderr and exits with ``TIMEOUT_EXIT``.
            ``env``: the allow-listed environment variables, set for this test only (their
            values travel only here, never on a command line). ``data``: ``{name: spec}``,
            the test's datasets for its ``gpu_data`` fixture (presigned URLs; the spec is
            described in remote/datacache.py); absent when it has none
  shutdown  {"skip_waiting": bool}               finish the session and exit (EOF does the same);
            ``skip_waiting``: the ``run`` frames sent before it and not started yet are
            skipped (the local side sent them ahead and no longer wants them)

Before the frames: the worker starts as a bootstrap (boot.py) that writes one frame,
``loaded`` ``{}`` (pytest imported), and waits for the single byte ``g`` on stdin, sent once
the workspace is complete; then the worker proper starts with ``hello``.

Remote -> local:
  hello     {"python", "pytest", "protocol", "rootdir"}   first frame, before pytest starts;
            ``rootdir`` is the remote workspace (the cwd), the prefix to rewrite in paths
  collectreport {"report": dict}                 a failed remote collection (serialized report)
  warning   {"message", "category", "category_module", "filename", "lineno",
             "nodeid", "when", "location"}       a pytest_warning_recorded; may come
            before ``collected`` (config/collection warnings) and inside a test's frames
  collected {"count": int}                       collection finished; ``run`` frames welcome
  report    {"report": dict}                     pytest_report_to_serializable of a TestReport
  data      {"nodeid", "name", "path": str, "cached": bool, "bytes": int}   a dataset of
            the test is at ``path`` on the instance (``cached``: nothing was downloaded)
  artifacts {"nodeid", "path": str, "files": int, "bytes": int, "list": [[name, size]],
             "skipped": [[name, why]]}   the test wrote to its ``gpu_artifacts`` folder
            ``path``: its regular files, and what is not one (links); comes after its
            reports, before ``done``
  done      {"nodeid": str}                      the last report of that test was sent
  missing   {"nodeid": str, "reason": str|None}  a ``run`` for a nodeid not collected here
            (reason: the skipped/failed collector or the deselection, when known)
  coverage  {"data": str}                        the session's coverage data (base64 of
            CoverageData.dumps()), the last frame, when ``start`` asked for coverage
  crashed   {"message": str}                     the worker hit an internal or usage error
            and exits non-zero (the message may name remote paths); may also follow
            ``shutdown`` when a fixture's teardown failed at session end

A worker that exits without ``hello`` (no python3, no pytest) leaves only its stderr.
"""

from __future__ import annotations

import json
from typing import Any, Dict

PROTOCOL_VERSION = 1
# The worker's exit status when a test outlived the timeout of its run frame.
TIMEOUT_EXIT = 124

Message = Dict[str, Any]  # typing.Dict: a runtime alias, and the instance may run 3.8


def encode(kind: str, **fields: Any) -> bytes:
    fields["type"] = kind
    return json.dumps(fields, separators=(",", ":"), ensure_ascii=True).encode() + b"\n"


def decode(line: bytes) -> Message:
    try:
        message = json.loads(line)
    except RecursionError:  # nested too deep for json: a frame no worker writes
        raise ValueError(f"not a protocol frame: {line[:200]!r}") from None
    if not isinstance(message, dict) or not isinstance(message.get("type"), str):
        raise ValueError(f"not a protocol frame: {line[:200]!r}")
    return message
