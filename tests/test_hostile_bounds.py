"""Findings 6 and 7 of the hostile-instance review: every count and size an instance
controls is bounded, and crafted or random input ends as a refusal or a clean error, never
an uncaught exception."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import tarfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pytest_gpucloud.remote.filepipe import DEPTH_MAX, FILES_MAX, REFUSED_MAX, PipeRefused, extract
from pytest_gpucloud.remote.protocol import decode
from pytest_gpucloud.transport.capped import run_capped
from pytest_gpucloud.transport.commands import ExecShell
from pytest_gpucloud.transport.worker_link import FRAME_MAX, _Frames
from tests.cloud import GpuRun
from tests.test_sync import Remote, remote  # noqa: F401  (a fixture)

FUZZ_CASES = 300  # more than the bad-input suite's cases


def own_stream(entries: list[tuple[str, bytes]], mtime: float = 1.0) -> io.BytesIO:
    """A stream in filepipe's own format, as an instance sends it."""
    out = io.BytesIO()
    out.write(json.dumps({"kind": "dir", "left": [], "skipped": []}).encode() + b"\n")
    out.write(json.dumps([[n, len(b), 0o644, mtime] for n, b in entries]).encode() + b"\n")
    for _, body in entries:
        out.write(body)
    out.write(b"[]\n")
    out.seek(0)
    return out


def tar_stream(pax_mtime: str) -> io.BytesIO:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        info = tarfile.TarInfo("a.txt")
        info.size = 2
        info.pax_headers = {"mtime": pax_mtime}
        tar.addfile(info, io.BytesIO(b"hi"))
        info = tarfile.TarInfo("b.txt")
        info.size = 2
        tar.addfile(info, io.BytesIO(b"ok"))
    out.seek(0)
    return out


# -- 6: bounds -------------------------------------------------------------------------


def test_many_empty_files_pass_no_byte_cap(tmp_path: Path) -> None:
    stream = own_stream([(f"f{i}", b"") for i in range(FILES_MAX + 1)])
    with pytest.raises(PipeRefused, match=f"more than the {FILES_MAX} files"):
        extract(stream, str(tmp_path), 1)
    assert len(list(tmp_path.iterdir())) == FILES_MAX


def test_deep_names_and_many_refusals_are_bounded(tmp_path: Path) -> None:
    deep = "/".join(["d"] * (DEPTH_MAX + 1))
    result = extract(own_stream([(deep, b"x"), ("ok", b"y")]), str(tmp_path))
    assert result["refused"] == [[deep[:200], f"deeper than {DEPTH_MAX} folders"]]
    assert (tmp_path / "ok").read_bytes() == b"y"
    bad = [(f"../x{i}", b"") for i in range(REFUSED_MAX + 1)]
    with pytest.raises(PipeRefused, match=f"more than {REFUSED_MAX} refused"):
        extract(own_stream(bad), str(tmp_path / "two"))


def test_a_frame_without_end_is_refused() -> None:
    class NoNewline:
        """More than a frame's limit of bytes without a newline, then the end."""

        def __init__(self) -> None:
            self.left = FRAME_MAX + (4 << 20)

        async def read(self, size: int) -> bytes:
            size = min(size, self.left)
            self.left -= size
            return b"x" * size

    source = NoNewline()
    with pytest.raises(ValueError, match="a frame longer than"):
        asyncio.run(_Frames(source).next())  # type: ignore[arg-type]
    assert source.left > 0  # refused before the end, not at it


def test_command_output_is_read_within_the_bound(remote: Remote) -> None:  # noqa: F811
    async def main() -> None:
        async with remote.connect() as conn:
            shell = ExecShell(conn)
            done = await run_capped(shell, "head -c 5000000 /dev/zero; echo end", max_bytes=1000)
            assert done.cut
            assert len(done.stdout) == 1000
            assert done.stdout.endswith(b"end\n")

    asyncio.run(main())


