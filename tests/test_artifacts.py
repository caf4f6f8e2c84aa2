"""Artifacts: each remote test's ``gpu_artifacts`` folder comes home, whatever the test did,
under safe names, within the size cap; and the receiving end refuses hostile streams."""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import tarfile
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from pytest_gpucloud.remote.filepipe import PipeRefused, chunks, extract, walk
from pytest_gpucloud.remote.fixtures import artifacts_dir_name
from tests.cloud import GpuRun

PROJECT = """
import os
import time

import pytest

pytestmark = pytest.mark.gpu("T4")


def test_pass(gpu_artifacts):
    (gpu_artifacts / "sub").mkdir()
    (gpu_artifacts / "sub" / "result.txt").write_text("passed")
    (gpu_artifacts / "\\u00fcn\\u00ef c\\u00f6de.txt").write_text("unicode")
    (gpu_artifacts / "lnk").symlink_to("/etc/passwd")


def test_fail(gpu_artifacts):
    (gpu_artifacts / "log.txt").write_text("before the failure")
    assert 1 == 2


@pytest.mark.parametrize("name", ["\\u00fcn \\u00ef", "a/b", "a_b"])
def test_params(gpu_artifacts, name):
    (gpu_artifacts / "name.txt").write_text(name)


def test_crash(gpu_artifacts):
    (gpu_artifacts / "last-words.txt").write_text("about to die")
    os._exit(3)


@pytest.mark.gpu("T4", timeout=1)
def test_timeout(gpu_artifacts):
    (gpu_artifacts / "progress.txt").write_text("step 1")
    time.sleep(60)


def test_nothing():
    pass
"""


def _properties(xml: Path) -> dict[str, dict[str, str]]:
    found: dict[str, dict[str, str]] = {}
    for case in ET.parse(xml).getroot().iter("testcase"):
        props = {p.get("name", ""): p.get("value", "") for p in case.iter("property")}
        found[case.get("name", "")] = props
    return found


def test_artifacts_of_passing_failing_and_crashed_tests_come_home(
    gpu_run: GpuRun, pytester: pytest.Pytester
) -> None:
    # real unicode in the nodeids, not pytest's escapes
    pytester.makeini(
        "[pytest]\ndisable_test_id_escaping_and_forfeit_all_rights_to_community_support = true\n"
    )
    pytester.makepyfile(test_art=PROJECT)
    result = gpu_run("--gpu-artifacts-dir", "arts", "--junitxml=out.xml", "-rA")
    # test_timeout fails in its body (its time limit), test_crash errors (its worker died)
    result.assert_outcomes(passed=5, failed=2, errors=1)
    root = pytester.path / "arts"

    def folder(test: str) -> Path:
        return root / artifacts_dir_name(f"test_art.py::{test}")

    assert (folder("test_pass") / "sub" / "result.txt").read_text() == "passed"
    assert (folder("test_pass") / "\u00fcn\u00ef c\u00f6de.txt").read_text() == "unicode"
    assert not (folder("test_pass") / "lnk").exists()
    assert (folder("test_fail") / "log.txt").read_text() == "before the failure"
    assert (folder("test_crash") / "last-words.txt").read_text() == "about to die"
    assert (folder("test_timeout") / "progress.txt").read_text() == "step 1"
    names = {p.name for p in root.iterdir()}
    # one folder per test that wrote, each an ASCII name without a slash, all different
    assert len(names) == 7
    assert all(re.fullmatch(r"[A-Za-z0-9._-]+", name) for name in names)
    for value in ("\u00fcn \u00ef", "a/b", "a_b"):
        assert (folder(f"test_params[{value}]") / "name.txt").read_text() == value
    assert not folder("test_nothing").exists()

    properties = _properties(pytester.path / "out.xml")
    assert properties["test_pass"]["gpu_artifacts"] == str(folder("test_pass"))
    assert properties["test_crash"]["gpu_artifacts"] == str(folder("test_crash"))
    assert "gpu_artifacts" not in properties["test_nothing"]
    # failed tests are listed with their folder in the summary
    result.stdout.fnmatch_lines(
        [
            "*artifacts: 7 test(s), 8 file(s)*",
            f"*test_art.py::test_fail (failed): {folder('test_fail')}",
            f"*test_art.py::test_crash (failed): {folder('test_crash')}",
            "*test_art.py::test_pass: links and special files stay behind: lnk",
        ]
    )


