"""Finding 8 of the hostile-instance review: escape sequences in what a cloud or an
instance writes (API error text, the region, remote stderr) never reach the terminal as
such; they are shown as ``\\x1b``, ``\\x07``..."""

from __future__ import annotations

import pytest

from pytest_gpucloud.core.escape import visible
from tests.cloud import GpuRun, Sim

# ESC sequences that clear the screen and colour, an OSC that retitles the window, a BEL.
HOSTILE = "\x1b[2J\x1b[31mred\x1b]0;owned\x07bell\x07"
SHOWN = "\\x1b[2J\\x1b[31mred\\x1b]0;owned\\x07bell\\x07"
ONE_TEST = "import pytest\n\n@pytest.mark.gpu('T4')\ndef test_a():\n    pass\n"


def raw_controls(result: pytest.RunResult) -> list[str]:
    text = result.stdout.str() + result.stderr.str()
    return [line for line in text.splitlines() if "\x1b" in line or "\x07" in line]


def test_visible_shows_esc_osc_and_bel() -> None:
    assert visible(HOSTILE) == SHOWN
    assert visible("a\tb\nc") == "a\tb\nc"
    assert visible("a\nb", one_line=True) == "a\\x0ab"
    assert visible("\u202eevil") == "\\u202eevil"


def test_an_api_error_message_is_shown_not_obeyed(
    gpu_run: GpuRun, sim: Sim, pytester: pytest.Pytester
) -> None:
    pytester.makepyfile(ONE_TEST)
    sim.fault(kind="http_error", op="create", status=400, code="invalid_request", message=HOSTILE)
    result = gpu_run("--color=no")
    result.assert_outcomes(errors=1)
    assert raw_controls(result) == []
    assert SHOWN.replace("\\", "\\\\") not in result.stdout.str()  # not escaped twice
    assert f"rejected POST /v1/instances (HTTP 400): {SHOWN}" in result.stdout.str()


def test_a_region_with_escapes_is_a_bad_answer(
    gpu_run: GpuRun, sim: Sim, pytester: pytest.Pytester
) -> None:
    pytester.makepyfile(ONE_TEST)
    sim.fault(kind="override", op="create", fields={"region": HOSTILE})
    result = gpu_run("--color=no")
    result.assert_outcomes(errors=1)
    assert raw_controls(result) == []
    result.stdout.fnmatch_lines(["*answered POST /v1/instances with a bad value at region*"])


def test_a_remote_stderr_tail_is_shown_not_obeyed(
    gpu_run: GpuRun, pytester: pytest.Pytester
) -> None:
    pytester.makepyfile(
        f"""
        import os

        import pytest


        @pytest.mark.gpu("T4")
        def test_dies():
            os.write(2, {HOSTILE.encode()!r} + b"\\n")
            os._exit(3)
        """
    )
    result = gpu_run("--color=no", "-s")  # uncaptured: the worker's own stderr
    result.assert_outcomes(errors=1)
    # -s shows the test's output as it comes, as it would locally; the error's tail of it
    # (in the ERRORS section and the summary) shows the escapes instead.
    errors = result.stdout.str().split("= ERRORS =", 1)[1]
    assert "\x1b" not in errors
    assert "\x07" not in errors
    assert SHOWN in errors