def test_a_setup_that_prints_without_end_keeps_a_bounded_log(
    gpu_run: GpuRun, pytester: pytest.Pytester
) -> None:
    pytester.makepyfile("import pytest\n\n@pytest.mark.gpu('T4')\ndef test_a():\n    pass\n")
    result = gpu_run("--gpu-setup", "head -c 12000000 /dev/zero | tr '\\\\0' x; exit 1")
    result.assert_outcomes(errors=1)
    [log] = (pytester.path / ".gpucloud" / "logs").glob("*-setup.log")
    assert log.stat().st_size <= (8 << 20) + 100
    assert log.read_text().startswith("[earlier output dropped]\n")


# -- 7: crafted and random input ------------------------------------------------------


@pytest.mark.parametrize("mtime", ["1e30", "inf", "-1e30", "nan", "-inf"])
def test_a_pax_mtime_out_of_range_is_refused(tmp_path: Path, mtime: str) -> None:
    result = extract(tar_stream(mtime), str(tmp_path), tar=True)
    assert result["refused"] == [["a.txt", "an mtime out of range"]]
    assert (tmp_path / "b.txt").read_bytes() == b"ok"
    assert not (tmp_path / "a.txt").exists()


@pytest.mark.parametrize("mtime", [1e30, float("inf")])
def test_an_own_stream_mtime_out_of_range_is_refused(tmp_path: Path, mtime: float) -> None:
    result = extract(own_stream([("a", b"x")], mtime=mtime), str(tmp_path))
    assert result["refused"] == [["a", "an mtime out of range"]]


def _mutated(base: bytes) -> st.SearchStrategy[bytes]:
    """``base`` with bytes flipped, cut, or grown: near-valid input, where bugs hide."""

    def mutate(edits: list[tuple[int, int]], cut: int) -> bytes:
        data = bytearray(base)
        for where, value in edits:
            data[where % len(data)] = value
        return bytes(data[: max(1, cut)])

    return st.builds(
        mutate,
        st.lists(st.tuples(st.integers(0, 1 << 20), st.integers(0, 255)), max_size=8),
        st.integers(1, len(base) + 10),
    )


_TAR = tar_stream("12345").getvalue()
_OWN = own_stream([("a/b", b"xyz"), ("c", b"")]).getvalue()


@settings(
    max_examples=FUZZ_CASES,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(data=st.one_of(_mutated(_TAR), _mutated(_OWN), st.binary(max_size=2048)))
def test_fuzz_the_readers_refuse_or_succeed(
    tmp_path_factory: pytest.TempPathFactory, data: bytes
) -> None:
    for tar in (True, False):
        dest = tmp_path_factory.mktemp("fuzz")
        with contextlib.suppress(PipeRefused):
            extract(io.BytesIO(data), str(dest), 1 << 20, tar=tar)
        for path in dest.rglob("*"):
            assert path.resolve().is_relative_to(dest.resolve())


@settings(max_examples=FUZZ_CASES, deadline=None)
@given(
    chunks=st.lists(
        st.one_of(
            st.binary(max_size=300),
            st.sampled_from([b"\n", b'{"type":"report"}\n', b"[" * 5000, b'{"type":1}\n']),
        ),
        max_size=6,
    )
)
def test_fuzz_the_frame_decoder_refuses_or_succeeds(chunks: list[bytes]) -> None:
    class Pieces:
        async def read(self, size: int) -> bytes:
            return chunks.pop(0) if chunks else b""

    async def frames() -> None:
        reader = _Frames(Pieces())  # type: ignore[arg-type]
        while await reader.next() is not None:
            pass

    with contextlib.suppress(ValueError):
        asyncio.run(frames())
    for line in (b"[" * 100_000, b"\xff\xfe", b"1", b'{"type": null}'):
        with pytest.raises(ValueError, match=r"not a protocol frame|Expecting|codec"):
            decode(line)
