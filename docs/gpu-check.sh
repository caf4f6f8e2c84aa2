#!/usr/bin/env bash
# The GPU check of docs/gpu-check.md. Run it from the repository root on a machine with an
# NVIDIA GPU, with pytest-gpucloud, torch and pytest-xdist importable by $PYTHON (python3).
# Each step prints its command and exit status; a failed step does not stop the others, and
# the script's exit status is 1 when any step failed.
set -uo pipefail
PYTHON=$(command -v "${PYTHON:-python3}") || { echo "no ${PYTHON:-python3} on the PATH"; exit 1; }
[[ "$PYTHON" = /* ]] || PYTHON="$(pwd)/$PYTHON"
WORK=${GPU_CHECK_DIR:-/tmp/gpucloud-gpu-check}
REPO=$(pwd)
failed=()
rm -rf "$WORK" && mkdir -p "$WORK/project"

step() { printf '\n### %s\n' "$1"; }
run() {
    printf '$ %s\n' "$*"
    "$@"
    local status=$?
    printf '[exit %s]\n' "$status"
    [ "$status" -eq 0 ] || failed+=("$*")
}

step "0. The machine"
run nvidia-smi
run "$PYTHON" -c 'import sys, pytest, torch, xdist, pytest_gpucloud as g; print("python", sys.version.split()[0], "pytest", pytest.__version__, "xdist", xdist.__version__, "torch", torch.__version__, "cuda", torch.version.cuda)'

step "1. The examples on this machine's GPU (tests asking for another type end as errors naming it)"
cd "$REPO/examples" && run "$PYTHON" -m pytest -p no:cacheprovider --gpu-cloud --gpu-provider local \
    -v -rA --continue-on-collection-errors | tee "$WORK/examples.log"
grep -q "test_torch.py::test_matmul_on_the_device PASSED" "$WORK/examples.log" \
    || failed+=("1: the torch example did not pass on this machine's GPU")
cd "$REPO" || exit 1

step "2. A torch test on the GPU: CUDA is there, one GPU per slot, a matmul runs on it"
cat > "$WORK/project/pytest.ini" <<'INI'
[pytest]
markers =
    gpu: runs on a GPU
INI
cat > "$WORK/project/test_cuda.py" <<'PY'
import os

import pytest
import torch


@pytest.mark.gpu()
def test_cuda_is_available_in_the_slot():
    assert torch.cuda.is_available()
    assert os.environ["CUDA_VISIBLE_DEVICES"]  # set by --gpu-provider local
    assert torch.cuda.device_count() == 1  # the slot's GPU, no other
    print("device:", torch.cuda.get_device_name(0))


@pytest.mark.gpu()
@pytest.mark.parametrize("n", [1024, 4096])
def test_matmul_on_the_gpu(n):
    a = torch.randn(n, n, device="cuda")
    b = torch.randn(n, n, device="cuda")
    c = a @ b
    torch.cuda.synchronize()
    assert c.device.type == "cuda"
    expected = (a.double() @ b.double()).float()
    assert torch.allclose(c, expected, rtol=1e-2, atol=1e-1)


@pytest.mark.gpu()
def test_a_failure_stays_a_test_failure():
    assert torch.zeros(1, device="cuda").item() == 1.0
PY
cd "$WORK/project" && run "$PYTHON" -m pytest -p no:cacheprovider --gpu-cloud --gpu-provider local -v -rA --junitxml="$WORK/junit.xml" -k "not failure"

step "2a. The planted failure is reported as a test failure (exit 1), not as an infrastructure error"
printf '$ %s\n' "pytest --gpu-cloud --gpu-provider local -k failure -q"
"$PYTHON" -m pytest -p no:cacheprovider --gpu-cloud --gpu-provider local -k failure -q
status=$?
printf '[exit %s: expected 1]\n' "$status"
[ "$status" -eq 1 ] || failed+=("2a: exit $status, expected 1")

step "2b. With xdist: the workers share the GPU slot through the controller"
run "$PYTHON" -m pytest -p no:cacheprovider --gpu-cloud --gpu-provider local -v -n 2 -k "not failure"

step "2c. Right after: no lock or workspace left in use"
run "$PYTHON" -m pytest -p no:cacheprovider --gpu-cloud --gpu-provider local -q -k "not failure"
cd "$REPO" || exit 1

step "3. In a container (docker with the NVIDIA Container Toolkit)"
if command -v docker >/dev/null && docker info >/dev/null 2>&1; then
    cd "$WORK/project" && run "$PYTHON" -m pytest -p no:cacheprovider --gpu-cloud \
        --gpu-provider local -v -rA -k "not failure" --gpu-runtime docker \
        --gpu-image pytorch/pytorch:2.3.1-cuda12.1-cudnn8-runtime \
        --gpu-setup 'pip install -q "pytest>=8"'
    run sh -c '! docker ps -a --format "{{.Names}}" | grep gpucloud-'
    cd "$REPO" || exit 1
else
    echo "skipped: no container engine answers on this machine (docker info failed)"
fi

step "4. Per-test overhead against plain pytest on this machine"
run "$PYTHON" bench/local_gpu.py

step "Summary"
if [ "${#failed[@]}" -eq 0 ]; then
    echo "every step passed"
else
    printf 'failed: %s\n' "${failed[@]}"
    exit 1
fi
