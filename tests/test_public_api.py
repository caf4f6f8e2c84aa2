"""What extenders import: the names of ``pytest_gpucloud.__all__``, and nothing deeper in the
README's examples."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest_gpucloud

README = Path(__file__).parent.parent / "README.md"


def test_every_public_name_resolves() -> None:
    for name in pytest_gpucloud.__all__:
        assert getattr(pytest_gpucloud, name) is not None, name
    assert pytest_gpucloud.RestProvider.__name__ == "RestProvider"


def test_the_package_brings_no_http_or_ssh_until_asked() -> None:
    # A plain pytest run imports the package (its plugin): it must stay light.
    code = "import sys, pytest_gpucloud; print(sorted({'httpx', 'asyncssh'} & set(sys.modules)))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"


def test_the_readme_imports_only_the_public_api() -> None:
    imports = re.findall(r"^\s*(?:from|import) (pytest_gpucloud\S*)", README.read_text(), re.M)
    assert imports, "the README shows how to import the package"
    assert set(imports) == {"pytest_gpucloud"}