def test_size_cap_names_what_stayed_behind(gpu_run: GpuRun, pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        """
        import pytest

        @pytest.mark.gpu("T4")
        def test_big(gpu_artifacts):
            (gpu_artifacts / "a-small.txt").write_text("x" * 100)
            (gpu_artifacts / "b-big.bin").write_bytes(b"y" * 50_000)
            (gpu_artifacts / "c-small.txt").write_text("z" * 100)
        """
    )
    result = gpu_run("--gpu-artifacts-max", "10kB", "--junitxml=out.xml")
    result.assert_outcomes(passed=1)
    (folder,) = (pytester.path / ".gpucloud" / "artifacts").glob("*/test_*")
    assert sorted(p.name for p in folder.iterdir()) == ["a-small.txt", "c-small.txt"]
    result.stdout.fnmatch_lines(
        [
            "*test_size_cap_names_what_stayed_behind.py::test_big: over --gpu-artifacts-max "
            "10.0 kB, left on the instance: b-big.bin (50.0 kB)"
        ]
    )
    props = _properties(pytester.path / "out.xml")["test_big"]
    assert "b-big.bin (50.0 kB)" in props["gpu_artifacts_left_behind"]


@pytest.mark.parametrize(
    ("option", "value", "message"),
    [
        ("--gpu-artifacts-max", "lots", "--gpu-artifacts-max 'lots': 'lots' is not a size"),
        ("--gpu-artifacts-max", "0", "--gpu-artifacts-max '0': Input should be greater than 0"),
        ("--gpu-artifacts-s3", "https://bucket/x", "--gpu-artifacts-s3 'https://bucket/x': must"),
        ("--gpu-s3-endpoint", "minio:9000", "--gpu-s3-endpoint 'minio:9000': must be an http"),
    ],
)
def test_bad_artifact_options_are_usage_errors(
    pytester: pytest.Pytester, option: str, value: str, message: str
) -> None:
    pytester.makepyfile("def test_a():\n    pass\n")
    result = pytester.runpytest_inprocess("--gpu-cloud", "--gpu-provider", "sim", option, value)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    assert message in result.stderr.str()
    assert "Traceback" not in result.stderr.str()


# -- the receiving end, fed streams a hostile instance could send ------------------------------


def _stream(
    control: dict[str, object], entries: list[tuple[str, bytes]], end: bool = True
) -> bytes:
    out = json.dumps(control).encode() + b"\n"
    if entries:
        out += json.dumps([[name, len(data), 0o644, 0] for name, data in entries]).encode() + b"\n"
        out += b"".join(data for _, data in entries)
    return out + (b"[]\n" if end else b"")


def test_names_become_safe_distinct_folders() -> None:
    ids = ["t.py::test[a/b]", "t.py::test[a_b]", "t.py::test[\u00fcn]", "t.py::test[..]", "x" * 300]
    names = [artifacts_dir_name(nodeid) for nodeid in ids]
    assert len(set(names)) == len(names)
    for name in names:
        assert re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", name)
        assert len(name) <= 109


