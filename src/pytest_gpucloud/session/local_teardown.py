"""The local teardown a remote test owes: what pytest's teardown phase would have done here.

A remote test does not run pytest's runtest protocol in this process, and with it would skip
the step that tears down what the next item does not share: the local fixtures and
collectors (package, module, class) that earlier local tests set up. The next local test in
another module would find them still up, and pytest would stop it with "previous item was
not torn down properly".
"""

from __future__ import annotations

import contextlib

import pytest

#: What pytest's runner lets through rather than reports (see ``call_runtest_hook``).
_PASSED_THROUGH = (pytest.exit.Exception, KeyboardInterrupt)


def teardown_locally(item: pytest.Item, nextitem: pytest.Item | None) -> pytest.TestReport | None:
    """Tear down the local setup that ``nextitem`` does not share, as the teardown phase of
    ``item`` would, its output captured as pytest captures it. A finalizer that fails comes
    back as ``item``'s failed teardown report; None if all went well."""
    capture = item.config.pluginmanager.get_plugin("capturemanager")
    capturing = capture.item_capture("teardown", item) if capture else contextlib.nullcontext()
    with capturing:
        call = pytest.CallInfo.from_call(
            lambda: item.session._setupstate.teardown_exact(nextitem),
            when="teardown",
            reraise=_PASSED_THROUGH,
        )
    if call.excinfo is None:
        return None
    # pytest's own report, not the hook: other plugins' makereport wrappers expect the setup
    # and call phases they saw (pytest-rerunfailures), which a remote test never had here.
    return pytest.TestReport.from_item_and_call(item, call)


def with_local_teardown(
    remote: pytest.TestReport, local: pytest.TestReport | None
) -> pytest.TestReport:
    """The one teardown report of a remote test: the instance's, unless the local teardown
    failed; if both failed, the instance's with the local error as a section."""
    if local is None:
        return remote
    if remote.passed:
        return local
    remote.sections.append(("local teardown", str(local.longrepr)))
    return remote
