"""Local and remote tests mixed across functions, classes, modules and packages.

Each project runs twice: without the plugin (every test local) and with ``--gpu-cloud``.
The outcomes must be the same, and so must the setups and teardowns of the local tests'
fixtures, in the same order: a remote test must leave the local setup as pytest's own
teardown would have (it once kept an earlier module's collectors up, and the next local
test in another module errored with "previous item was not torn down properly").
"""

from __future__ import annotations

import itertools
import re
from pathlib import Path

import pytest

from tests.cloud import GpuRun

SCOPES = ("session", "package", "module", "class", "function")
#: Logs each setup and teardown of the fixtures of both sides; the remote side's go to the
#: instance's copy of the project, so the local log holds the local side's only.
CONFTEST = f"""
from pathlib import Path

import pytest

EVENTS = Path(__file__).parent / "events.log"


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu(spec): run on a cloud GPU")


def _fixture(name, scope):
    @pytest.fixture(scope=scope, name=name)
    def logged(request):
        with EVENTS.open("a") as events:
            events.write(f"setup {{name}} {{request.node.nodeid}}\\n")
        yield
        with EVENTS.open("a") as events:
            events.write(f"teardown {{name}} {{request.node.nodeid}}\\n")

    return logged


for side in ("local", "remote"):
    for scope in {SCOPES!r}:
        globals()[f"{{side}}_{{scope}}"] = _fixture(f"{{side}}_{{scope}}", scope)
"""
#: The test slots of one package: two functions, then a class of two, in test_a.py; a class
#: of one, then a function, in test_b.py. Every kind of neighbour: function and function,
#: function and class, within a class, class and class across modules, class and function,
#: and (to the next package) module and module.
SLOTS: tuple[tuple[str, str | None], ...] = (
    ("test_a", None),
    ("test_a", None),
    ("test_a", "C"),
    ("test_a", "C"),
    ("test_b", "D"),
    ("test_b", None),
)
SUMMARY = re.compile(r"^(PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS) (\S+)")


def _test(index: int, remote: bool, in_class: bool) -> list[str]:
    side = "remote" if remote else "local"
    fixtures = ", ".join(f"{side}_{scope}" for scope in SCOPES)
    self = "self, " if in_class else ""
    lines = ['@pytest.mark.gpu("T4")'] if remote else []
    lines.append(f"def test_{index}_{side}({self}{fixtures}):")
    lines.append("    pass")
    return lines


def _package(root: Path, name: str, remote: tuple[bool, ...]) -> None:
    """One package of the SLOTS, each slot local or remote as ``remote`` says."""
    package = root / name
    package.mkdir()
    (package / "__init__.py").write_text("")
    modules: dict[str, list[str]] = {}
    for index, ((module, cls), is_remote) in enumerate(zip(SLOTS, remote, strict=True)):
        lines = modules.setdefault(module, ["import pytest", ""])
        test = _test(index, is_remote, cls is not None)
        if cls is None:
            lines += ["", *test]
            continue
        if f"class Test{cls}:" not in lines:
            lines += ["", f"class Test{cls}:"]
        lines += ["", *(f"    {line}" for line in test)]
    for module, lines in modules.items():
        (package / f"{module}.py").write_text("\n".join(lines) + "\n")


def _summary(result: pytest.RunResult) -> list[str]:
    """The ``-rA`` summary: one ``OUTCOME nodeid`` per report that pytest shows."""
    return [" ".join(m.groups()) for m in map(SUMMARY.match, result.outlines) if m]


def _events(root: Path) -> list[str]:
    log = root / "events.log"
    events = log.read_text().splitlines() if log.exists() else []
    log.unlink(missing_ok=True)
    return events


def _without_plugin(pytester: pytest.Pytester, *args: str) -> pytest.RunResult:
    return pytester.runpytest_inprocess("-p", "no:gpucloud", "-p", "no:randomly", "-rA", *args)


def test_every_order_of_local_and_remote_tests_keeps_the_local_setup_as_pytest_does(
    gpu_run: GpuRun, pytester: pytest.Pytester
) -> None:
    pytester.makeconftest(CONFTEST)
    orders = list(itertools.product((False, True), repeat=len(SLOTS)))
    for number, remote in enumerate(orders):
        _package(pytester.path, f"pkg_{number:02d}", remote)
    alone = _without_plugin(pytester)
    alone.assert_outcomes(passed=len(SLOTS) * len(orders))
    expected = [e for e in _events(pytester.path) if e.split()[1].startswith("local_")]
    result = gpu_run("-p", "no:randomly", "-rA")
    assert _summary(result) == _summary(alone)
    assert result.ret == pytest.ExitCode.OK
    assert _events(pytester.path) == expected
    # xdist's workers each see a part of the order, in an order of their own
    spread = gpu_run("-p", "no:randomly", "-rA", "-n", "2")
    assert sorted(_summary(spread)) == sorted(_summary(alone))


def test_a_failing_local_teardown_is_reported_where_pytest_reports_it(
    gpu_run: GpuRun, pytester: pytest.Pytester
) -> None:
    # The module fixture of a local test ends after the remote test that follows it: its
    # error is that test's teardown error, as without the plugin.
    pytester.makeconftest(CONFTEST)
    pytester.makepyfile(
        test_a="""
        import pytest

        @pytest.fixture(scope="module")
        def fails_at_teardown():
            yield
            raise RuntimeError("the module fixture's teardown")

        def test_local(fails_at_teardown):
            pass

        @pytest.mark.gpu("T4")
        def test_remote():
            pass
        """,
        test_b="""
        def test_after():
            pass
        """,
    )
    alone = _without_plugin(pytester)
    result = gpu_run("-p", "no:randomly", "-rA")
    assert "ERROR test_a.py::test_remote" in _summary(alone)
    assert _summary(result) == _summary(alone)
    result.stdout.fnmatch_lines(["*RuntimeError: the module fixture's teardown*"])


@pytest.mark.parametrize("workers", [[], ["-n", "2"]], ids=["no-xdist", "xdist"])
def test_local_tests_after_remote_tests_of_another_module(
    gpu_run: GpuRun, pytester: pytest.Pytester, workers: list[str]
) -> None:
    # The project of the report: a local then a remote test, then a remote then a local
    # test, with a test beside them that leases an instance of its own.
    pytester.makeconftest(CONFTEST)
    pytester.makepyfile(
        test_a="""
        import pytest

        def test_local(local_module):
            pass

        @pytest.mark.gpu("T4")
        def test_remote(remote_module):
            pass
        """,
        test_b="""
        import pytest

        @pytest.mark.gpu("T4")
        def test_remote(remote_module):
            pass

        def test_local(local_module):
            pass

        def test_own_instance(local_module, gpu_cloud):
            with gpu_cloud.instance("T4") as gpu:
                assert gpu.run("echo here").stdout == "here\\n"
        """,
    )
    result = gpu_run.subprocess("-p", "no:randomly", "-rA", *workers)
    result.assert_outcomes(passed=5)
    assert "not torn down properly" not in result.stdout.str()