def test_extract_refuses_paths_out_of_the_folder(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    dest = tmp_path / "dest"
    dest.mkdir()
    (dest / "link").symlink_to(outside)
    entries = [
        ("ok.txt", b"fine"),
        ("/etc/evil", b"x"),
        ("../evil", b"x"),
        ("a/../../evil", b"x"),
        ("link/evil", b"x"),
        ("", b"x"),
        ("after.txt", b"still read in step"),
    ]
    result = extract(io.BytesIO(_stream({"kind": "dir"}, entries)), str(dest))
    assert (dest / "ok.txt").read_bytes() == b"fine"
    assert (dest / "after.txt").read_bytes() == b"still read in step"
    assert [name for name, _ in result["refused"]] == [
        "/etc/evil",
        "../evil",
        "a/../../evil",
        "link/evil",
        "",
    ]
    assert list(outside.iterdir()) == []
    assert not (tmp_path / "evil").exists()


def test_extract_never_writes_through_a_link(tmp_path: Path) -> None:
    target = tmp_path / "target.txt"
    target.write_text("mine")
    dest = tmp_path / "dest"
    dest.mkdir()
    (dest / "file.txt").symlink_to(target)
    extract(io.BytesIO(_stream({}, [("file.txt", b"theirs")])), str(dest))
    assert target.read_text() == "mine"
    assert not (dest / "file.txt").is_symlink()
    assert (dest / "file.txt").read_text() == "theirs"


@pytest.mark.parametrize(
    ("stream", "message"),
    [
        (_stream({}, [("a", b"x" * 20)]), "more than the 10 bytes allowed"),
        (_stream({}, [("a", b"xy")], end=False), "cut short"),
        (_stream({}, [("a", b"xy")])[:-4], "ended in the middle of a file"),
        (b"not json\n", "garbled"),
        (b'["a list"]\n', "control line"),
        (b"{}\n" + b'[["a", -1, 0, 0]]\n', "a bad entry"),
        (b"", "cut short"),
    ],
)
def test_extract_refuses_broken_streams(tmp_path: Path, stream: bytes, message: str) -> None:
    with pytest.raises(PipeRefused, match=message):
        extract(io.BytesIO(stream), str(tmp_path / "dest"), max_bytes=10)


def test_sender_and_receiver_agree(tmp_path: Path) -> None:
    source = tmp_path / "source"
    (source / "deep" / "er").mkdir(parents=True)
    (source / "deep" / "er" / "big.bin").write_bytes(os.urandom(3 << 20))
    (source / "run.sh").write_text("#!/bin/sh\n")
    (source / "run.sh").chmod(0o755)
    for i in range(1500):
        (source / f"s{i:04d}.txt").write_text(str(i))
    (source / "link").symlink_to(source / "run.sh")
    kind, files, skipped = walk(str(source))
    assert skipped == [["link", "a symbolic link"]]
    data = b"".join(chunks({"kind": kind}, files))
    result = extract(io.BytesIO(data), str(tmp_path / "copy"))
    assert result["files"] == 1502
    copy = tmp_path / "copy"
    assert (copy / "deep" / "er" / "big.bin").read_bytes() == (
        source / "deep" / "er" / "big.bin"
    ).read_bytes()
    assert (copy / "s1499.txt").read_text() == "1499"
    assert os.access(copy / "run.sh", os.X_OK)
    assert not (copy / "link").exists()


@pytest.mark.parametrize("fmt", ["gnu", "pax"])
def test_extract_reads_what_tar_writes(tmp_path: Path, fmt: str) -> None:
    source = tmp_path / "source"
    long_dir = source / ("d" * 120)
    long_dir.mkdir(parents=True)
    names = {
        f"{'d' * 120}/\u00fcn\u00ef{'f' * 150}.txt": b"long and unicode",
        "-dash.txt": b"dash",
        "empty": b"",
        "block.bin": bytes(range(256)) * 2,
    }
    for name, data in names.items():
        (source / name).write_bytes(data)
    (source / "link").symlink_to("/etc/passwd")
    listed = b"".join(b"./" + n.encode() + b"\0" for n in [*names, "link"])
    tar = ["tar", "-c", "-f", "-", f"--format={fmt}", "-C", str(source), "--null", "-T", "-"]
    stream = subprocess.run(tar, input=listed, capture_output=True, check=True).stdout
    result = extract(io.BytesIO(stream), str(tmp_path / "copy"), tar=True)
    assert result["refused"] == [["link", "not a regular file"]]
    for name, data in names.items():
        assert (tmp_path / "copy" / name).read_bytes() == data


def test_extract_refuses_hostile_tar_members(tmp_path: Path) -> None:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name in ("../evil", "/abs/evil", "fine.txt"):
            info = tarfile.TarInfo(name)
            info.size = 4
            tar.addfile(info, io.BytesIO(b"data"))
        info = tarfile.TarInfo("dev")
        info.type = tarfile.CHRTYPE
        tar.addfile(info)
    result = extract(io.BytesIO(buffer.getvalue()), str(tmp_path / "dest"), tar=True)
    assert [name for name, _ in result["refused"]] == ["../evil", "/abs/evil", "dev"]
    assert [p.name for p in (tmp_path / "dest").iterdir()] == ["fine.txt"]
    corrupt = bytearray(buffer.getvalue())
    corrupt[10] ^= 0xFF
    with pytest.raises(PipeRefused, match="bad checksum"):
        extract(io.BytesIO(bytes(corrupt)), str(tmp_path / "other"), tar=True)
